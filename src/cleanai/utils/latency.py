"""Wall-clock latency of a forward pass: the number a pruned model is meant to lower."""
from __future__ import annotations

import statistics
import time
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..core.runtime import ForwardFn, iter_tensors, preserved_state, run_forward

__all__ = ["measure_latency"]


def measure_latency(model: nn.Module, example_inputs: Any, forward_fn: Optional[ForwardFn] = None,
                    warmup: int = 3, repeats: int = 10) -> float:
    """Median seconds of one forward pass of ``model`` on ``example_inputs``, under
    ``torch.no_grad``, after ``warmup`` untimed passes.

    Inputs are passed as :func:`count_macs` passes them (tensor, tuple, dict, or ``forward_fn``).
    CUDA work is synchronized before each clock read. The model's mode, buffers and the RNG are
    left as they were; the number depends on the machine, its load and ``torch`` threads.

    Raises:
        ValueError: if ``repeats`` is not positive or ``warmup`` is negative.
        RuntimeError: if the forward pass fails, naming the model and the original error.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"measure_latency needs repeats >= 1 and warmup >= 0, "
                         f"got repeats={repeats}, warmup={warmup}")
    cuda = any(t.is_cuda for t in _tensors(model, example_inputs))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    with preserved_state(model, same_modes=True), torch.no_grad():
        try:
            for i in range(warmup + repeats):
                sync()
                start = time.perf_counter()
                run_forward(model, example_inputs, forward_fn)
                sync()
                if i >= warmup:
                    times.append(time.perf_counter() - start)
        except Exception as exc:  # the user's forward: report it with the model's name
            raise RuntimeError(
                f"measure_latency could not run {type(model).__name__} on the example inputs: "
                f"{type(exc).__name__}: {exc}") from exc
    return statistics.median(times)


def _tensors(model: nn.Module, inputs: Any) -> Iterator[torch.Tensor]:
    yield from iter_tensors(inputs)
    yield from model.parameters()
