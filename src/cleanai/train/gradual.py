"""Gradual pruning: a pruner's steps spread over training iterations (AGP, Zhu & Gupta 2017),
with the optimizer kept valid across every step."""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import torch

from ..pruner.plan import PruningPlan
from ..pruner.state import check_pruner_state, load_pruner_state
from ..pruner.structured import StructuredPruner
from .optimizer import slice_optimizer_state
from .resume import optimizer_names, saved_order

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

    A run is resumed like an LR scheduler's: :meth:`state_dict` with the model saved by
    :func:`cleanai.save_pruned` and the optimizer's own ``state_dict``; then
    :func:`cleanai.load_pruned`, a new optimizer, pruner and ``GradualPruner`` built as
    before, and :meth:`load_state_dict` (see the guide, "Resuming a run").
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
        needs_data = getattr(pruner.importance, "requires_data", False) or pruner.compensate \
            or getattr(pruner.allocation, "requires_data", False)
        if needs_data and data is None:
            what = [type(s).__name__ for s in (pruner.importance, pruner.allocation)
                    if getattr(s, "requires_data", False)] + \
                (["compensate"] if pruner.compensate else [])
            raise ValueError(f"{' and '.join(what)} need{'s' if len(what) == 1 else ''} "
                             f"calibration data: pass data= (a few batches, run before each "
                             f"step)")
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

    def state_dict(self) -> Dict[str, Any]:
        """The schedule's progress as plain data (ints, floats, strings, lists, dicts), for
        ``torch.save`` or JSON: the iteration count, the steps taken, the schedule itself
        (checked on load), the pruner's settings and its dense reference (each group's
        original width, the dense MACs and parameters of a budget, the dense latency), and
        the order of the optimizer's parameters. The model and the optimizer's state are not
        in it: save them with :func:`cleanai.save_pruned` and ``optimizer.state_dict()``."""
        return {
            "iteration": self.iteration,
            "events": list(self.events),
            "fractions": list(self.fractions),
            "pruner": self.pruner.state_dict(),
            "optimizer": None if self.optimizer is None else
            optimizer_names(self.optimizer, self.pruner.model),
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next :meth:`step` continues the saved run.

        Build this ``GradualPruner`` as the saved one was (same ``start``, ``end``,
        ``every``, ``schedule``), over a new :class:`~cleanai.StructuredPruner` with the same
        settings, built on the model :func:`cleanai.load_pruned` rebuilt at its saved widths.
        The pruner then continues from the saved step, with ratios and budgets still relative
        to the dense model the run started from. With ``optimizer=``, its parameters are put
        in their saved order (a bias that compensation added sits last in its group), so call
        this before ``optimizer.load_state_dict()``.

        Raises:
            ValueError: the state comes from another schedule, other pruner settings or
                another model, or the model is not at the saved widths; nothing changes.
        """
        if not isinstance(state_dict, dict) or not {"iteration", "events", "fractions",
                                                    "pruner"} <= set(state_dict):
            raise ValueError("load_state_dict needs a dict from GradualPruner.state_dict()")
        events, fractions = list(state_dict["events"]), list(state_dict["fractions"])
        if events != self.events:
            raise ValueError(f"this state was saved for steps at iterations {_span(events)}; "
                             f"this GradualPruner steps at {_span(self.events)}: build it with "
                             f"the start, end and every of the run you resume")
        if len(fractions) != len(self.fractions) or \
                any(abs(a - b) > 1e-12 for a, b in zip(fractions, self.fractions)):
            raise ValueError(f"this state was saved for a schedule reaching "
                             f"{[round(f, 4) for f in fractions]} of the target; this one "
                             f"reaches {[round(f, 4) for f in self.fractions]}: build it with "
                             f"the schedule of the run you resume")
        check_pruner_state(self.pruner, state_dict["pruner"])
        order = None
        if self.optimizer is not None:
            if state_dict.get("optimizer") is None:
                raise ValueError("this state was saved without an optimizer; build the "
                                 "GradualPruner without optimizer= to resume it")
            order = saved_order(self.optimizer, self.pruner.model, state_dict["optimizer"])
        # checked: now change
        load_pruner_state(self.pruner, state_dict["pruner"])
        if order is not None:
            for group, params in zip(self.optimizer.param_groups, order):
                group["params"] = params
        self.iteration = int(state_dict["iteration"])

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


def _span(events: List[int]) -> str:
    every = events[1] - events[0] if len(events) > 1 else 0
    return f"{events[0]}..{events[-1]} every {every}" if events else "none"
