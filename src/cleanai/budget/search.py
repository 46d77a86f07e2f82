"""Per-layer ratios that meet a budget and keep the model as good as possible.

:func:`search_ratios` starts from three allocations: one read off a sensitivity sweep (a
unit that loses little per MAC saved gives more), the uniform one and the pruner's own
budgeted ranking (``target_macs=...``). A seeded evolutionary search refines the best: each
candidate perturbs a few units' ratios of the best so far, is scaled until its plan meets the
budget (exactly, by the :class:`~cleanai.budget.CostModel`), and is scored on a pruned copy.
The last candidate is the best with what the per-group floors left of the budget given back.
The uniform allocation and the ranking under the same budget are always candidates, so the
result is never worse than either on the search's own data.
"""
from __future__ import annotations

import contextlib

import dataclasses
import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..core.runtime import ForwardFn, preserved_state
from ..importance.stats import iterate_batches
from ..pruner import PruningPlan, StructuredPruner
from ..pruner.budget import BudgetError, Target, parse_targets
from .cost import Cost, CostModel
from .measure import Progress, Reference, changed_layers, check_pruner_options, checked_metric
from .sensitivity import SensitivityTable, Unit, prunable_units, sensitivity

__all__ = ["SearchResult", "search_ratios"]

MAX_RATIO = 0.95  # no unit is asked for more (a group keeps one channel anyway)
_Fitted = Tuple[Dict[str, float], PruningPlan, Cost]  # ratios, their plan, its cost


@dataclasses.dataclass
class SearchResult:
    """The best allocation found.

    ``ratios`` are ``layer_pruning_ratios`` that give ``plan`` with ``pruning_ratio=0``;
    ``pruner`` is the pruner the search built on the model (never applied):
    ``result.pruner.apply(result.plan)`` prunes the model in place. ``score`` is the
    metric of the pruned model, ``uniform`` that of one ratio for every unit under the same
    budget, ``cost`` the plan's MACs and params as fractions of the dense model, ``dense`` the
    metric of the dense model. ``history``: every candidate scored, as (ratios, score, cost).
    """

    ratios: Dict[str, float]
    score: float
    uniform: float
    dense: float
    cost: Cost
    plan: PruningPlan
    pruner: StructuredPruner
    history: List[Tuple[Dict[str, float], float, Cost]]
    metric_name: str

    def summary(self) -> str:
        """One line: the metric searched against uniform, and the size reached."""
        return (f"search_ratios: {self.metric_name} {self.score:.4f} (uniform ratios "
                f"{self.uniform:.4f}, dense {self.dense:.4f}) at {self.cost.macs:.3f} of the "
                f"dense MACs and {self.cost.params:.3f} of its params, after "
                f"{len(self.history)} candidates")


class _Cached:
    """An importance whose scores are computed once per group: the search plans hundreds of
    times on a model that never changes."""

    def __init__(self, importance: Any) -> None:
        self.importance = importance
        self.scores: Dict[int, torch.Tensor] = {}
        self.requires_data = getattr(importance, "requires_data", False)

    @property
    def ready(self) -> bool:
        return getattr(self.importance, "ready", True)

    def __call__(self, group, model) -> torch.Tensor:
        s = self.scores.get(group.id)
        if s is None:
            s = self.scores[group.id] = self.importance(group, model)
        return s


def search_ratios(model: nn.Module, example_inputs: Any, data: Optional[Iterable], *,
                  target_macs: Optional[float] = None, target_params: Optional[float] = None,
                  target_latency: Optional[float] = None,
                  metric: Optional[Callable[[nn.Module], float]] = None,
                  evaluations: int = 24, by: str = "group", importance: Any = None,
                  compensate: Optional[str] = None, max_batches: int = 8,
                  forward_fn: Optional[ForwardFn] = None, seed: int = 0, progress: bool = True,
                  table: Optional[SensitivityTable] = None,
                  sensitivity_ratios: Sequence[float] = (0.25, 0.5, 0.75),
                  **pruner_options: Any) -> SearchResult:
    """Find per-unit pruning ratios that meet the budget and maximise ``metric``.

    Args:
        model: the model; it is not changed (``result.pruner.apply(result.plan)`` prunes it).
        example_inputs, importance, compensate, forward_fn, **pruner_options: as for
            :class:`~cleanai.StructuredPruner` (``ignored_layers``, ``kinds``, ``round_to``,
            ``max_pruning_ratio`` apply; ratio options are rejected).
        data: batches as :meth:`StructuredPruner.calibrate` takes them (the first
            ``max_batches``): calibration, and the default metric.
        target_macs, target_params, target_latency: the budget, as for the pruner (a
            fraction of the dense model, or an absolute count). A latency target is turned
            into the MACs at which the pruner's latency budget lands on this device.
        metric: ``metric(model) -> float``, higher is better; default: agreement with the
            dense model's outputs on ``data`` (top-1 for classifiers, cosine otherwise).
        evaluations: candidates scored after the sensitivity sweep (at least 2: the
            sensitivity allocation and the uniform one).
        by: the units that get a ratio each: ``"group"``, ``"layer"`` or ``"block"``.
        seed: the search is deterministic for a seed.
        table: a :func:`sensitivity` table of the same model and units, to skip the sweep;
            else one is measured at ``sensitivity_ratios``.
        progress: a progress bar (tqdm) or log lines.

    Raises:
        ValueError: no budget, bad arguments, or no data where the metric needs it.
        BudgetError: no allocation meets the budget.
    """
    targets = parse_targets(target_macs, target_params, target_latency)
    if not targets:
        raise ValueError("search_ratios needs a budget: target_macs, target_params or "
                         "target_latency")
    if not isinstance(evaluations, int) or isinstance(evaluations, bool) or evaluations < 2:
        raise ValueError(f"evaluations must be an int >= 2, got {evaluations!r}")
    if metric is not None and not callable(metric):
        raise TypeError("metric must be callable: metric(model) -> float")
    check_pruner_options(pruner_options)
    calibrating = compensate is not None or bool(getattr(importance, "requires_data", False))
    if data is None and (metric is None or calibrating):
        raise ValueError("search_ratios needs data: the default metric compares outputs on "
                         "it (and calibration needs it); pass a DataLoader or a list of batches")
    batches: List[Any] = []
    if data is not None:
        batches = list(iterate_batches(data, max_batches, progress=False))
        if not batches:
            raise ValueError("search_ratios: data yielded no batches")

    pruner = StructuredPruner(model, example_inputs, importance=importance, pruning_ratio=0.0,
                              compensate=compensate, forward_fn=forward_fn, **pruner_options)
    cm = CostModel(model, pruner.graph)
    if calibrating:
        pruner.calibrate(batches, max_batches=max_batches, forward_fn=forward_fn)
    wanted = _wanted(targets, cm, pruner)
    scorer = pruner.importance
    pruner.importance = _Cached(scorer)
    units = prunable_units(pruner, by)
    if not units:
        raise BudgetError(f"{type(model).__name__} has no units that can lose channels")
    if table is None:
        table = sensitivity(model, example_inputs, batches or data, metric=metric,
                            ratios=sensitivity_ratios, by=by, importance=importance,
                            compensate=compensate, max_batches=max_batches,
                            forward_fn=forward_fn, progress=progress, **pruner_options)
    missing = [u.name for u in units if u.name not in table.values]
    if missing:
        raise ValueError(f"the sensitivity table has no rows for {missing[:3]}: measure it "
                         f"with the same model, by={by!r} and pruner options")

    with preserved_state(model):
        model.eval()
        reference = Reference(model, batches, forward_fn) if metric is None else None
        dense = reference.dense if reference is not None else \
            checked_metric(metric(model), "the dense model")
    name = reference.name if reference is not None else getattr(metric, "__name__", "metric")
    search = _Search(pruner, cm, units, wanted, metric, reference)
    gen = torch.Generator().manual_seed(seed)
    bar = Progress(evaluations, progress)
    try:
        firsts = [_from_sensitivity(table, units, wanted, cm), {u.name: 1.0 for u in units}]
        if evaluations > 2:
            firsts.append(_from_ranking(pruner, cm, units, wanted))
        for i, direction in enumerate(firsts):
            search.score(direction)
            if i == 1:
                uniform = search.history[-1][1] if search.history[-1][0] else -math.inf
            bar.update()
        for _ in range(evaluations - len(firsts) - 1):
            search.score(_mutate(search.best_direction, units, gen))
            bar.update()
        if evaluations > len(firsts):  # the last: the best with the floors' leftovers spent
            topped = search.top_up(search.best[0]) if search.best is not None else None
            if topped is not None:
                search.evaluate(*topped, search.best_direction)
            else:
                search.score(_mutate(search.best_direction, units, gen))
            bar.update()
    finally:
        bar.close()
        pruner.layer_ratios = {}
        pruner.importance = scorer  # the result's pruner scores as the caller asked
    if search.best is None:
        raise BudgetError(f"no allocation of ratios meets the budget ({_describe(wanted, cm)}); "
                          f"the protected channels and limits leave too much")
    ratios, score, cost, plan = search.best
    pruner.layer_ratios = dict(ratios)
    return SearchResult(dict(ratios), score, uniform, dense, cost.fraction_of(cm.dense), plan,
                        pruner, search.history, name)


class _Search:
    """Scales allocations to the budget and scores them; keeps the best."""

    def __init__(self, pruner: StructuredPruner, cm: CostModel, units: List[Unit],
                 wanted: Dict[str, float], metric, reference) -> None:
        self.pruner, self.cm, self.units, self.wanted = pruner, cm, units, wanted
        self.metric, self.reference = metric, reference
        self.history: List[Tuple[Dict[str, float], float, Cost]] = []
        self.best: Optional[Tuple[Dict[str, float], float, Cost, PruningPlan]] = None
        self.best_direction: Dict[str, float] = {}
        self.seen: Dict[Tuple, float] = {}

    def _plan(self, ratios: Dict[str, float]) -> Tuple[PruningPlan, Cost]:
        self.pruner.layer_ratios = {k: v for k, v in ratios.items() if v > 0}
        plan = self.pruner.plan()
        return plan, self.cm.evaluate(plan.removals)

    def _fits(self, cost: Cost) -> bool:
        return all(getattr(cost, m) <= t * (1 + 1e-9) for m, t in self.wanted.items())

    def fit(self, direction: Dict[str, float]) -> Optional[_Fitted]:
        """The smallest scale ``t`` of ``direction`` whose ratios ``min(t * d, MAX_RATIO)``
        meet the budget (bisection on ``t``), or None."""
        top = max(direction.values(), default=0.0)
        if top <= 0:
            return None

        def at(t: float) -> Dict[str, float]:
            return {k: round(min(MAX_RATIO, t * v), 4) for k, v in direction.items()}

        hi = MAX_RATIO / top
        while True:  # grow until every unit is at its cap
            plan, cost = self._plan(at(hi))
            if self._fits(cost) or all(min(MAX_RATIO, hi * v) >= MAX_RATIO
                                       for v in direction.values() if v > 0):
                break
            hi *= 2
        if not self._fits(cost):
            return None
        lo, best = 0.0, (at(hi), plan, cost)
        for _ in range(14):
            mid = (lo + hi) / 2
            plan, cost = self._plan(at(mid))
            if self._fits(cost):
                hi, best = mid, (at(mid), plan, cost)
            else:
                lo = mid
        return best

    def top_up(self, ratios: Dict[str, float]) -> Optional[_Fitted]:
        """``ratios`` with the budget that the per-group floors left unspent given back: each
        unit in turn, the most pruned first, keeps one more channel while the plan still meets
        the budget. None when nothing could be given back."""
        ratios, changed = dict(ratios), False
        size = {u.name: min(self.pruner.original_size[g] for g in u.groups) for u in self.units}
        for u in sorted(self.units, key=lambda u: (-ratios.get(u.name, 0.0), u.name)):
            while ratios.get(u.name, 0.0) > 0:
                trial = dict(ratios)
                trial[u.name] = round(max(0.0, ratios[u.name] - 1.0 / max(1, size[u.name])), 4)
                if trial[u.name] == ratios[u.name]:  # one channel is below the rounding
                    break
                plan, cost = self._plan(trial)
                if not self._fits(cost):
                    break
                ratios, changed = trial, True
        if not changed:
            return None
        plan, cost = self._plan(ratios)
        return ratios, plan, cost

    def score(self, direction: Dict[str, float]) -> None:
        """Scale ``direction`` to the budget and score it."""
        fitted = self.fit(direction)
        if fitted is None:
            self.history.append(({}, -math.inf, Cost(math.inf, math.inf)))
            return
        self.evaluate(*fitted, direction)

    def evaluate(self, ratios: Dict[str, float], plan: PruningPlan, cost: Cost,
                 direction: Dict[str, float]) -> None:
        """Score a plan that meets the budget; keep it if it is the best so far."""
        key = tuple(sorted((g, tuple(i.tolist())) for g, i in plan.removals.items() if len(i)))
        if key in self.seen:
            value = self.seen[key]
        else:
            copy = self.pruner.pruned_copy(plan).eval()
            where = "a candidate allocation"
            value = checked_metric(self.metric(copy) if self.metric is not None else
                                   self.reference.score(copy, changed_layers(self.pruner, plan)),
                                   where)
            self.seen[key] = value
        self.history.append((ratios, value, cost.fraction_of(self.cm.dense)))
        if self.best is None or value > self.best[1]:
            self.best = (ratios, value, cost, plan)
            self.best_direction = dict(direction)


def _wanted(targets, cm: CostModel, pruner: StructuredPruner) -> Dict[str, float]:
    """Each budget as an absolute MACs / params count; latency through the pruner's own
    latency budget on this device (the calibrated pruner plans it)."""
    wanted = {}
    for t in targets:
        if t.metric == "latency":
            with _budgeted(pruner, [t], cm):
                wanted["macs"] = pruner.plan().budget.rows["macs"]["planned"]
        else:
            dense = getattr(cm.dense, t.metric)
            wanted[t.metric] = t.value(dense)
            if wanted[t.metric] >= dense:
                raise ValueError(f"target_{t.metric}={t.absolute:g} is not below the model's "
                                 f"{dense:.0f} {t.metric}: nothing to prune")
    return wanted


@contextlib.contextmanager
def _budgeted(pruner: StructuredPruner, targets: List[Target], cm: CostModel):
    """``pruner`` planning to ``targets`` with no layer ratios, for the block only."""
    saved = pruner.targets, pruner.cost_model, pruner.layer_ratios
    pruner.targets, pruner.cost_model, pruner.layer_ratios = targets, cm, {}
    try:
        yield pruner
    finally:
        pruner.targets, pruner.cost_model, pruner.layer_ratios = saved


def _describe(wanted: Dict[str, float], cm: CostModel) -> str:
    return ", ".join(f"{m} {v / max(getattr(cm.dense, m), 1):.3f} of dense"
                     for m, v in wanted.items())


def _from_sensitivity(table: SensitivityTable, units: List[Unit], wanted: Dict[str, float],
                      cm: CostModel) -> Dict[str, float]:
    """An allocation from the sensitivity sweep: ratios rise, one grid step at a time, on the
    unit whose metric drops least per unit of cost saved, until the savings (added up unit
    by unit) reach the budget."""
    grid = [0.0] + list(table.ratios)
    need = sum(1 - v / max(getattr(cm.dense, m), 1) for m, v in wanted.items())
    level = {u.name: 0 for u in units}

    def drop(name: str, i: int) -> float:
        return 0.0 if i == 0 else max(0.0, table.dense - table.values[name][i - 1])

    def saving(name: str, i: int) -> float:
        if i == 0:
            return 0.0
        return sum(1 - (table.macs if m == "macs" else table.params)[name][i - 1]
                   for m in wanted)

    saved = 0.0
    while saved < need:
        best, best_rate = None, math.inf
        for u in units:
            i = level[u.name]
            if i + 1 >= len(grid):
                continue
            gain = saving(u.name, i + 1) - saving(u.name, i)
            if gain <= 0:
                continue
            rate = (drop(u.name, i + 1) - drop(u.name, i) + 1e-6) / gain
            if rate < best_rate:
                best, best_rate = u.name, rate
        if best is None:
            break
        saved += saving(best, level[best] + 1) - saving(best, level[best])
        level[best] += 1
    direction = {name: grid[i] for name, i in level.items()}
    if max(direction.values()) <= 0:
        return {u.name: 1.0 for u in units}
    return direction


def _from_ranking(pruner: StructuredPruner, cm: CostModel, units: List[Unit],
                  wanted: Dict[str, float]) -> Dict[str, float]:
    """The allocation the pruner's own budgeted ranking makes (``target_macs=...``), as
    per-unit ratios; uniform where that ranking cannot meet the budget."""
    try:
        with _budgeted(pruner, [Target(m, absolute=v) for m, v in wanted.items()], cm):
            plan = pruner.plan()
    except BudgetError:
        return {u.name: 1.0 for u in units}
    sizes = {g.id: g.size for g in pruner.graph.groups}
    out = {}
    for u in units:
        total = sum(sizes[g] for g in u.groups)
        gone = sum(len(plan.removals.get(g, ())) for g in u.groups)
        # half a channel more per group: floor(size * ratio) gives back the ranking's count
        out[u.name] = min(MAX_RATIO, (gone + 0.5 * len(u.groups)) / total) if gone else 0.0
    return out


def _mutate(direction: Dict[str, float], units: List[Unit],
            gen: torch.Generator) -> Dict[str, float]:
    """A few units' ratios moved up or down by 0.05 to 0.2 (the budget fit rescales all)."""
    out = dict(direction)
    names = [u.name for u in units]
    k = 1 + int(torch.randint(0, min(3, len(names)), (1,), generator=gen))
    for i in torch.randperm(len(names), generator=gen)[:k].tolist():
        step = [0.05, 0.1, 0.2][int(torch.randint(0, 3, (1,), generator=gen))]
        sign = 1 if bool(torch.randint(0, 2, (1,), generator=gen)) else -1
        out[names[i]] = min(MAX_RATIO, max(0.0, out.get(names[i], 0.0) + sign * step))
    return out
