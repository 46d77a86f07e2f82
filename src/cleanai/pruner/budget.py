"""Budgets: a plan that removes the least important channels per unit of cost until the model
fits a target of MACs, parameters or latency.

Channels of every group the pruner may touch are ranked together by their score normalised
within the group (each group giving its worst first); channels whose removal saves nothing the
budget counts are left out. Dividing by what a channel saves
(:meth:`~cleanai.budget.CostModel.channel_costs`) is the knob :data:`COST_EXPONENT`, 0 by
default: on Fashion-MNIST score per unit of cost kept much less accuracy. The number taken from
the ranking is bisected until the plan's cost, computed exactly by the cost model, meets the
target. A latency target is met the same way, with the plan's latency predicted by a lookup
table of the layers' timings (:class:`~cleanai.budget.LatencyTable`); the plan found is timed
on the model's device, the table refitted to that timing, and the plan found again until the
measured latency fits.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch

from .apply import PruningError
from .plan import PruningPlan
from .quota import rounded, unit_of
from .ranking import spare_members, tied_removals

if TYPE_CHECKING:  # pragma: no cover
    from .structured import StructuredPruner

METRICS = ("macs", "params", "latency")
LATENCY_REPEATS = 30  # timed runs per candidate of a latency budget (their median counts)
LATENCY_CANDIDATES = 6  # candidate plans timed at most per step
LATENCY_TOLERANCE = 0.03  # a candidate this close to the target (relative) is taken at once
#: channels are ranked by ``score / (cost / typical cost) ** COST_EXPONENT``: 0 ignores cost
#: (a plain global ranking of normalised scores), 1 is score per unit of cost
COST_EXPONENT = 0.0
#: the same knob for an allocation's scores (one unit across groups, e.g. the output's change):
#: 1 removes the channels that cost the least output change per unit of budget saved
ALLOCATION_COST_EXPONENT = 1.0
logger = logging.getLogger(__name__)


class BudgetError(PruningError):
    """The budget cannot be met: everything the pruner may remove still costs too much."""


@dataclasses.dataclass
class Target:
    """One budget: ``metric`` ("macs", "params" or "latency") must fall to ``fraction`` of
    the dense model, or to ``absolute`` (MACs, parameters, seconds)."""

    metric: str
    fraction: Optional[float] = None
    absolute: Optional[float] = None

    def value(self, dense: float) -> float:
        """The target in the metric's unit, given the dense model's value."""
        return self.absolute if self.absolute is not None else self.fraction * dense


def parse_targets(target_macs: Any, target_params: Any, target_latency: Any) -> List[Target]:
    """Check the pruner's budget arguments; a clear ``ValueError`` for bad ones."""
    out = []
    for metric, value in (("macs", target_macs), ("params", target_params)):
        if value is None:
            continue
        arg = f"target_{metric}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or value <= 0:
            raise ValueError(f"{arg} must be a fraction of the dense model in (0, 1) or an "
                             f"absolute number of {metric} (>= 1), got {value!r}")
        if isinstance(value, float) and value < 1:
            out.append(Target(metric, fraction=float(value)))
        elif value == 1 or value != int(value):
            raise ValueError(f"{arg} must be a fraction of the dense model in (0, 1) (0.5: "
                             f"half of it) or a whole number of {metric}, got {value!r}")
        else:
            out.append(Target(metric, absolute=float(value)))
    if target_latency is not None:
        if out:
            raise ValueError("target_latency cannot be combined with target_macs or "
                             "target_params: latency is met through MACs; give one budget")
        if isinstance(target_latency, datetime.timedelta):
            seconds = target_latency.total_seconds()
            if seconds <= 0:
                raise ValueError(f"target_latency must be positive, got {target_latency!r}")
            out.append(Target("latency", absolute=seconds))
        elif isinstance(target_latency, (int, float)) and not isinstance(target_latency, bool) \
                and 0 < target_latency < 1:
            out.append(Target("latency", fraction=float(target_latency)))
        else:
            raise ValueError(f"target_latency must be a fraction of the dense latency in "
                             f"(0, 1) or a datetime.timedelta, got {target_latency!r}")
    return out


def budget_cost_model(model: Any, graph: Any, targets: List[Target]) -> Any:
    """The :class:`~cleanai.budget.CostModel` a budgeted pruner plans with; a clear
    ``ValueError`` for an absolute target the model already meets."""
    from ..budget.cost import CostModel
    from .history import get_history

    cm = CostModel(model, graph)
    # a model CleanAI pruned before (reloaded to resume a schedule) may be below an absolute
    # target already: its dense reference comes with the resumed state
    # (StructuredPruner.load_state_dict), and a met target then plans no removals
    pruned = bool((get_history(model) or {}).get("steps"))
    for t in targets:
        dense = getattr(cm.dense, t.metric, None)
        if t.absolute is not None and t.metric != "latency" and not pruned and \
                t.absolute >= dense:
            raise ValueError(f"target_{t.metric}={t.absolute:g} is not below the model's "
                             f"{dense:.0f} {t.metric}: nothing to prune")
    return cm


@dataclasses.dataclass
class BudgetResult:
    """What a budgeted plan was asked for and what it reaches, per metric: ``dense``, this
    step's ``target`` and the ``planned`` value (all in the metric's unit; latency in
    seconds, ``measured`` on the device and ``predicted`` by the latency table before it was
    measured)."""

    rows: Dict[str, Dict[str, float]]

    def summary(self) -> str:
        parts = []
        for metric, r in self.rows.items():
            dense = r["dense"]
            got = r.get("measured", r["planned"])
            parts.append(f"{metric} {got / dense:.3f} of dense (target {r['target'] / dense:.3f}"
                         + (f", predicted {r['predicted'] / dense:.3f}" if "predicted" in r
                            else "") + ")")
        return "budget: " + "; ".join(parts)


def plan_budget(pruner: "StructuredPruner", step: int, scores: Dict[int, torch.Tensor],
                caps: Dict[int, int], fixed: Dict[int, torch.Tensor],
                keys: Optional[Dict[int, torch.Tensor]] = None) -> PruningPlan:
    """The plan of a budgeted step: this step's share of the targets, met by the cost
    model's ranking (see :mod:`cleanai.pruner.budget`); ``keys``: what the groups are ranked
    by instead of their scores (an allocation's, see :func:`budget_removals`)."""
    frac = pruner.schedule(step, pruner.iterative_steps, 1.0)
    if not isinstance(frac, (int, float)) or not 0 <= frac <= 1:
        raise ValueError(f"iterative_schedule returned {frac!r} for step {step} with "
                         f"ratio 1.0; it must return a number in [0, 1]")
    cm = pruner.cost_model
    rows: Dict[str, Dict[str, float]] = {}
    if pruner.targets[0].metric == "latency":
        removals, rows = latency_removals(pruner, step, float(frac), scores, caps, fixed, keys)
    else:
        wanted = {}
        for t in pruner.targets:
            dense = getattr(cm.dense, t.metric)
            final = t.value(dense)
            wanted[t.metric] = dense - (dense - final) * float(frac)
        removals, planned = budget_removals(pruner, scores, caps, fixed, wanted, keys=keys)
        rows = {m: {"dense": getattr(cm.dense, m), "target": wanted[m],
                    "planned": planned[m]} for m in wanted}
    plan = PruningPlan(pruner.graph, removals, step)
    plan.budget = BudgetResult(rows)
    return plan


def budget_removals(pruner: "StructuredPruner", scores: Dict[int, torch.Tensor],
                    caps: Dict[int, int], fixed: Dict[int, torch.Tensor],
                    targets: Dict[str, float], latency: Any = None, fastest: bool = False,
                    keys: Optional[Dict[int, torch.Tensor]] = None,
                    ) -> Tuple[Dict[int, torch.Tensor], Dict[str, float]]:
    """The removals that meet every ``targets`` value (metric -> this step's cost) with the
    fewest channels from the ranking. ``scores``: per candidate group (protected channels
    ``inf``); ``caps``: how many each may lose; ``fixed``: removals decided by layer ratios;
    ``latency``: the :class:`~cleanai.budget.LatencyTable` that predicts a ``"latency"``
    target; ``fastest``: when nothing fits, return everything the ranking may remove instead
    of raising; ``keys``: per group, what it is ranked by across groups when not its scores
    (an allocation's scores in the scores' order, one unit for all groups: not normalised,
    divided by cost with :data:`ALLOCATION_COST_EXPONENT`); each group still gives its
    lowest-scored channels first. Returns the removals and their predicted costs."""
    cm = pruner.cost_model
    costs = cm.channel_costs(fixed)
    dense = cm.dense
    by_id = {g.id: g for g in pruner.graph.groups}
    group_keys, owner, local = [], [], []
    per: Dict[int, float] = {}  # what one channel of each group saves, summed over targets
    for gid in caps:
        c = costs.get(gid)
        # a channel saves time where it saves MACs or parameters
        per[gid] = 0.0 if c is None else sum(
            (c.macs / max(dense.macs, 1)) if m in ("macs", "latency")
            else (c.params / max(dense.params, 1)) for m in targets)
    exponent = COST_EXPONENT if not keys else ALLOCATION_COST_EXPONENT
    positive = [v for v in per.values() if v > 0]
    typical = sum(positive) / len(positive) if positive else 1.0
    for gid, cap in caps.items():
        s = scores[gid]
        k = keys[gid] if keys else s
        finite = k[torch.isfinite(k)]
        # an allocation's scores share one unit across groups: they are ranked as they are
        scale = float(finite.abs().mean()) if finite.numel() and not keys else 1.0
        if per[gid] > 0:
            key = (k / (scale if scale > 0 else 1.0)) / (per[gid] / typical) ** exponent
        else:  # removing it saves nothing the budget counts
            key = torch.full_like(s, float("inf"))
        order = s.argsort(stable=True)[:cap]  # a group gives its worst channels first
        order = order[torch.isfinite(key[order])]
        group_keys.append(key[order])
        owner.append(torch.full((order.numel(),), gid, dtype=torch.long))
        local.append(order)
    if group_keys:
        flat = torch.cat(group_keys)
        ranked = flat.argsort(stable=True)
        owner_r, local_r = torch.cat(owner)[ranked], torch.cat(local)[ranked]
    else:
        owner_r = local_r = torch.zeros(0, dtype=torch.long)

    def removals(n: int, back: int = 0) -> Dict[int, torch.Tensor]:
        """The first ``n`` channels of the ranking, less the ``back`` last of them that
        belong to untied groups (given back to fill what a tie's coarse step left)."""
        out = dict(fixed)
        if n:
            own, loc = owner_r[:n], local_r[:n]
            if back:
                keep = torch.ones(n, dtype=torch.bool)
                keep[untied[untied < n][-back:]] = False
                own, loc = own[keep], loc[keep]
            for gid in torch.unique(own).tolist():
                idx = loc[own == gid]
                g = by_id[gid]
                if unit_of(g, pruner.round_to) > 1:
                    already = pruner.original_size[gid] - g.size
                    k = min(rounded(g, already + idx.numel(), pruner.original_size[gid],
                                    pruner.max_pruning_ratio, pruner.round_to) - already,
                            caps[gid])
                    idx = scores[gid].argsort(stable=True)[:max(0, k)]
                if idx.numel():
                    out[gid] = idx
        # the graph's ties (equal counts, equal fractions) before the cost is read
        return tied_removals(pruner, {gid: spare_members(by_id[gid], idx, scores[gid])
                                      for gid, idx in out.items()}, scores)

    counted = any(m != "latency" for m in targets)

    def values(r: Dict[int, torch.Tensor]) -> Dict[str, float]:
        cost = cm.evaluate(r) if counted else None  # the table reads its own widths
        return {m: latency.predict(r) if m == "latency" else getattr(cost, m) for m in targets}

    def fits(n: int, back: int = 0) -> Tuple[bool, Dict[int, torch.Tensor], Dict[str, float]]:
        r = removals(n, back)
        got = values(r)
        return all(got[m] <= t * (1 + 1e-9) for m, t in targets.items()), r, got

    # ranking positions of channels whose group is in no tie: they can be given back one by one
    tied_ids = [g.id for g in pruner.graph.groups if g.equal_fractions or g.equal_counts]
    untied = torch.nonzero(~torch.isin(owner_r, torch.tensor(tied_ids, dtype=torch.long))
                           ).flatten() if tied_ids else owner_r[:0]

    total = owner_r.numel()
    ok, best, cost = fits(total)
    if not ok and fastest:
        return best, cost
    if not ok:
        full = {m: (latency.predict({}) if m == "latency" else getattr(dense, m))
                for m in targets}
        raise BudgetError(_unreachable(pruner, targets, cost, full))
    lo, hi = 0, total  # fits(hi) holds; find the smallest n that fits
    while lo < hi:
        mid = (lo + hi) // 2
        ok, r, c = fits(mid)
        if ok:
            hi, best, cost = mid, r, c
        else:
            lo = mid + 1
    if hi == 0:
        best = removals(0)
        cost = values(best)
    elif tied_ids and not pruner.round_to:
        # the n-th channel may have moved a tie a whole step (a head and its share of the
        # width): give back the last untied channels while the budget still holds
        lo, top = 0, int((untied < hi).sum())
        while lo < top:
            mid = (lo + top + 1) // 2
            ok, r, c = fits(hi, mid)
            if ok:
                lo, best, cost = mid, r, c
            else:
                top = mid - 1
    return best, cost


def _unreachable(pruner: "StructuredPruner", targets: Dict[str, float],
                 got: Dict[str, float], dense: Dict[str, float]) -> str:
    """Why a budget cannot be met, and how close the pruner can get: ``got`` per metric with
    everything allowed removed, ``dense`` as it is now."""
    reached = "; ".join(f"{m} {got[m] / max(dense[m], 1e-12):.3f} of "
                        f"{'the model' if m == 'latency' else 'dense'} (target "
                        f"{t / max(dense[m], 1e-12):.3f})" for m, t in targets.items())
    reasons: Dict[str, int] = {}
    ignored = 0
    for g in pruner.graph.groups:
        if pruner.group_ratio(g) is None:
            ignored += g.size
        for reason, n in g.reasons.items():
            reasons[reason] = reasons.get(reason, 0) + n
    top = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
    why = [f"{n} channels protected ({r})" for r, n in top]
    if ignored:
        why.append(f"{ignored} channels in ignored layers or kinds not pruned")
    if pruner.max_pruning_ratio < 1:
        why.append(f"max_pruning_ratio={pruner.max_pruning_ratio} caps every group")
    why.append("every group keeps one channel at least")
    return (f"the budget cannot be met: removing every channel the pruner may remove leaves "
            f"{reached}. What stays: " + "; ".join(why) + ". Raise the target, or allow more "
            "(ignored_layers, kinds, max_pruning_ratio).")


def paired_latency(model: Any, other: Any, inputs: Any, forward_fn: Any,
                   repeats: int) -> Tuple[float, Optional[float]]:
    """Median seconds of a forward of ``model`` and of ``other`` (or ``None``), timed in
    turns after a warm-up of each, so that both see the same load on the machine
    (:func:`cleanai.utils.compare_latency`)."""
    from ..utils.latency import compare_latency, latency_stats

    if other is None:
        return latency_stats(model, inputs, forward_fn, repeats=repeats).median, None
    found = compare_latency(model, other, inputs, forward_fn, repeats=repeats)
    return found.a.median, found.b.median


def latency_removals(pruner: "StructuredPruner", step: int, frac: float,
                     scores: Dict[int, torch.Tensor], caps: Dict[int, int],
                     fixed: Dict[int, torch.Tensor],
                     keys: Optional[Dict[int, torch.Tensor]] = None
                     ) -> Tuple[Dict[int, torch.Tensor], dict]:
    """Meet a latency target with the pruner's :class:`~cleanai.budget.LatencyTable`: the
    ranking is cut where the predicted latency fits, that plan is timed on a copy in turns with
    the model as it is (so both see the same machine load), the table is refitted to the
    timing, and the cut is found again until a timed plan fits (``LATENCY_CANDIDATES``)."""
    cm = pruner.cost_model
    now, _ = paired_latency(pruner.model, None, pruner.example_inputs,
                            pruner.graph.forward_fn, LATENCY_REPEATS)
    if pruner._dense_latency is None:
        pruner._dense_latency = now
    dense = pruner._dense_latency
    wanted = dense - (dense - pruner.targets[0].value(dense)) * frac
    table = pruner.latency_table
    table.observe({}, now, near=wanted)
    # (predicted, measured, MACs, removals) of every candidate timed
    timed: List[Tuple[float, float, float, Dict[int, torch.Tensor]]] = []
    goal = wanted  # what the table is asked for
    for _ in range(LATENCY_CANDIDATES):
        # when the table says nothing fits, the fastest plan is timed: the table may be wrong
        removals, planned = budget_removals(pruner, scores, caps, fixed, {"latency": goal},
                                            latency=table, fastest=True, keys=keys)
        if any(_same(removals, t[3]) for t in timed):
            last = timed[-1][1]
            if last <= wanted * (1 + LATENCY_TOLERANCE):
                break
            # the refit leads back to a plan timed too slow: ask the table for less
            goal *= wanted / last
            removals, planned = budget_removals(pruner, scores, caps, fixed,
                                                {"latency": goal}, latency=table, fastest=True,
                                                keys=keys)
            if any(_same(removals, t[3]) for t in timed):
                break
        candidate = pruner.pruned_copy(PruningPlan(pruner.graph, removals, step),
                                       compensate=False)
        t_now, t_new = paired_latency(pruner.model, candidate, pruner.example_inputs,
                                      pruner.graph.forward_fn, LATENCY_REPEATS)
        measured = now * t_new / t_now
        timed.append((planned["latency"], measured, cm.evaluate(removals).macs, removals))
        logger.info("latency budget: predicted %.4g s, measured %.4g s (target %.4g s)",
                    planned["latency"], measured, wanted)
        table.observe(removals, measured, near=wanted)
        if abs(measured - wanted) <= LATENCY_TOLERANCE * wanted:
            break
    fit = [t for t in timed if t[1] <= wanted * (1 + LATENCY_TOLERANCE)]
    if not fit and _same(min(timed, key=lambda t: t[1])[3], budget_removals(
            pruner, scores, caps, fixed, {"latency": 0.0}, latency=table, fastest=True,
            keys=keys)[0]):
        fast = min(t[1] for t in timed)
        raise BudgetError(_unreachable(pruner, {"latency": wanted}, {"latency": fast},
                                       {"latency": now}) + " (latency as timed on this device)")
    chosen = max(fit, key=lambda t: t[1]) if fit else min(timed, key=lambda t: t[1])
    return chosen[3], {
        "latency": {"dense": dense, "target": wanted, "planned": chosen[1],
                    "measured": chosen[1], "predicted": chosen[0]},
        "macs": {"dense": cm.dense.macs, "target": chosen[2], "planned": chosen[2]}}


def _same(a: Dict[int, torch.Tensor], b: Dict[int, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[g], b[g]) for g in a)
