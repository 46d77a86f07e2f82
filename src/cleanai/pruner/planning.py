"""The policy of a step: how many channels each group should lose (its ratio, the schedule,
the budget) and which, from the importance scores; the pruner applies what this decides."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Dict, List

import torch

from ..core.graph import is_meta_model
from .budget import plan_budget
from .plan import PruningPlan
from .quota import cap, target_removed
from .ranking import (allocated_score, group_score, pool_removals, spare_members,
                      tied_removals)

if TYPE_CHECKING:  # pragma: no cover
    from .structured import StructuredPruner

__all__ = ["plan_step", "scheduled_ratio", "inside", "RATIO_KINDS"]

logger = logging.getLogger(__name__)
RATIO_KINDS = ("out", "same", "internal")  # the members through which a layer ratio applies


def plan_step(pruner: "StructuredPruner") -> PruningPlan:
    """The plan of ``pruner``'s next step, made on this process (see
    :meth:`~cleanai.StructuredPruner.plan`)."""
    if getattr(pruner.importance, "needs_values", True) and is_meta_model(pruner.model):
        raise RuntimeError(f"{type(pruner.importance).__name__} reads weight values, but "
                           f"{type(pruner.model).__name__} is on the meta device (shapes "
                           f"only): prune its checkpoint with cleanai.prune_checkpoint(), "
                           f"or build the model with its weights")
    step = pruner.current_step + 1
    if step > pruner.iterative_steps:
        raise RuntimeError(f"all {pruner.iterative_steps} pruning steps are done; "
                           f"build a new StructuredPruner to prune further")
    for scorer in (pruner.importance, pruner.allocation):
        if getattr(scorer, "requires_data", False) and not getattr(scorer, "ready", True):
            raise RuntimeError(f"{type(scorer).__name__} scores channels from data: "
                               f"call pruner.calibrate(data) before planning")
    scores: Dict[int, torch.Tensor] = {}
    unmeasured: List[int] = []  # groups the allocation could not score
    quota: Dict[int, int] = {}  # how many each group should lose this step (its ratio)
    keys: Dict[int, torch.Tensor] = {}  # what ranked groups are ranked by, across groups
    caps: Dict[int, int] = {}  # with a budget: how many each ranked group may lose
    pool: List[int] = []  # the groups ranked together (global ranking, allocation)
    spent: Dict[str, int] = {}  # per kind: what ranked groups that may lose no more owe
    for g in pruner.graph.groups:
        ratio = pruner.group_ratio(g)
        if ratio is None or g.size <= 1:
            continue
        prunable = g.prunable
        if prunable == 0:
            continue
        size0 = pruner.original_size[g.id]
        named = any(inside(m.name, k) for m in g.members if m.kind in RATIO_KINDS
                    for k in pruner.layer_ratios)
        budgeted = bool(pruner.targets) and not named
        ranked = not named and (budgeted or pruner.global_pruning or
                                pruner.allocation is not None)
        most = cap(g, size0, pruner.max_pruning_ratio)
        if budgeted:
            n = most
        else:
            r = scheduled_ratio(pruner, step, ratio)
            # a ranked group that lost more than its share at an earlier step still counts:
            # the ranking's total is what the ratio gives all of them together
            n = target_removed(g, r, size0, pruner.max_pruning_ratio, pruner.round_to) - \
                (size0 - g.size)
            if not ranked:
                n = min(n, prunable, g.size - 1)
        if ranked and not budgeted and most <= 0:
            spent[g.kind] = spent.get(g.kind, 0) + n  # past its share: the others lose less
            continue
        if n <= 0 and not ranked:
            continue
        scores[g.id] = group_score(pruner, g)
        if ranked and pruner.allocation is not None:
            carried = allocated_score(pruner, g, scores[g.id])
            if carried is None:  # no sensitivity: its own ratio, or out of the budget
                unmeasured.append(g.id)
                if budgeted:
                    continue
                ranked, n = False, min(n, prunable, g.size - 1)
                if n <= 0:
                    continue
            else:
                keys[g.id] = carried
        if budgeted:
            caps[g.id] = n
            continue
        quota[g.id] = n
        if ranked:
            pool.append(g.id)
    if unmeasured:
        logger.warning("%s measured no sensitivity for %d group(s) (ids %s%s): %s",
                       type(pruner.allocation).__name__, len(unmeasured),
                       ", ".join(map(str, unmeasured[:5])), ", ..." if len(unmeasured) > 5
                       else "", "the budget leaves them as they are" if pruner.targets
                       else "each loses its own ratio")
    removals = {gid: scores[gid].argsort(stable=True)[:n] for gid, n in quota.items()
                if gid not in pool}
    if pruner.targets:
        plan = plan_budget(pruner, step, scores, caps, removals, keys)
        tied = tied_removals(pruner, plan.removals, scores)
        return plan if tied is plan.removals else \
            PruningPlan(pruner.graph, tied, step, plan.budget)
    keys = {gid: keys.get(gid, scores[gid]) for gid in pool}  # a plain global ranking: scores
    removals.update(pool_removals(pruner, pool, keys, scores, quota, spent))
    by_id = {g.id: g for g in pruner.graph.groups}
    removals = {gid: spare_members(by_id[gid], idx, scores[gid])
                for gid, idx in removals.items()}
    return PruningPlan(pruner.graph, tied_removals(pruner, removals, scores), step)


def scheduled_ratio(pruner: "StructuredPruner", step: int, ratio: float) -> float:
    """The schedule's ratio after ``step``, checked: a bad value fails before any change."""
    r = pruner.schedule(step, pruner.iterative_steps, ratio)
    if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 <= r < 1:
        raise ValueError(f"iterative_schedule returned {r!r} for step {step} of "
                         f"{pruner.iterative_steps}; it must return a ratio in [0, 1)")
    return float(r)


def inside(layer: str, key: str) -> bool:
    """Whether ``layer`` is ``key`` or inside it (``""``: the whole model)."""
    return key == "" or layer == key or layer.startswith(key + ".")
