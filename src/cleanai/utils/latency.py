"""Wall-clock latency of a forward pass: the number a pruned model is meant to lower, with its
noise.

One timing loop serves everything: :func:`latency_stats` times one model, :func:`compare_latency`
times two in turns (so both see the same load on the machine) and judges the difference with
:meth:`LatencyComparison.from_stats`, which says "too noisy" rather than print a speed-up the
noise could have made.
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from ..core.runtime import ForwardFn, iter_tensors, preserved_state, run_forward

__all__ = ["measure_latency", "latency_stats", "compare_latency", "LatencyStats",
           "LatencyComparison", "MAX_SPREAD", "MIN_RUNS"]

#: a latency whose interquartile range exceeds this fraction of its median is too noisy to compare
MAX_SPREAD = 0.25
#: fewer timed runs than this give no usable quartiles: too noisy to compare
MIN_RUNS = 5


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Seconds of one forward pass over ``runs`` timed runs: the median, the quartiles and the
    fastest run."""

    median: float
    q1: float
    q3: float
    min: float
    runs: int

    @classmethod
    def from_times(cls, times: Sequence[float]) -> "LatencyStats":
        """The statistics of a non-empty list of seconds (quartiles by linear interpolation)."""
        if not times:
            raise ValueError("LatencyStats.from_times needs at least one time")
        q1, med, q3 = (statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1
                       else [times[0]] * 3)
        return cls(med, q1, q3, min(times), len(times))

    @property
    def spread(self) -> float:
        """The interquartile range relative to the median (0.05: the middle half of the runs
        lies within 5% of the median's value)."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else float("inf")

    def __str__(self) -> str:
        return (f"{self.median * 1e3:.3g} ms (IQR {self.spread:.1%} of the median, "
                f"min {self.min * 1e3:.3g} ms, {self.runs} runs)")


@dataclasses.dataclass(frozen=True)
class LatencyComparison:
    """Model ``b`` against model ``a``: ``speedup = a.median / b.median`` (above 1 when ``b``
    is faster) and a ``verdict``, ``"faster"``, ``"slower"`` or ``"too noisy"``.

    The rule (:meth:`from_stats`): too noisy when either model has fewer than :data:`MIN_RUNS`
    runs, when either interquartile range exceeds :data:`MAX_SPREAD` of its median, or when
    the two interquartile ranges overlap; otherwise ``b`` is faster or slower by its median.
    ``paired`` tells whether the two were timed in turns (:func:`compare_latency`) or apart."""

    a: LatencyStats
    b: LatencyStats
    speedup: float
    verdict: str
    reason: str = ""
    paired: bool = False

    @classmethod
    def from_stats(cls, a: LatencyStats, b: LatencyStats, paired: bool = False) -> "LatencyComparison":
        """Judge ``b`` against ``a`` by the rule above; ``reason`` says why it is too noisy."""
        speedup = a.median / b.median if b.median > 0 else float("inf")
        spreads = f"IQR {a.spread:.1%} and {b.spread:.1%} of the medians"
        if min(a.runs, b.runs) < MIN_RUNS:
            reason = f"{a.runs} and {b.runs} runs (at least {MIN_RUNS} needed)"
        elif max(a.spread, b.spread) > MAX_SPREAD:
            reason = f"{spreads} (over {MAX_SPREAD:.0%})"
        elif a.q1 <= b.q3 and b.q1 <= a.q3:
            reason = f"the interquartile ranges overlap ({spreads})"
        else:
            return cls(a, b, speedup, "faster" if speedup > 1 else "slower", "", paired)
        return cls(a, b, speedup, "too noisy", reason, paired)

    @classmethod
    def from_times(cls, times_a: Sequence[float], times_b: Sequence[float],
                   paired: bool = False) -> "LatencyComparison":
        """Judge two lists of seconds by the rule above (the rule is the same in any unit)."""
        return cls.from_stats(LatencyStats.from_times(times_a), LatencyStats.from_times(times_b),
                              paired)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able: the verdict, speed-up, reason and ``paired`` (the stats stay with the
        snapshots that hold them)."""
        return {"verdict": self.verdict, "speedup": self.speedup, "reason": self.reason,
                "paired": self.paired}

    def __str__(self) -> str:
        if self.verdict == "faster":
            return f"{self.speedup:.2f}x faster"
        if self.verdict == "slower":
            return f"{1 / self.speedup:.2f}x slower"
        return f"too noisy: {self.reason}"


def measure_latency(model: nn.Module, example_inputs: Any, forward_fn: Optional[ForwardFn] = None,
                    warmup: int = 3, repeats: int = 10) -> float:
    """Median seconds of one forward pass of ``model`` on ``example_inputs``, under
    ``torch.no_grad``, after ``warmup`` untimed passes: :func:`latency_stats`'s median.

    Raises:
        ValueError: if ``repeats`` is not positive or ``warmup`` is negative.
        RuntimeError: if the forward pass fails, naming the model and the original error.
    """
    return latency_stats(model, example_inputs, forward_fn, warmup, repeats).median


def latency_stats(model: nn.Module, example_inputs: Any, forward_fn: Optional[ForwardFn] = None,
                  warmup: int = 3, repeats: int = 10) -> LatencyStats:
    """Seconds of one forward pass of ``model`` on ``example_inputs`` over ``repeats`` timed
    runs, under ``torch.no_grad``, after ``warmup`` untimed passes: median, quartiles, fastest.

    Inputs are passed as :func:`count_macs` passes them (tensor, tuple, dict, or ``forward_fn``).
    CUDA work is synchronized before each clock read. The model's mode, buffers and the RNG are
    left as they were; the numbers depend on the machine, its load and ``torch`` threads.

    Raises:
        ValueError: if ``repeats`` is not positive or ``warmup`` is negative.
        RuntimeError: if the forward pass fails, naming the model and the original error.
    """
    return LatencyStats.from_times(_time_in_turns([model], example_inputs, forward_fn,
                                                  warmup, repeats)[0])


def compare_latency(a: nn.Module, b: nn.Module, example_inputs: Any,
                    forward_fn: Optional[ForwardFn] = None, warmup: int = 3,
                    repeats: int = 30) -> LatencyComparison:
    """Time ``a`` and ``b`` in turns on the same inputs (``repeats`` runs each, after ``warmup``
    untimed passes of each) and judge ``b`` against ``a``: see :class:`LatencyComparison`.

    Taking turns (a b, b a, a b, ...) lets both models see the same load on the machine, so a
    busy moment slows both instead of one. Errors as :func:`latency_stats`."""
    ta, tb = _time_in_turns([a, b], example_inputs, forward_fn, warmup, repeats)
    return LatencyComparison.from_times(ta, tb, paired=True)


def _time_in_turns(models: List[nn.Module], inputs: Any, forward_fn: Optional[ForwardFn],
                   warmup: int, repeats: int) -> List[List[float]]:
    """Seconds of each of ``repeats`` forwards of every model, the models taking turns (the
    order reversed every round, so neither always runs right after the other)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"timing a forward pass needs repeats >= 1 and warmup >= 0, "
                         f"got repeats={repeats}, warmup={warmup}")
    cuda = any(t.is_cuda for m in models for t in _tensors(m, inputs))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times: List[List[float]] = [[] for _ in models]
    with contextlib.ExitStack() as stack, torch.no_grad():
        for m in models:
            stack.enter_context(preserved_state(m, same_modes=True))
        order = list(range(len(models)))
        model = models[0]
        try:
            for model in models:
                for _ in range(warmup):
                    run_forward(model, inputs, forward_fn)
            for _ in range(repeats):
                for i in order:
                    model = models[i]
                    sync()
                    start = time.perf_counter()
                    run_forward(model, inputs, forward_fn)
                    sync()
                    times[i].append(time.perf_counter() - start)
                order.reverse()
        except Exception as exc:  # the user's forward: report it with the model's name
            raise RuntimeError(
                f"could not time {type(model).__name__} on the example inputs: "
                f"{type(exc).__name__}: {exc}") from exc
    return times


def _tensors(model: nn.Module, inputs: Any) -> Iterator[torch.Tensor]:
    yield from iter_tensors(inputs)
    yield from model.parameters()
