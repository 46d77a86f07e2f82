"""Sensitivity analysis: how much a model's quality drops when one part of it alone is pruned.

For every *unit* (a channel group, a layer or a block) and every ratio, a copy of the model with
only that unit pruned is scored; the model itself is never changed. The table says which parts
can lose many channels and which cannot, and it feeds per-layer ratios (``layer_pruning_ratios``)
or a ratio search.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import numbers
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from ..core.runtime import (ForwardFn, find_submodule, iter_tensors, map_tensors, preserved_state,
                            run_forward)
from ..importance import Importance
from ..importance.stats import drop_padding, iterate_batches, model_inputs, padding_mask
from ..pruner import StructuredPruner
from ..pruner.attributes import attribute_updates
from ..pruner.keeps import layer_keeps
from ..utils.counting import count_macs, count_params
from ..utils.fidelity import output_tensor

logger = logging.getLogger(__name__)

UNIT_KINDS = ("group", "layer", "block")
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: pruner options a one-unit-at-a-time measurement cannot honour
_REJECTED = {"layer_pruning_ratios": "the ratios are set per unit by sensitivity",
             "pruning_ratio": "the ratios are set per unit by sensitivity (pass ratios=...)",
             "target_macs": "a budget is met by a search over ratios, not by sensitivity",
             "target_params": "a budget is met by a search over ratios, not by sensitivity",
             "target_latency": "a budget is met by a search over ratios, not by sensitivity"}
_LAYER_KINDS = ("out", "same", "internal")  # the members a layer-ratio key applies through
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
#: the most memory the dense blocks' outputs may take (see :class:`_Reference`)
_REPLAY_BYTES = 1 << 30


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
        if isinstance(find_submodule(model, ".".join(parts[:i - 1])), _CONTAINERS):
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
    Each point costs a copy of the model and a forward per batch; with the default metric the
    blocks that run before the unit's first pruned layer replay the dense model's outputs
    instead (decoder layers handed a key/value cache are not replayed: ``use_cache=False`` in
    the batches lets them be).
    """
    ratios = _check_ratios(ratios)
    if by not in UNIT_KINDS:
        raise ValueError(f"by must be one of {UNIT_KINDS}, got {by!r}")
    _check_options(pruner_options)
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

    inputs = pruner.example_inputs
    with preserved_state(model):  # the copies are measured in eval mode: the dense model too
        model.eval()
        dense_params = count_params(model)
        dense_macs = count_macs(model, inputs, forward_fn)
        if metric is None:
            reference = _Reference(model, batches, forward_fn)
            metric_name, dense = reference.name, reference.dense
        else:
            metric_name = getattr(metric, "__name__", "metric")
            dense = _checked(metric(model), "the dense model")
    units = prunable_units(pruner, by)

    values: Dict[str, List[float]] = {u.name: [] for u in units}
    params: Dict[str, List[float]] = {u.name: [] for u in units}
    macs: Dict[str, List[float]] = {u.name: [] for u in units}
    points = _Progress(len(units) * len(ratios), progress)
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
                                 reference.score(copy, _changed(pruner, plan)))
                    except Exception as exc:
                        raise RuntimeError(f"sensitivity: the model with {where} failed: "
                                           f"{type(exc).__name__}: {exc} (a layer that stores "
                                           f"a channel count of its own can go in "
                                           f"ignored_layers)") from exc
                    done[key] = (_checked(value, where), count_params(copy) / dense_params,
                                 count_macs(copy, inputs, forward_fn) / dense_macs
                                 if dense_macs else 1.0)
                for column, x in zip((values, params, macs), done[key]):
                    column[unit.name].append(x)
                points.update()
    finally:
        points.close()
        pruner.layer_ratios = {}
    return SensitivityTable(units, ratios, values, params, macs, dense, metric_name)


class _Reference:
    """The dense model's outputs on the kept batches, computed once (CPU, float32), and the
    default metric against them: top-1 agreement (2-D outputs) or mean cosine similarity.
    Models are run as they are: the caller puts them in eval mode.

    The dense pass also keeps what the model's blocks (children of the model and of its
    containers) returned, up to :data:`_REPLAY_BYTES`: a pruned copy replays the blocks that
    run entirely before its first changed layer instead of computing them again. They would
    compute exactly what the dense model did, so the metric is the same, about twice as fast
    over a sweep of all units. A block is replayed only if it ran once per forward, wrote into
    none of its inputs, and returned fresh tensors (no view of its inputs, no other objects).
    """

    def __init__(self, model: nn.Module, batches: List[Any], forward_fn: Optional[ForwardFn]):
        self.batches = [model_inputs(b) for b in batches]
        self.masks = [padding_mask(x) for x in self.batches]
        self.forward_fn = forward_fn
        self.calls: Dict[str, Tuple[int, int]] = {}  # module -> clock at its call's start, end
        self.kept: Dict[str, List[Any]] = {}  # block -> its outputs, one per batch
        self.batch = 0
        self.outputs = self._record(model)
        self.name = "agreement" if all(o.dim() == 2 for o in self.outputs) else "cosine"
        self.dense = self._compare(self.outputs)

    def score(self, model: nn.Module, changed: Iterable[str] = ("",)) -> float:
        """The metric of ``model`` (in eval mode) against the dense outputs; ``changed``: the
        layers (or parameters) where it differs from the dense model."""
        first = math.inf
        for name in changed:
            while name not in self.calls and name:
                name = name.rpartition(".")[0]
            first = min(first, self.calls.get(name, (0, 0))[0])
        replayed = {n: find_submodule(model, n) for n in self.kept if self.calls[n][1] < first}
        try:
            for name, m in replayed.items():
                m.forward = functools.partial(self._replay, name)
            return self._compare(self._outputs(model))
        finally:
            for m in replayed.values():
                m.__dict__.pop("forward", None)  # the class's forward again

    def _replay(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return map_tensors(self.kept[name][self.batch], torch.clone)

    @torch.no_grad()
    def _outputs(self, model: nn.Module) -> List[torch.Tensor]:
        p = next(model.parameters(), None)
        outs = []
        for self.batch, x in enumerate(self.batches):
            if p is not None:
                x = map_tensors(x, lambda t: t.to(p.device))
            outs.append(output_tensor(run_forward(model, x, self.forward_fn)).detach().float().cpu())
        return outs

    def _record(self, model: nn.Module) -> List[torch.Tensor]:
        """The dense outputs, with every module's call timed and the blocks' outputs kept."""
        recorder = _Recorder(model)
        p = next(model.parameters(), None)
        outs = []
        with recorder:
            for self.batch, x in enumerate(self.batches):
                recorder.start(self.batch)
                if p is not None:
                    x = map_tensors(x, lambda t: t.to(p.device))
                with torch.no_grad():
                    outs.append(output_tensor(run_forward(model, x, self.forward_fn))
                                .detach().float().cpu())
        self.calls, self.kept = recorder.calls, recorder.finish(len(self.batches))
        return outs

    def _compare(self, outputs: List[torch.Tensor]) -> float:
        same, cos, rows = 0, 0.0, 0
        for a, b, mask in zip(outputs, self.outputs, self.masks):
            if a.shape != b.shape:
                raise ValueError(f"the output's shape changed: {tuple(a.shape)} instead of "
                                 f"{tuple(b.shape)}")
            if self.name == "agreement":
                same += int((a.argmax(-1) == b.argmax(-1)).sum())
                rows += a.shape[0]
                continue
            a, _ = drop_padding(a, a.dim() - 1, mask)
            b, _ = drop_padding(b, b.dim() - 1, mask)
            a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
            cos += float(torch.nn.functional.cosine_similarity(a, b, dim=-1).double().sum())
            rows += a.shape[0]
        return (same if self.name == "agreement" else cos) / max(rows, 1)


class _Recorder:
    """Forward hooks on every module of a model, for the dense pass of :class:`_Reference`: the
    clock at the start and end of each module's first call, and a copy of what each block (a
    child of the model or of a container) returned on each batch, where it can be replayed."""

    def __init__(self, model: nn.Module) -> None:
        self.named = list(model.named_modules())
        self.blocks = {n for n, _ in self.named if n and ("." not in n or isinstance(
            find_submodule(model, n.rpartition(".")[0]), _CONTAINERS))}
        self.calls: Dict[str, Tuple[int, int]] = {}
        self.kept: Dict[str, List[Any]] = {}
        self.dropped: Set[str] = set()
        self.order: List[List[str]] = []  # per batch, the modules in the order calls start
        self.clock = self.size = self.batch = 0
        self.inputs: Dict[str, Optional[List[Tuple[torch.Tensor, int]]]] = {}
        #: id -> (tensor, its version, its copy): a block that returns what its last child
        #: returned (a Sequential) shares that child's copy
        self.copies: Dict[int, Tuple[torch.Tensor, int, torch.Tensor]] = {}
        self.handles: List[Any] = []

    def __enter__(self) -> "_Recorder":
        for name, m in self.named:
            self.handles.append(m.register_forward_pre_hook(
                functools.partial(self.before, name), with_kwargs=True))
            self.handles.append(m.register_forward_hook(
                functools.partial(self.after, name), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.copies.clear()

    def start(self, batch: int) -> None:
        self.batch = batch
        self.order.append([])
        self.copies.clear()

    def before(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.clock += 1
        self.order[-1].append(name)
        if self.batch == 0 and name not in self.calls:
            self.calls[name] = (self.clock, -1)
        if name in self.blocks:  # a block that holds other objects (a cache) may change them
            self.inputs[name] = ([(t, t._version) for t in iter_tensors((args, kwargs))]
                                 if _plain((args, kwargs)) else None)

    def after(self, name: str, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        self.clock += 1
        if self.batch == 0 and self.calls[name][1] < 0:
            self.calls[name] = (self.calls[name][0], self.clock)
        if name not in self.blocks or name in self.dropped:
            return
        inputs = self.inputs.pop(name, None)
        nbytes = sum(t.numel() * t.element_size() for t in iter_tensors(out)
                     if self._copied(t) is None)
        if len(self.kept.get(name, ())) != self.batch or self.size + nbytes > _REPLAY_BYTES \
                or inputs is None or not _replayable(out, inputs):
            self.dropped.add(name)
            return
        self.size += nbytes
        self.kept.setdefault(name, []).append(map_tensors(out, self._copy))

    def _copied(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        hit = self.copies.get(id(t))
        return hit[2] if hit is not None and hit[0] is t and hit[1] == t._version else None

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        c = self._copied(t)
        if c is None:
            c = t.detach().clone()
            self.copies[id(t)] = (t, t._version, c)
        return c

    def finish(self, batches: int) -> Dict[str, List[Any]]:
        """The replayable blocks' outputs: those that ran once on every batch, where every
        batch called the same modules in the same order."""
        if any(o != self.order[0] for o in self.order):  # the calls depend on the data
            return {}
        once = collections.Counter(self.order[0])
        return {n: o for n, o in self.kept.items() if n not in self.dropped
                and len(o) == batches and once[n] == 1}


def _replayable(out: Any, inputs: List[Tuple[torch.Tensor, int]]) -> bool:
    """Whether a block's output can stand for its call: tensors (in tuples and lists) that
    share no memory with each other or with the inputs, which the call did not write into."""
    if any(t._version != v for t, v in inputs) or not _plain(out):
        return False
    try:
        held = {t.untyped_storage().data_ptr() for t, _ in inputs}
        mine = [t.untyped_storage().data_ptr() for t in iter_tensors(out)]
    except (RuntimeError, NotImplementedError):  # tensors without plain storage
        return False
    return len(set(mine)) == len(mine) and not held.intersection(mine)


def _plain(obj: Any) -> bool:
    """Tensors, numbers, strings and None, in tuples, lists and dicts: nothing else."""
    if isinstance(obj, (list, tuple)):
        return all(_plain(o) for o in obj)
    if type(obj) is dict:
        return all(_plain(o) for o in obj.values())
    return obj is None or isinstance(obj, (torch.Tensor, bool, int, float, str))


def _changed(pruner: StructuredPruner, plan: Any) -> Set[str]:
    """The layers, parameters and attribute holders a copy made from ``plan`` changes."""
    keeps = layer_keeps(pruner.graph, plan.removals)
    return {k[0] for k in keeps} | {u[0] for u in attribute_updates(
        pruner.model, pruner.graph, plan.removals, keeps)}


def _checked(value: Any, where: str) -> float:
    """``value`` as a float, or a ValueError naming ``where`` if it is no finite number."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real) or isinstance(value, bool) \
            or not math.isfinite(float(value)):
        raise ValueError(f"sensitivity: the metric returned {value!r} for {where}; it must "
                         f"return a finite number (higher is better)")
    return float(value)


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


def _check_options(options: Dict[str, Any]) -> None:
    for name, why in _REJECTED.items():
        if name in options and options[name] is not None:
            raise ValueError(f"sensitivity does not take {name}: {why}")
    if options.get("iterative_steps", 1) != 1:
        raise ValueError(f"sensitivity prunes each unit in one step: iterative_steps must be 1, "
                         f"got {options['iterative_steps']!r}")
    if options.get("global_pruning", False):
        raise ValueError("sensitivity prunes one unit at a time: global_pruning=True would rank "
                         "channels across units")


class _Progress:
    """A tqdm bar over ``total`` points when asked for and installed, else a log line at
    about every tenth of the way."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.done, self.bar = total, enabled, 0, None
        self.every = max(1, math.ceil(total / 10))
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, desc="sensitivity", unit="point")
            except ImportError:
                self.bar = None

    def update(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled and (self.done % self.every == 0 or self.done == self.total):
            logger.info("sensitivity: %d/%d points", self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
