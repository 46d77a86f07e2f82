"""What a plan costs, read off the graph: parameters and MACs of the pruned model, known
without slicing or running it.

Built once from the dense model (one counted forward and a few shape probes per layer):

- **Parameters.** Each parameter dim is sliced by at most a few layer dims of the graph (a
  Linear's weight rows by its ``out`` dim, its columns by its ``in`` dim, an attention layer's
  ``in_proj`` rows by its heads). Each layer's pruner is run once or twice on a weightless
  (meta) copy of that layer to learn the law ``size = a * kept + b`` (``3 * kept`` for a packed
  q/k/v projection, ``kept / groups`` for a grouped conv's input). A parameter's size after a
  plan is then the product of its dims' sizes.
- **MACs.** Every counted product that reads a parameter (linear, conv, addmm; a recurrent
  layer's weights at every step) costs a fixed number of MACs per element of that parameter, as
  :func:`~cleanai.utils.count_macs` counts them, so it shrinks exactly with the parameter. The
  products between activations (attention scores ``q @ k^T``, ``attn @ v``) scale with the
  width of the projections that fed them: an attention layer's heads, or the outputs of the
  layers run just before inside the same module (BERT's ``query``/``key``/``value``, a fused
  ``qkv``).

The cost of a plan is a sum of such terms, so its derivative per channel of a group, the
channel's cost, is known too (:meth:`CostModel.channel_costs`); the budgeted pruner uses it to
skip channels whose removal saves nothing the budget counts.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..core.graph import DependencyGraph, Group
from ..core.layers import get_layer_pruner
from ..core.runtime import ForwardFn, find_submodule, iter_tensors, preserved_state, run_forward
from ..pruner.keeps import layer_keeps
from ..utils.counting import RecurrentMacs, no_fused_attention
from .probe import size_laws

Key = Tuple[str, str, int]  # a layer dim, as in :func:`cleanai.pruner.keeps.layer_keeps`

__all__ = ["Cost", "CostModel"]


@dataclasses.dataclass(frozen=True)
class Cost:
    """Parameters and multiply-accumulates of one forward pass (at the example inputs' size)."""

    macs: float
    params: float

    def fraction_of(self, dense: "Cost") -> "Cost":
        return Cost(self.macs / max(dense.macs, 1), self.params / max(dense.params, 1))


@dataclasses.dataclass
class _Dim:
    """One dim of a parameter: its dense size, and the layer dims that slice it, each with the
    law ``size = a * kept + b`` (``kept``: positions the layer dim keeps)."""

    size: int
    laws: List[Tuple[int, float, float]]  # (key index, a, b)


@dataclasses.dataclass
class _Param:
    name: str
    dims: List[_Dim]
    macs_per_element: float = 0.0  # MACs of one forward per element of this parameter


class CostModel:
    """Params and MACs of ``model`` after any plan on ``graph``, in closed form.

    Args:
        model: the model ``graph`` was built from, at its current widths.
        graph: its :class:`~cleanai.DependencyGraph` (a pruner's ``pruner.graph``).
        example_inputs: inputs whose forward is counted (default: the graph's). MACs grow with
            the batch size and sequence length of these inputs.
        forward_fn: as for :func:`~cleanai.utils.count_macs` (default: the graph's).

    ``evaluate(removals)`` gives the :class:`Cost` after removing ``removals`` (group id ->
    channel indices, as a :class:`~cleanai.PruningPlan` holds them) from the model as it is
    *now*: the model may have been pruned since the cost model was built, as long as the same
    ``graph`` followed it. ``channel_costs()`` gives each group's cost per channel.
    """

    def __init__(self, model: nn.Module, graph: DependencyGraph, example_inputs: Any = None,
                 forward_fn: Optional[ForwardFn] = None) -> None:
        self.graph = graph
        inputs = graph.example_inputs if example_inputs is None else example_inputs
        fn = graph.forward_fn if forward_fn is None else forward_fn
        self.keys: List[Key] = []
        self.key_index: Dict[Key, int] = {}
        lengths: List[int] = []
        for g in graph.groups:
            for m in g.members:
                key = _key(m)
                if key not in self.key_index:
                    self.key_index[key] = len(self.keys)
                    self.keys.append(key)
                    lengths.append(m.length)
        self.dense_lengths = torch.tensor(lengths, dtype=torch.float64)
        self.params: List[_Param] = []
        by_id: Dict[int, _Param] = {}
        for name, p in model.named_parameters():
            entry = _Param(name, [_Dim(int(s), []) for s in p.shape])
            by_id[id(p)] = entry
            self.params.append(entry)
        self._probe_layers(model, by_id)
        self.residual: List[Tuple[float, List[int]]] = []  # (MACs, proxy key indices)
        self._count(model, inputs, fn, by_id)
        self.dense = self.evaluate({})

    # --- building ----------------------------------------------------------------------

    def _probe_layers(self, model: nn.Module, by_id: Dict[int, _Param]) -> None:
        """Learn which parameter dims each layer dim slices, and how."""
        layers: Dict[str, List[Tuple[int, Key]]] = {}
        for i, key in enumerate(self.keys):
            name, kind, dim = key
            if kind == "param":
                owner_name, _, leaf = name.rpartition(".")
                if leaf in model.get_submodule(owner_name)._parameters:  # a buffer costs none
                    owner = model.get_parameter(name)
                    by_id[id(owner)].dims[dim].laws.append((i, 1.0, 0.0))
            else:
                layers.setdefault(name, []).append((i, key))
        for name, keys in layers.items():
            module = find_submodule(model, name)
            pruner = get_layer_pruner(module, inherited=True)
            if pruner is None:
                continue
            params = {n: p for n, p in module.named_parameters()}
            for i, key in keys:
                length = int(self.dense_lengths[i])
                for pname, dim, a, b in size_laws(module, pruner, key, length):
                    by_id[id(params[pname])].dims[dim].laws.append((i, a, b))

    def _count(self, model: nn.Module, inputs: Any, fn: Optional[ForwardFn],
               by_id: Dict[int, _Param]) -> None:
        """One counted forward: each product's MACs, tied to the parameter it reads, or to the
        layer dims whose width it scales with."""
        storages = {}
        for p in model.parameters():
            storages[p.untyped_storage().data_ptr()] = by_id[id(p)]
        internal: Dict[str, List[int]] = {}
        outs: Dict[str, int] = {}
        for i, (name, kind, dim) in enumerate(self.keys):
            if kind == "internal" and dim <= 1:
                internal.setdefault(name, []).append(i)
            elif kind == "out":
                outs[name] = i
        owner_layer = {}  # id(param entry) -> the "out" key index of its layer
        for name, i in outs.items():
            for p in find_submodule(model, name).parameters(recurse=False):
                owner_layer[id(by_id[id(p)])] = i
        recorder = _Recorder(storages)
        stack: List[Tuple[nn.Module, List[int]]] = []  # module, out keys of products run inside
        modules = {m: n for n, m in model.named_modules()}
        recurrent = {m for m in modules if isinstance(m, (nn.RNNBase, nn.RNNCellBase))}
        handles = []

        def enter(module, args):
            stack.append((module, []))

        def leave(module, args, output):
            if stack and stack[-1][0] is module:
                done = stack.pop()[1]
                if stack:
                    stack[-1][1].extend(done)

        def on_op(macs: float, entries: List[_Param]) -> None:
            if any(m in recurrent for m, _ in stack):
                return  # counted per weight by RecurrentMacs
            if entries:  # the weight, not the bias an addmm also reads
                p = max(entries, key=lambda e: math.prod(d.size for d in e.dims))
                p.macs_per_element += macs / max(1, math.prod(d.size for d in p.dims))
                if stack and id(p) in owner_layer:
                    stack[-1][1].append(owner_layer[id(p)])
                return
            proxy: List[int] = []
            for module, seen in reversed(stack):
                name = modules.get(module)
                if name in internal:
                    proxy = internal[name]
                    break
                if seen:
                    proxy = sorted(set(seen))
                    break
            self.residual.append((macs, proxy))

        recorder.on_op = on_op
        for m in modules:
            handles.append(m.register_forward_pre_hook(enter))
            handles.append(m.register_forward_hook(leave))
        try:
            with preserved_state(model, same_modes=True), torch.no_grad(), \
                    RecurrentMacs(model, recorder) as rec, no_fused_attention():
                with recorder:
                    run_forward(model, inputs, fn)
        finally:
            for h in handles:
                h.remove()
        for name, macs in rec.macs.items():
            weights = [by_id[id(p)] for n, p in find_submodule(model, name).named_parameters(
                recurse=False) if n.startswith("weight_")]
            total = sum(math.prod(d.size for d in w.dims) for w in weights)
            for w in weights:
                w.macs_per_element += macs / max(1, total)

    # --- reading -----------------------------------------------------------------------

    def lengths(self) -> torch.Tensor:
        """Each layer dim's current length (the graph follows every applied step)."""
        out = self.dense_lengths.clone()
        for g in self.graph.groups:
            for m in g.members:
                i = self.key_index.get(_key(m))
                if i is not None:
                    out[i] = m.length
        return out

    def kept(self, removals: Dict[int, torch.Tensor]) -> torch.Tensor:
        """Each layer dim's length once ``removals`` are gone from the current model."""
        out = self.lengths()
        clean = {int(g): torch.as_tensor(idx, dtype=torch.long).flatten()
                 for g, idx in removals.items() if len(idx)}
        if clean:
            for key, keep in layer_keeps(self.graph, clean).items():
                i = self.key_index.get(key)  # (a "same" layer's "in" twin is not a key)
                if i is not None:
                    out[i] = keep.shape[0]
        return out

    def evaluate(self, removals: Optional[Dict[int, torch.Tensor]] = None) -> Cost:
        """The :class:`Cost` of the current model with ``removals`` applied."""
        kept = self.kept(removals or {})
        return self.cost_at(kept)

    def cost_at(self, kept: torch.Tensor) -> Cost:
        """The :class:`Cost` when layer dim ``i`` keeps ``kept[i]`` positions."""
        params = macs = 0.0
        for p in self.params:
            n = 1.0
            for d in p.dims:
                n *= _size(d, kept)
            params += n
            macs += p.macs_per_element * n
        frac = kept / self.dense_lengths.clamp(min=1)
        for m, proxy in self.residual:
            macs += m * (float(frac[proxy].mean()) if proxy else 1.0)
        return Cost(macs, params)

    def channel_costs(self, removals: Optional[Dict[int, torch.Tensor]] = None,
                      groups: Optional[Sequence[Group]] = None) -> Dict[int, Cost]:
        """Per group id: what removing one more channel saves, at the widths ``removals``
        leave (the derivative of :meth:`evaluate`)."""
        kept = self.kept(removals or {})
        grad_p = torch.zeros(len(self.keys), dtype=torch.float64)
        grad_m = torch.zeros(len(self.keys), dtype=torch.float64)
        for p in self.params:
            sizes = [_size(d, kept) for d in p.dims]
            for j, d in enumerate(p.dims):
                if not d.laws:
                    continue
                rest = math.prod(s for k, s in enumerate(sizes) if k != j)
                for i, a, b in d.laws:
                    law = _law(a, b, kept[i])  # d size / d kept = a * size / law
                    scale = sizes[j] / law if law else 0.0
                    grad_p[i] += rest * a * scale
                    grad_m[i] += p.macs_per_element * rest * a * scale
        dense = self.dense_lengths.clamp(min=1)
        for m, proxy in self.residual:
            for i in proxy:
                grad_m[i] += m / (len(proxy) * float(dense[i]))
        out = {}
        for g in (groups if groups is not None else self.graph.groups):
            macs = params = 0.0
            for m in g.members:
                i = self.key_index.get(_key(m))
                if i is None:
                    continue
                share = m.positions.shape[0] / max(1, g.size)
                macs += share * float(grad_m[i])
                params += share * float(grad_p[i])
            out[g.id] = Cost(macs, params)
        return out


def _key(m) -> Key:
    return (m.name, "out" if m.kind == "same" else m.kind, m.dim)


def _law(a: float, b: float, kept: Any) -> float:
    return a * float(kept) + b


def _size(d: _Dim, kept: torch.Tensor) -> float:
    if not d.laws:
        return float(d.size)
    if len(d.laws) == 1:
        i, a, b = d.laws[0]
        return _law(a, b, kept[i])
    size = float(d.size)
    for i, a, b in d.laws:
        size *= _law(a, b, kept[i]) / d.size
    return size


class _Recorder(FlopCounterMode):
    """A ``FlopCounterMode`` that also reports each counted product, with the parameters it
    reads (found by storage), to ``on_op(macs, params)``."""

    def __init__(self, storages: Dict[int, _Param]) -> None:
        super().__init__(display=False)
        self.storages = storages
        self.on_op = lambda macs, params: None

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet in self.flop_registry:
            flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            read = []
            for t in iter_tensors((args, kwargs)):
                entry = self.storages.get(t.untyped_storage().data_ptr()) \
                    if t.device.type != "meta" else None
                if entry is not None and entry not in read:
                    read.append(entry)
            self.on_op(flops / 2, read)
        return super()._count_flops(func_packet, out, args, kwargs)
