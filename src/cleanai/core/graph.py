"""DependencyGraph: which channels of which layers must be removed together."""
from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Mapping
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from .groups import Group, build_groups
from .layers import get_layer_pruner
from .runtime import ForwardFn, find_submodule, map_tensors
from .trace import trace
from .trace_result import resolve_edges


class DependencyGraph:
    """The channel dependencies of a model, traced once through autograd.

    Args:
        model: any ``nn.Module``; it is run once and left exactly as it was.
        example_inputs: a tensor, a tuple (passed positionally) or a dict (passed as keywords).
        forward_fn: optional ``forward_fn(model, example_inputs) -> outputs`` for models that
            need a custom call.
        attention: what a split of a feature dim into ``[heads, head_dim]`` (multi-head
            attention) makes removable: ``"heads"`` (default; whole heads go, ``head_dim``
            stays) or ``"head_dims"`` (the same dims leave every head; the head count stays).

    A model built on the meta device (``with torch.device("meta"): model = Net()``) is
    traced for its shapes alone, its weights never materialised: the example inputs are moved
    to the meta device, and its forward must not read tensor values (``Tensor.item()``, a
    branch on the data); see :func:`cleanai.prune_checkpoint`.

    ``graph.groups`` lists the :class:`Group` objects; ``graph.group_of(layer)`` finds the
    groups a layer belongs to; ``print(graph)`` shows them; ``graph.to_dot()`` draws the layers.
    ``graph.check_reason`` says why a pruned forward could still fail on a channel count the
    graph cannot see (the first call outside the known layers that reads a shape or takes
    sizes, such as ``Tensor.shape`` or ``view()``; a forward hook; a custom layer), or is
    ``None`` when all code outside the known layers is width-free: the pruner then skips
    its check forward (see ``check_forward``; a heuristic, see :mod:`cleanai.core.widths`).
    """

    def __init__(self, model: nn.Module, example_inputs: Any,
                 forward_fn: Optional[ForwardFn] = None, attention: str = "heads") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model_name = type(model).__name__
        example_inputs = on_meta(model, example_inputs)
        self.example_inputs = example_inputs
        self.forward_fn = forward_fn
        self.attention = attention
        result = trace(model, example_inputs, forward_fn, attention)
        # weak references: a graph (or a plan holding it) never keeps a deleted model's
        # layers and weights alive; the pruner holds the model itself
        self._model = weakref.ref(model)
        self._modules = {n: weakref.ref(m) for n, m in result.modules.items()}
        self._edges = (result.edges, result.junctions)
        self.groups: List[Group] = build_groups(result)
        _set_multiples(self.groups, result.modules)
        #: splits by sizes a module stores as integer attributes: (layer split, module, the
        #: attribute of each part or None, the sizes at trace time); see
        #: pruner/attributes.py, which keeps those attributes in step
        self.split_attributes = result.attr_splits
        self.norm_groups = result.norm_groups
        #: ``[layer, dim, start, end]`` of each slice taken of a layer's whole output, at the
        #: model's present widths: every pruned forward checks that they follow
        #: (pruner/slices.py)
        self.slices: List[List[Any]] = [list(s) for s in result.slices]
        self.check_reason: Optional[str] = result.check_reason
        if self.slices and self.check_reason is None:
            self.check_reason = "a slice of a layer's output at bounds the code computes"
        #: ``"name[dim]"`` of each bare parameter dim a matrix product contracts (``x @ W``
        #: reads its group's channels through ``W[0]``, as a layer's input does)
        self.parameter_reads = frozenset(result.param_read)
        self._code = result.code  # hooks and instance forwards the trace saw
        self.signature = module_signature(model)

    def __getstate__(self) -> Dict[str, Any]:
        # copies and pickles hold the model strongly, so copy.deepcopy(pruner) gives a pruner
        # whose graph refers to the copied model
        state = dict(self.__dict__)
        state["_model"] = self._model()
        state["_modules"] = {n: ref() for n, ref in self._modules.items()}
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        model = state["_model"]
        self._model = weakref.ref(model) if model is not None else (lambda: None)
        self._modules = {n: (weakref.ref(m) if m is not None else (lambda: None))
                         for n, m in state["_modules"].items()}

    @property
    def modules(self) -> "Mapping[str, nn.Module]":
        """The traced layers by qualified name (those with a LayerPruner), in model order.

        The graph refers to the model weakly: reading a layer raises ``ReferenceError`` once
        the model has been garbage collected.
        """
        return _WeakModules(self._modules, self.model_name)

    @property
    def edges(self) -> List[Tuple[str, str]]:
        """``(source, layer)`` pairs, sorted: ``layer`` reads the output of layer or parameter
        ``source``, directly or through ops. Computed on first use."""
        if isinstance(self._edges, tuple):
            self._edges = resolve_edges(*self._edges)
        return self._edges

    def changes(self, model: nn.Module) -> Optional[str]:
        """What differs between ``model`` and the model the graph was traced on (parameter
        shapes, or a traced layer replaced or moved), or ``None`` when it is the same."""
        if self._model() is not model:
            return f"it is not the {self.model_name} the graph was built for"
        named = list(model.named_modules())
        if _signature(named) != self.signature:
            return "parameter shapes differ"
        by_name = dict(named)  # a layer reached by a second path is looked up by that path
        for name, ref in self._modules.items():
            now = by_name.get(name)
            if now is None:
                try:
                    now = find_submodule(model, name)
                except AttributeError:
                    return f"it has no layer {name} any more"
            if now is not ref():
                return f"{name} is not the module that was traced"
        return None

    def group_of(self, layer: Union[str, nn.Module]) -> List[Group]:
        """Groups that hold ``layer``'s channels (by qualified name or module object)."""
        name = layer if isinstance(layer, str) else next(
            (n for n, m in self.modules.items() if m is layer), None)
        if name is None or (name not in self._modules and not any(
                m.name == name for g in self.groups for m in g.members)):
            raise KeyError(f"{layer!r} is not a layer that CleanAI traced in {self.model_name}")
        return [g for g in self.groups if any(m.name == name for m in g.members)]

    def check(self) -> None:
        """Raise ``AssertionError`` unless every member agrees with its group's channel count."""
        for g in self.groups:
            assert len(g.protected) == g.size
            for m in g.members:
                assert len(m.positions) == len(m.channels)
                assert int(m.positions.max()) < m.length and int(m.positions.min()) >= 0
                assert int(m.channels.max()) < g.size
                # a member may hold some of the group's channels, some at several positions
                # (a grouped conv ties a concat's parts); a position holds one channel
                assert len(torch.unique(m.positions)) == len(m.positions), \
                    f"{m.name}: a position in two channels"

    def __repr__(self) -> str:
        n_prot = sum(int(g.protected.sum()) for g in self.groups)
        head = (f"DependencyGraph({self.model_name}: {len(self._modules)} layers, "
                f"{len(self.groups)} groups, {sum(g.size for g in self.groups)} channels, "
                f"{n_prot} protected)")
        return "\n".join([head] + [repr(g) for g in self.groups])

    def to_dot(self) -> str:
        """The layer graph as Graphviz DOT text; nodes show each layer's output group."""
        out_group = {}
        for g in self.groups:
            for m in g.members:
                if m.kind == "out":
                    out_group.setdefault(m.name, g.id)
        lines = ["digraph cleanai {", "  rankdir=TB;", "  node [shape=box, fontsize=10];"]
        names = list(self.modules) + sorted({s for s, _ in self.edges if s not in self.modules})
        for name in names:
            mod = self.modules.get(name)
            kind = type(mod).__name__ if mod is not None else "Parameter"
            label = f"{name}\\n{kind}"
            if name in out_group:
                label += f"\\ngroup {out_group[name]}"
            lines.append(f'  "{name}" [label="{label}"];')
        for a, b in self.edges:
            lines.append(f'  "{a}" -> "{b}";')
        lines.append("}")
        return "\n".join(lines)


class _WeakModules(Mapping):
    """A read-only ``{name: module}`` view over weak references, resolved on each access."""

    def __init__(self, refs: Dict[str, Any], model_name: str) -> None:
        self._refs = refs
        self._model_name = model_name

    def __getitem__(self, name: str) -> nn.Module:
        m = self._refs[name]()
        if m is None:
            raise ReferenceError(f"the {self._model_name} this DependencyGraph was built for has "
                                 f"been garbage collected; keep a reference to the model while "
                                 f"you use its graph")
        return m

    def __iter__(self):
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)


def is_meta_model(model: nn.Module) -> bool:
    """True when ``model`` has tensors and every one is on the meta device (shapes, no data)."""
    found = False
    for t in itertools.chain(model.parameters(), model.buffers()):
        if not t.is_meta:
            return False
        found = True
    return found


def on_meta(model: nn.Module, example_inputs: Any) -> Any:
    """``example_inputs`` with every tensor moved to the meta device when ``model`` lives
    there (a model that does not fit in memory is traced for its shapes); else as given."""
    if not is_meta_model(model):
        return example_inputs
    return map_tensors(example_inputs, lambda t: t if t.is_meta else t.to("meta"))


def module_signature(model: nn.Module) -> Dict[str, tuple]:
    """Shapes of every parameter and buffer: a cheap fingerprint to detect a changed model.

    Keys as ``named_parameters()`` then ``named_buffers()`` give them (a shared tensor under
    its first name), read from each module's own tables for speed.
    """
    return _signature(model.named_modules())


def _signature(named: Iterable[Tuple[str, nn.Module]]) -> Dict[str, tuple]:
    """:func:`module_signature` from ``model.named_modules()``."""
    params: Dict[str, tuple] = {}
    buffers: Dict[str, tuple] = {}
    seen_p, seen_b = set(), set()
    for prefix, m in named:
        dot = prefix + "." if prefix else ""
        if m._parameters:
            for k, t in m._parameters.items():
                if t is not None and id(t) not in seen_p:
                    seen_p.add(id(t))
                    params[dot + k] = tuple(t.shape)
        if m._buffers:
            for k, t in m._buffers.items():
                if t is not None and id(t) not in seen_b:
                    seen_b.add(id(t))
                    buffers[dot + k] = tuple(t.shape)
    params.update(buffers)
    return params


def _set_multiples(groups: List[Group], modules: Mapping[str, nn.Module]) -> None:
    """Each group's ``multiple``: the least common multiple its layers ask for."""
    for g in groups:
        for m in g.members:
            module = modules.get(m.name) if m.kind != "param" else None
            pr = get_layer_pruner(module) if module is not None else None
            if pr is not None:
                g.multiple = math.lcm(g.multiple, max(1, int(pr.multiple(module))))
