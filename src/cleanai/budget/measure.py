"""Measuring pruned copies of a model against the dense one, for
:func:`~cleanai.budget.sensitivity` and :func:`~cleanai.budget.search_ratios`.

:class:`Reference` keeps the dense model's outputs on a few batches and scores a copy against
them (replaying the dense blocks that run before the copy's first changed layer);
:func:`changed_layers` says where a copy differs; :func:`checked_metric` and
:func:`check_pruner_options` turn bad values and options into errors that say what to do;
:class:`Progress` reports how far a sweep is.
"""
from __future__ import annotations

import collections
import functools
import logging
import math
import numbers
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

import torch
from torch import nn

from ..core.runtime import ForwardFn, find_submodule, iter_tensors, map_tensors, run_forward
from ..importance.stats import drop_padding, model_inputs, padding_mask
from ..pruner import StructuredPruner
from ..pruner.attributes import attribute_updates
from ..pruner.keeps import layer_keeps
from ..utils.fidelity import output_tensor

__all__ = ["Reference", "Progress", "changed_layers", "checked_metric", "check_pruner_options",
           "CONTAINERS"]

logger = logging.getLogger(__name__)

#: the modules whose children are blocks (resnet ``layer1.0``, BERT ``encoder.layer.0``)
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
#: the most memory the dense blocks' outputs may take (see :class:`Reference`)
_REPLAY_BYTES = 1 << 30
#: pruner options a one-unit-at-a-time measurement cannot honour
_REJECTED = {"layer_pruning_ratios": "the ratios are set per unit by sensitivity",
             "pruning_ratio": "the ratios are set per unit by sensitivity (pass ratios=...)",
             "target_macs": "a budget is met by a search over ratios, not by sensitivity",
             "target_params": "a budget is met by a search over ratios, not by sensitivity",
             "target_latency": "a budget is met by a search over ratios, not by sensitivity",
             "allocation": "the ratios are set per unit by the sweep or the search, not by an "
                           "allocation"}


class Reference:
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
    """Forward hooks on every module of a model, for the dense pass of :class:`Reference`: the
    clock at the start and end of each module's first call, and a copy of what each block (a
    child of the model or of a container) returned on each batch, where it can be replayed."""

    def __init__(self, model: nn.Module) -> None:
        self.named = list(model.named_modules())
        self.blocks = {n for n, _ in self.named if n and ("." not in n or isinstance(
            find_submodule(model, n.rpartition(".")[0]), CONTAINERS))}
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


def changed_layers(pruner: StructuredPruner, plan: Any) -> Set[str]:
    """The layers, parameters and attribute holders a copy made from ``plan`` changes."""
    keeps = layer_keeps(pruner.graph, plan.removals)
    return {k[0] for k in keeps} | {u[0] for u in attribute_updates(
        pruner.model, pruner.graph, plan.removals, keeps)}


def checked_metric(value: Any, where: str) -> float:
    """``value`` as a float, or a ValueError naming ``where`` if it is no finite number."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real) or isinstance(value, bool) \
            or not math.isfinite(float(value)):
        raise ValueError(f"sensitivity: the metric returned {value!r} for {where}; it must "
                         f"return a finite number (higher is better)")
    return float(value)


def check_pruner_options(options: Dict[str, Any]) -> None:
    """A ValueError for pruner options that pruning one unit (or one allocation) at a time
    cannot honour: global ratios and budgets, several steps, global ranking."""
    for name, why in _REJECTED.items():
        if name in options and options[name] is not None:
            raise ValueError(f"sensitivity does not take {name}: {why}")
    if options.get("iterative_steps", 1) != 1:
        raise ValueError(f"sensitivity prunes each unit in one step: iterative_steps must be 1, "
                         f"got {options['iterative_steps']!r}")
    if options.get("global_pruning", False):
        raise ValueError("sensitivity prunes one unit at a time: global_pruning=True would rank "
                         "channels across units")


class Progress:
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
        """One more point done."""
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled and (self.done % self.every == 0 or self.done == self.total):
            logger.info("sensitivity: %d/%d points", self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
