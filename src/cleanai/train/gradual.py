"""Gradual pruning: a pruner's steps spread over training iterations (AGP, Zhu & Gupta 2017),
with the optimizer kept valid across every step."""
from __future__ import annotations

import logging
from typing import Callable, Iterable, List, Optional, Union

import torch

from ..pruner.plan import PruningPlan
from ..pruner.structured import StructuredPruner
from .optimizer import slice_optimizer_state

logger = logging.getLogger(__name__)

Progress = Callable[[float], float]


def cubic(progress: float) -> float:
    """AGP's schedule: most of the pruning early, little near the end: ``1 - (1 - p)^3``."""
    return 1.0 - (1.0 - progress) ** 3


def linear(progress: float) -> float:
    """The same share at every step."""
    return progress


SCHEDULES = {"cubic": cubic, "linear": linear}


class GradualPruner:
    """Calls ``pruner``'s steps at scheduled training iterations.

    Call :meth:`step` once per training iteration, after ``optimizer.step()`` (as for an LR
    scheduler). After the ``t``-th call it prunes when ``t`` is one of ``start``,
    ``start + every``, ... up to ``end``: ``n`` steps, the ``k``-th reaching
    ``schedule(k / n)`` of the pruner's target (its ``pruning_ratio`` and layer ratios, or its
    ``target_macs`` / ``target_params`` budget), the last reaching all of it.

    Args:
        pruner: a :class:`~cleanai.StructuredPruner` that has not pruned yet. Its
            ``iterative_steps`` and ``iterative_schedule`` are replaced by this schedule.
        start, end, every: the first and last pruning iteration and the spacing (``start >= 1``).
        schedule: ``"cubic"`` (default), ``"linear"`` or ``f(progress) -> fraction``, a
            non-decreasing map of ``(0, 1]`` onto ``(0, 1]`` with ``f(1) == 1``.
        optimizer: its state (momentum, Adam moments) is sliced with every step and new or
            replaced parameters are registered (:class:`~cleanai.train.slice_optimizer_state`).
            LR schedulers and ``GradScaler`` keep working: they hold no per-parameter state.
        data, max_batches: calibration batches run before every step, for a data-dependent
            importance or ``compensate``; required by those.
        total_steps: the training's length in iterations, when known: a schedule that ends
            past it is an error.
    """

    def __init__(self, pruner: StructuredPruner, *, start: int, end: int, every: int,
                 schedule: Union[str, Progress] = "cubic",
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 data: Optional[Iterable] = None, max_batches: Optional[int] = 8,
                 total_steps: Optional[int] = None) -> None:
        if not isinstance(pruner, StructuredPruner):
            raise TypeError(f"pruner must be a StructuredPruner, got {type(pruner).__name__}")
        for name, value in (("start", start), ("end", end), ("every", every)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if end < start:
            raise ValueError(f"end ({end}) is before start ({start})")
        if total_steps is not None and end > total_steps:
            raise ValueError(f"the schedule ends at iteration {end}, past the end of training "
                             f"(total_steps={total_steps}): pruning would stop short of its "
                             f"target; end no later than {total_steps}")
        if isinstance(schedule, str):
            if schedule not in SCHEDULES:
                raise ValueError(f"schedule must be 'cubic', 'linear' or a callable, got "
                                 f"{schedule!r}")
            progress = SCHEDULES[schedule]
        elif callable(schedule):
            progress = schedule
        else:
            raise TypeError(f"schedule must be 'cubic', 'linear' or a callable, got "
                            f"{type(schedule).__name__}")
        if pruner.current_step:
            raise ValueError(f"the pruner already took {pruner.current_step} step(s); give "
                             f"GradualPruner a pruner that has not pruned yet")
        needs_data = getattr(pruner.importance, "requires_data", False) or pruner.compensate
        if needs_data and data is None:
            raise ValueError(f"{type(pruner.importance).__name__}"
                             f"{' with compensate' if pruner.compensate else ''} needs "
                             f"calibration data: pass data= (a few batches, run before each step)")
        #: the iterations at which a step is taken
        self.events: List[int] = list(range(start, end + 1, every))
        n = len(self.events)
        fractions = [float(progress(k / n)) for k in range(1, n + 1)]
        if any(not 0 < f <= 1 for f in fractions) or abs(fractions[-1] - 1) > 1e-9 or \
                any(b < a for a, b in zip(fractions, fractions[1:])):
            raise ValueError(f"schedule must rise from (0, 1] to exactly 1 over the steps; "
                             f"it gives {[round(f, 4) for f in fractions]}")
        #: the share of the pruner's target reached after each step
        self.fractions = fractions
        self.pruner = pruner
        self.optimizer = optimizer
        if optimizer is not None:
            slice_optimizer_state(optimizer, pruner.model)  # the checks, now rather than later
        self.data = data
        self.max_batches = max_batches
        #: training iterations counted so far (calls to :meth:`step`)
        self.iteration = 0
        pruner.iterative_steps = n
        pruner.schedule = self._ratio

    def _ratio(self, step: int, steps: int, ratio: float) -> float:
        return ratio * self.fractions[step - 1]

    @property
    def done(self) -> bool:
        """Whether every scheduled step was taken."""
        return self.pruner.current_step >= len(self.events)

    def step(self) -> Optional[PruningPlan]:
        """Count one training iteration; prune when it is scheduled. Returns the applied plan
        (``None`` on other iterations)."""
        self.iteration += 1
        if self.done or self.iteration != self.events[self.pruner.current_step]:
            return None
        if self.data is not None:
            self.pruner.calibrate(self.data, max_batches=self.max_batches)
        if self.optimizer is None:
            plan = self.pruner.step()
        else:
            with slice_optimizer_state(self.optimizer, self.pruner.model):
                plan = self.pruner.step()
        logger.info("iteration %d: pruning step %d/%d (%.0f%% of the target)", self.iteration,
                    plan.step, len(self.events), 100 * self.fractions[plan.step - 1])
        return plan

    def __repr__(self) -> str:
        return (f"GradualPruner(steps at iterations {self.events[0]}..{self.events[-1]} every "
                f"{self.events[1] - self.events[0] if len(self.events) > 1 else 0}, "
                f"{self.pruner.current_step}/{len(self.events)} done)")
