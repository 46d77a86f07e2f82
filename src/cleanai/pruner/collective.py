"""A pruner's steps under a process group (see :mod:`cleanai.distributed`): each rank runs the
local step, then the ranks agree on it, so no rank waits in a collective another has left."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from .. import distributed
from ..importance import Importance
from .plan import PruningPlan

if TYPE_CHECKING:  # pragma: no cover
    from .structured import StructuredPruner

logger = logging.getLogger(__name__)


def calibrate_together(pruner: "StructuredPruner", group: Any,
                       calibrate_here: Callable[[], None]) -> None:
    """Compare the models, give every rank rank 0's buffers, calibrate on this rank's data,
    then sum every statistic across the ranks."""
    distributed.check_same_model(pruner.model, group, "before calibration", pruner.graph)
    distributed.broadcast_buffers(pruner.model, group)
    error = None
    try:
        calibrate_here()
    except Exception as exc:  # a rank without data must not leave the others waiting
        error = exc
    distributed.agree(error, group, "calibration")
    if pruner.input_stats is not None:
        distributed.all_reduce_stats(pruner.input_stats, group)
    for scorer in (pruner.importance, pruner.allocation):
        synchronize = getattr(scorer, "synchronize", None)
        if synchronize is None or getattr(type(scorer), "synchronize", None) is \
                Importance.synchronize:
            if getattr(scorer, "requires_data", False):
                logger.warning("%s does not define synchronize(): under torch.distributed its "
                               "scores come from rank 0's calibration data alone",
                               type(scorer).__name__)
            continue
        synchronize(pruner.model, group)


def plan_together(pruner: "StructuredPruner", group: Any,
                  plan_here: Callable[[], PruningPlan]) -> PruningPlan:
    """Rank 0's plan on every rank (a planning error on rank 0 is raised on every rank)."""
    distributed.check_same_model(pruner.model, group, "before planning", pruner.graph)
    plan, error, payload = None, None, None
    if distributed.is_leader(group):
        try:
            plan = plan_here()
            payload = {"step": plan.step, "budget": plan.budget,
                       "removals": {g: idx.tolist() for g, idx in plan.removals.items()}}
        except Exception as exc:  # every rank must hear of it, not wait for a plan
            error = exc
            payload = {"error": f"{type(exc).__name__}: {exc}"}
    sent = distributed.broadcast_object(payload, group)
    if error is not None:
        raise error
    if "error" in sent:
        raise distributed.DistributedError(f"rank 0 could not plan: {sent['error']}")
    return plan if plan is not None else \
        PruningPlan(pruner.graph, sent["removals"], sent["step"], sent["budget"])


def apply_together(pruner: "StructuredPruner", group: Any, plan: PruningPlan,
                   apply_here: Callable[[PruningPlan], None]) -> None:
    """Apply ``plan`` on every rank, agree on the outcome, then compare the pruned models."""
    error = None
    try:
        apply_here(plan)
    except Exception as exc:
        error = exc
    distributed.agree(error, group, f"pruning step {plan.step}")
    distributed.check_same_model(pruner.model, group, f"after pruning step {plan.step}",
                                 pruner.graph)
