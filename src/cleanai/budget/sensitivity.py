"""Sensitivity analysis: how much a model's quality drops when one part of it alone is pruned.

For every *unit* (a channel group, a layer or a block) and every ratio, a copy of the model with
only that unit pruned is scored; the model itself is never changed. The table says which parts
can lose many channels and which cannot, and it feeds per-layer ratios (``layer_pruning_ratios``)
or a ratio search.
"""
from __future__ import annotations

import dataclasses
import numbers
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

from torch import nn

from ..core.runtime import ForwardFn, find_submodule, preserved_state
from ..importance import Importance
from ..importance.stats import iterate_batches
from ..pruner import StructuredPruner
from .cost import CostModel
from .measure import CONTAINERS, Progress, Reference, changed_layers, check_pruner_options, \
    checked_metric

UNIT_KINDS = ("group", "layer", "block")
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_LAYER_KINDS = ("out", "same", "internal")  # the members a layer-ratio key applies through


@dataclasses.dataclass
class Unit:
    """A part of the model pruned as one: ``name`` is a module name usable as a
    ``layer_pruning_ratios`` key, ``groups`` the ids of the channel groups that key prunes."""

    name: str
    groups: List[int]


def prunable_units(pruner: StructuredPruner, by: str = "group") -> List[Unit]:
    """The units of ``pruner``'s model that can lose channels, such that ``{unit.name: r}`` as
    the only layer ratio prunes exactly ``unit.groups`` (ignored layers and excluded kinds
    respected). Units that would prune the same groups as an earlier one are left out.

    ``by="group"``: one unit per group (named after a member layer that reaches no other
    group, an ``"out"`` one and the shortest name preferred; when every member also reaches
    other groups, the unit covers all the groups of the member that reaches fewest).
    ``by="layer"``: one per layer that produces channels. ``by="block"``: one per block, the
    outermost module whose parent is an ``nn.Sequential``, ``nn.ModuleList`` or
    ``nn.ModuleDict`` (resnet ``layer1.0``, BERT ``encoder.layer.0``); a layer outside any such
    container is its own block. Layer and block units come in the model's module order.
    """
    if by not in UNIT_KINDS:
        raise ValueError(f"by must be one of {UNIT_KINDS}, got {by!r}")
    groups = [g for g in pruner.graph.groups
              if g.prunable > 0 and g.size > 1 and pruner.group_ratio(g) is not None]
    reach: Dict[str, Set[int]] = {}  # key -> the candidate groups a ratio on that key prunes
    for g in groups:
        for m in g.members:
            if m.kind in _LAYER_KINDS:
                parts = m.name.split(".") if m.name else []
                for i in range(len(parts) + 1):
                    reach.setdefault(".".join(parts[:i]), set()).add(g.id)
    units: List[Unit] = []
    seen: Set[frozenset] = set()

    def add(name: str) -> None:
        ids = frozenset(reach[name])
        if ids not in seen:
            seen.add(ids)
            units.append(Unit(name, sorted(ids)))

    if by == "group":
        for g in groups:
            kinds: Dict[str, bool] = {}  # member name -> whether it is an "out" member
            for m in g.members:
                if m.kind in _LAYER_KINDS:
                    kinds[m.name] = kinds.get(m.name, False) or m.kind == "out"
            order = {n: i for i, n in enumerate(kinds)}
            alone = [n for n in kinds if reach[n] == {g.id}]
            pick = (min(alone, key=lambda n: (not kinds[n], len(n), order[n])) if alone else
                    min(kinds, key=lambda n: (len(reach[n]), not kinds[n], len(n), order[n])))
            add(pick)
        return units
    position = {n: i for i, (n, _) in enumerate(pruner.model.named_modules(remove_duplicate=False))}
    layers = {m.name for g in groups for m in g.members if m.kind in ("out", "internal")}
    names = layers if by == "layer" else {_block_of(pruner.model, n) for n in layers}
    for name in sorted(names, key=lambda n: (position.get(n, len(position)), n)):
        add(name)
    return units


def _block_of(model: nn.Module, name: str) -> str:
    """The outermost module on ``name``'s path whose parent is a container of blocks."""
    parts = name.split(".") if name else []
    for i in range(1, len(parts) + 1):
        if isinstance(find_submodule(model, ".".join(parts[:i - 1])), CONTAINERS):
            return ".".join(parts[:i])
    return name


@dataclasses.dataclass
class SensitivityTable:
    """What :func:`sensitivity` measured: per unit and ratio, the metric of the model with only
    that unit pruned (``values``) and the fraction of the dense parameters and MACs it keeps
    (``params``, ``macs``); ``dense`` is the metric of the unpruned model."""

    units: List[Unit]
    ratios: List[float]
    values: Dict[str, List[float]]
    params: Dict[str, List[float]]
    macs: Dict[str, List[float]]
    dense: float
    metric_name: str

    def _reference(self) -> int:
        """Index of the ratio closest to 0.5, the one the size columns describe."""
        return min(range(len(self.ratios)), key=lambda i: (abs(self.ratios[i] - 0.5), i))

    def to_markdown(self, decimals: int = 3) -> str:
        """A markdown table: one row per unit, one column per ratio, and how much of the dense
        MACs and parameters pruning that unit at the ratio nearest 0.5 saves."""
        ref = self._reference()
        r = f"{self.ratios[ref]:g}"
        head = ["unit"] + [f"{x:g}" for x in self.ratios] + [f"MACs saved @{r}",
                                                             f"params saved @{r}"]
        rows = [head, ["---"] + ["---:"] * (len(head) - 1)]
        for u in self.units:
            rows.append([u.name or "(model)"] + [f"{v:.{decimals}f}" for v in self.values[u.name]]
                        + [f"{100 * (1 - self.macs[u.name][ref]):.1f}%",
                           f"{100 * (1 - self.params[u.name][ref]):.1f}%"])
        lines = [f"Sensitivity of {self.metric_name} (dense: {self.dense:.{decimals}f}), "
                 f"one unit pruned at a time", ""]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def to_dict(self) -> Dict[str, Any]:
        """The table as plain lists and numbers (``json.dumps`` takes it)."""
        return {"metric": self.metric_name, "dense": self.dense, "ratios": list(self.ratios),
                "units": [{"name": u.name, "groups": list(u.groups),
                           "values": list(self.values[u.name]),
                           "params": list(self.params[u.name]),
                           "macs": list(self.macs[u.name])} for u in self.units]}

    def plot(self, path: Union[str, Path]) -> Path:
        """Save a picture to ``path``: the metric against the ratio, one line per unit, the
        dense value dashed. Needs matplotlib."""
        try:
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError("SensitivityTable.plot needs matplotlib: pip install matplotlib") \
                from exc
        fig = Figure(figsize=(8, 5))
        ax = fig.add_subplot()
        for u in self.units:
            ax.plot(self.ratios, self.values[u.name], marker="o", markersize=3,
                    label=u.name or "(model)")
        ax.axhline(self.dense, color="gray", linestyle="--", linewidth=1, label="dense")
        ax.set_xlabel("pruning ratio of the unit")
        ax.set_ylabel(self.metric_name)
        ax.set_title("Sensitivity: one unit pruned at a time")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", ncol=1 + len(self.units) // 16,
                  loc="center left", bbox_to_anchor=(1.01, 0.5))
        path = Path(path)
        fig.savefig(path, bbox_inches="tight", dpi=120)
        return path


def sensitivity(model: nn.Module, example_inputs: Any, data: Optional[Iterable], *,
                metric: Optional[Callable[[nn.Module], float]] = None,
                ratios: Sequence[float] = DEFAULT_RATIOS, by: str = "group",
                importance: Optional[Importance] = None, compensate: Optional[str] = None,
                max_batches: int = 8, forward_fn: Optional[ForwardFn] = None,
                progress: bool = True, **pruner_options: Any) -> SensitivityTable:
    """Prune each unit of ``model`` alone at each of ``ratios`` (on a copy) and measure it.

    Args:
        model: the model; it is never changed.
        example_inputs: inputs for one forward pass (tracing, MAC counts), as for
            :class:`~cleanai.StructuredPruner`.
        data: batches as :meth:`StructuredPruner.calibrate` takes them; the first
            ``max_batches`` are kept and used for calibration and for the default metric.
            Needed unless ``metric`` is given and neither ``importance`` nor ``compensate``
            needs data.
        metric: ``metric(model) -> float``, higher is better (e.g. validation accuracy), called
            with the model in eval mode, once on the dense model. ``None``: agreement with the
            dense model's outputs on ``data``, no labels needed: top-1 agreement for 2-D
            outputs (classifiers), else the mean cosine similarity over the last dim (padded
            tokens left out).
        ratios: the ratios to try, each in (0, 1); sorted, duplicates dropped.
        by: the units, ``"group"``, ``"layer"`` or ``"block"`` (see :func:`prunable_units`).
        importance, compensate, forward_fn, **pruner_options: as for
            :class:`~cleanai.StructuredPruner` (one is built; ``ignored_layers``, ``kinds``,
            ``round_to``... apply). Ratio and budget options are rejected.
        progress: a tqdm bar over the points when tqdm is installed (log lines otherwise).

    A point whose plan removes nothing (a group too small for the ratio) gets the dense value.
    Each point costs a copy of the model and a forward per batch (its size is read off its plan
    by a :class:`~cleanai.budget.CostModel`); with the default metric the blocks that run
    before the unit's first pruned layer replay the dense model's outputs instead (decoder
    layers handed a key/value cache are not replayed: ``use_cache=False`` in the batches lets
    them be).
    """
    ratios = _check_ratios(ratios)
    if by not in UNIT_KINDS:
        raise ValueError(f"by must be one of {UNIT_KINDS}, got {by!r}")
    check_pruner_options(pruner_options)
    if metric is not None and not callable(metric):
        raise TypeError(f"metric must be callable, metric(model) -> float, got "
                        f"{type(metric).__name__}")
    if not isinstance(max_batches, int) or isinstance(max_batches, bool) or max_batches < 1:
        raise ValueError(f"max_batches must be a positive int, got {max_batches!r}")
    calibrating = compensate is not None or bool(getattr(importance, "requires_data", False))
    if data is None and (metric is None or calibrating):
        why = ("the default metric compares outputs on it" if metric is None else
               "compensate needs calibration statistics" if compensate is not None else
               f"{type(importance).__name__} scores channels from data")
        raise ValueError(f"sensitivity needs data: {why}; pass a DataLoader or a list of "
                         f"batches (or a metric, with a data-free importance)")

    pruner = StructuredPruner(model, example_inputs, importance=importance, pruning_ratio=0.0,
                              compensate=compensate, forward_fn=forward_fn, **pruner_options)
    batches: List[Any] = []
    if metric is None or calibrating:  # kept: shuffled loaders and generators give them once
        batches = list(iterate_batches(data, max_batches, progress=False))
        if not batches:
            raise ValueError("sensitivity: data yielded no batches")
    if calibrating:
        pruner.calibrate(batches, max_batches=max_batches, forward_fn=forward_fn)

    with preserved_state(model):  # the copies are measured in eval mode: the dense model too
        model.eval()
        cm = CostModel(model, pruner.graph)  # a point's size, read off its plan
        if metric is None:
            reference = Reference(model, batches, forward_fn)
            metric_name, dense = reference.name, reference.dense
        else:
            metric_name = getattr(metric, "__name__", "metric")
            dense = checked_metric(metric(model), "the dense model")
    units = prunable_units(pruner, by)

    values: Dict[str, List[float]] = {u.name: [] for u in units}
    params: Dict[str, List[float]] = {u.name: [] for u in units}
    macs: Dict[str, List[float]] = {u.name: [] for u in units}
    points = Progress(len(units) * len(ratios), progress)
    try:
        for unit in units:
            done: Dict[Tuple, Tuple[float, float, float]] = {(): (dense, 1.0, 1.0)}  # by plan
            for r in ratios:
                pruner.layer_ratios = {unit.name: r}
                plan = pruner.plan()
                key = tuple((g, tuple(idx.tolist())) for g, idx in sorted(plan.removals.items())
                            if len(idx))
                if key not in done:
                    copy = pruner.pruned_copy(plan).eval()
                    where = f"unit {unit.name!r} at ratio {r}"
                    try:
                        value = (metric(copy) if metric is not None else
                                 reference.score(copy, changed_layers(pruner, plan)))
                    except Exception as exc:
                        raise RuntimeError(f"sensitivity: the model with {where} failed: "
                                           f"{type(exc).__name__}: {exc} (a layer that stores "
                                           f"a channel count of its own can go in "
                                           f"ignored_layers)") from exc
                    cost = cm.evaluate(plan.removals)
                    done[key] = (checked_metric(value, where), cost.params / cm.dense.params,
                                 cost.macs / cm.dense.macs if cm.dense.macs else 1.0)
                for column, x in zip((values, params, macs), done[key]):
                    column[unit.name].append(x)
                points.update()
    finally:
        points.close()
        pruner.layer_ratios = {}
    return SensitivityTable(units, ratios, values, params, macs, dense, metric_name)




def _check_ratios(ratios: Any) -> List[float]:
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Iterable):
        raise ValueError(f"ratios must be a sequence of numbers in (0, 1), got {ratios!r}")
    ratios = list(ratios)
    bad = [r for r in ratios if not isinstance(r, numbers.Real) or isinstance(r, bool)
           or not 0 < r < 1]
    if not ratios or bad:
        raise ValueError(f"ratios must be a non-empty sequence of numbers in (0, 1), got "
                         f"{ratios!r}" + (f" ({bad[0]!r} is not)" if bad else ""))
    return sorted({float(r) for r in ratios})
