"""Applying a plan: validate, slice every affected tensor, roll back on any failure."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..core.graph import DependencyGraph, Group, module_signature
from ..core.runtime import find_submodule, preserved_state, run_forward
from ..core.layers import get_layer_pruner
from ..core.parametrized import deepcopy_module, slicing_originals
from ..core.slicing import _keep, drop_grad_accumulator
from ..core.layers_attention import sync_container_attributes, synced_containers
from ..core.widths import code_fingerprint
from .attributes import attribute_updates, set_attributes, set_config
from .model_config import provisional_config
from .derived_scales import replay_scales
from .failure import Failure, describe_failure
from .history import record_step
from .keeps import Key, _kept_channels, layer_keeps, renumber
from .slices import renumber_slices, watched_slices


class PruningError(RuntimeError):
    """A plan could not be applied; the model is left exactly as it was.

    ``layer`` names the module whose forward failed after slicing, when that is known.
    ``failure`` (a :class:`Failure`) is set when the sliced model itself broke (slicing or
    its check forward failed), not the plan's checks: :meth:`StructuredPruner.step` then
    looks for the groups at fault.
    """

    def __init__(self, message: str, layer: Optional[str] = None,
                 failure: Optional[Failure] = None) -> None:
        super().__init__(message)
        self.layer = layer
        self.failure = failure


def forward_with_location(model: nn.Module, inputs: Any, forward_fn=None) -> None:
    """Run one forward; on an exception, re-raise it with the innermost running module's name
    attached as ``exc.cleanai_layer`` (None when unknown, ``""`` for the model's own code)
    and a :class:`Failure` as ``exc.cleanai_failure``, both read from the traceback."""
    try:
        run_forward(model, inputs, forward_fn)
    except Exception as exc:
        failure = describe_failure(exc, model)
        exc.cleanai_layer, exc.cleanai_failure = failure.layer, failure
        raise


def _tie(group: Group) -> str:
    return next((c for c in group.constraints if c.startswith("loses as many")), "tied")


def validate_removals(graph: DependencyGraph, removals: Dict[int, torch.Tensor]) -> None:
    """Reject a plan that names unknown groups, bad indices, protected channels or empties a group.

    All groups are checked at once on concatenated indices; the group at fault is looked for
    only when a check fails."""
    by_id = {g.id: g for g in graph.groups}
    todo = []
    for gid, idx in removals.items():
        g = by_id.get(gid)
        if g is None:
            raise PruningError(f"the plan names group {gid}, which the graph does not have")
        if idx.shape[0]:
            todo.append((g, idx))
    if not todo:
        return
    sizes = [g.size for g, _ in todo]
    counts = torch.tensor([idx.shape[0] for _, idx in todo])
    flat = torch.cat([idx for _, idx in todo])
    limit = torch.repeat_interleave(torch.tensor(sizes), counts)
    if bool(((flat < 0) | (flat >= limit)).any()):
        for g, idx in todo:
            bad = idx[(idx < 0) | (idx >= g.size)]
            if bad.numel():
                raise PruningError(f"group {g.id} has {g.size} channels; the plan removes "
                                   f"index {int(bad[0])}")
    offsets = torch.repeat_interleave(torch.cumsum(torch.tensor([0] + sizes[:-1]), 0), counts)
    flat = flat + offsets
    seen = torch.zeros(sum(sizes), dtype=torch.bool)
    seen[flat] = True
    if int(seen.sum()) != flat.shape[0]:  # some index came twice
        for g, idx in todo:
            if torch.unique(idx).shape[0] != idx.shape[0]:
                raise PruningError(f"the plan removes a channel of group {g.id} twice")
    if bool(torch.cat([g.protected for g, _ in todo]).index_select(0, flat).any()):
        for g, idx in todo:
            if bool(g.protected[idx].any()):
                raise PruningError(f"the plan removes protected channels of group {g.id} "
                                   f"({', '.join(g.reasons)})")
    for g, idx in todo:  # distinct and in range by now: as many as the group has is all
        if idx.shape[0] >= g.size:
            raise PruningError(f"the plan removes all {g.size} channels of group {g.id}")
        _check_fraction(g, removals, by_id)
        for other in g.equal_counts:  # the parts of a chunk, or of one attribute's split
            n = removals.get(other)
            if (0 if n is None else n.shape[0]) != idx.shape[0]:
                raise PruningError(f"group {g.id} and group {other} must lose as many "
                                   f"channels as each other ({_tie(g)}); the plan "
                                   f"removes {idx.shape[0]} and "
                                   f"{0 if n is None else n.shape[0]}")


def _check_fraction(g: Group, removals: Dict[int, torch.Tensor], by_id: Dict[int, Group]) -> None:
    """Raise unless ``g`` and the groups it must shrink with keep the same fraction."""
    kept = g.size - len(removals.get(g.id, ()))
    for other in g.equal_fractions:
        o = by_id.get(other)
        if o is None or o is g:
            continue
        theirs = o.size - len(removals.get(other, ()))
        if kept * o.fraction_base != theirs * g.fraction_base:
            raise PruningError(f"group {g.id} and group {other} must keep the same fraction "
                               f"of their {g.fraction_base} and {o.fraction_base} channels "
                               f"(an attention block derives its head size from the width); "
                               f"the plan keeps {kept} and {theirs}")


def slice_model(model: nn.Module, keeps: Dict[Key, torch.Tensor],
                containers: Optional[List[nn.Module]] = None) -> None:
    """Slice layers and parameters in place. Not atomic by itself: see :func:`atomic`.

    A parameter shared by several layers (tied embeddings) is sliced once; the other layers
    slice a stand-in so that their attributes follow, and must agree on the result.
    ``containers``: ``synced_containers(model)``, when the caller has them."""
    per_layer: Dict[str, Dict[str, torch.Tensor]] = {}
    internal: Dict[str, Dict[int, torch.Tensor]] = {}
    originals: Dict[int, torch.Tensor] = {}  # id(parameter) -> its data before slicing
    for (name, kind, dim), keep in keeps.items():
        if kind == "internal":
            internal.setdefault(name, {})[dim] = keep
            per_layer.setdefault(name, {})
            continue
        if kind != "param":
            per_layer.setdefault(name, {})[kind] = keep
            continue
        owner_name = name.rpartition(".")[0]
        owner = find_submodule(model, owner_name)
        pruner = get_layer_pruner(owner, inherited=True)
        if pruner is not None and get_layer_pruner(owner) is None and \
                pruner.coupling(owner) == "same":
            # a norm subclass with its own forward: its pruner also updates its attributes
            per_layer[owner_name] = {"in": keep, "out": keep}
        else:  # a bare parameter, or a buffer applied along the channels
            p = model.get_parameter(name) if _is_parameter(model, name) else model.get_buffer(name)
            originals.setdefault(id(p), p.data)
            _keep(p, dim, keep)
    for name, sides in per_layer.items():
        module = find_submodule(model, name)
        pruner = get_layer_pruner(module, inherited=True)
        if pruner is None:
            raise PruningError(f"no layer pruner for {type(module).__name__} {name}")
        shared = {}
        for pname, p in module._parameters.items():
            if p is None:
                continue
            if id(p) in originals:
                shared[pname] = p
                module._parameters[pname] = nn.Parameter(originals[id(p)], p.requires_grad)
            else:
                originals[id(p)] = p.data
        with slicing_originals(module):  # a weight-normed layer: g and v are cut
            if name in internal:
                pruner.prune(module, sides.get("in"), sides.get("out"), internal=internal[name])
            else:
                pruner.prune(module, sides.get("in"), sides.get("out"))
        for pname, p in shared.items():
            stand_in = module._parameters[pname]
            module._parameters[pname] = p
            if stand_in.shape != p.shape:
                raise PruningError(f"{name}.{pname} is shared with another layer that keeps "
                                   f"other channels ({tuple(stand_in.shape)} vs "
                                   f"{tuple(p.shape)})", name)
    sync_container_attributes(model, containers)


def _is_parameter(model: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf in find_submodule(model, owner)._parameters


class atomic:
    """Context manager: on an exception, every listed module gets back its tensors (same
    objects, same data, same grads), its parameter/buffer slots and its attributes."""

    def __init__(self, modules: List[nn.Module]) -> None:
        self.saved = []
        # a parametrized layer's weight lives in its parametrizations (weight norm's g and v)
        modules = list(modules) + [chain for m in modules
                                   for chain in getattr(m, "parametrizations", {}).values()]
        for m in modules:
            params, buffers = dict(m._parameters), dict(m._buffers)
            # plain tensor attributes too: the hook-based weight_norm's computed ``weight``
            plain = {k: t for k, t in m.__dict__.items() if isinstance(t, torch.Tensor)}
            tensors = [(t, t.data, t.grad if isinstance(t, nn.Parameter) else None)
                       for store in (params, buffers, plain) for t in store.values()
                       if t is not None]
            self.saved.append((m, tensors, params, buffers, m.__dict__.copy(), type(m)))

    def __enter__(self) -> "atomic":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.restore()
        else:
            self._renew_accumulators()
        return False

    def _renew_accumulators(self) -> None:
        """Parameters whose shape changed get a new gradient accumulator (the old one, kept
        alive by a graph from before, expects the old shape)."""
        for _, tensors, _, _, _, _ in self.saved:
            for t, data, _ in tensors:
                if isinstance(t, nn.Parameter) and t.shape != data.shape:
                    drop_grad_accumulator(t)

    def restore(self) -> None:
        for m, tensors, params, buffers, attrs, cls in self.saved:
            m.__class__ = cls  # a pruner may swap a layer's class (PrunedMultiheadAttention)
            for t, data, grad in tensors:
                changed = t.shape != data.shape
                t.data = data
                if isinstance(t, nn.Parameter):
                    if changed:
                        drop_grad_accumulator(t)
                    t.grad = grad
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
            for k in list(m.__dict__):
                if k not in attrs:
                    del m.__dict__[k]
            m.__dict__.update(attrs)


def touched_modules(model: nn.Module, keeps: Dict[Key, torch.Tensor],
                    containers: Optional[List[nn.Module]] = None) -> List[nn.Module]:
    """Every module slicing ``keeps`` may change: the layers, their submodules, the synced
    containers (``containers``, when the caller has them)."""
    out = {}
    names = set()
    for name, kind, _ in keeps:
        if kind == "param":
            name = name.rpartition(".")[0]
        if name in names:  # a layer's other dim
            continue
        names.add(name)
        m = find_submodule(model, name)
        if m._modules:  # a layer pruner may slice its submodules (an attention out_proj)
            for sub in m.modules():
                out[id(sub)] = sub
        else:
            out[id(m)] = m
    for m in synced_containers(model) if containers is None else containers:
        out[id(m)] = m
    return list(out.values())


def apply_removals(model: nn.Module, graph: DependencyGraph, removals: Dict[int, torch.Tensor],
                   check_forward: Union[bool, str] = "auto") -> List[Dict[str, Any]]:
    """Validate and apply, all or nothing; then renumber the graph. Returns the history layers.

    ``check_forward``: run the pruned model once and roll back if it fails; ``"auto"`` runs
    it unless the graph found no code that could hold a width of its own
    (``graph.check_reason is None``) and no hook or instance forward was added since."""
    change = graph.changes(model)
    if change is not None:
        raise PruningError(f"the model changed since its dependency graph was built ({change}); "
                           f"build a new graph or pruner for it")
    validate_removals(graph, removals)
    kept = _kept_channels(graph, removals)
    keeps = layer_keeps(graph, removals, kept)
    emptied = [n if k != "param" else f"{n} (dim {d})" for (n, k, d), keep in keeps.items()
               if keep.shape[0] == 0]
    if emptied:
        raise PruningError(f"the plan removes every channel of {', '.join(sorted(set(emptied)))}; "
                           f"keep at least one channel in each layer")
    updates = attribute_updates(model, graph, removals, keeps)
    containers = synced_containers(model)
    owners = _owners(model, keeps, updates, containers)
    # "auto": unless the trace found no code that could hold a width, and none came since
    check = check_forward is True or (check_forward == "auto" and (
        getattr(graph, "check_reason", "") is not None
        or code_fingerprint(model.modules()) != getattr(graph, "_code", None)))
    # a sliced layer that loses channels: only the check can tell whether the bounds followed
    watch = watched_slices(model, graph, keeps)
    check = check or bool(watch.bounds)
    with atomic(owners) as guard:
        try:
            slice_model(model, keeps, containers)
        except PruningError as exc:  # layers that share a weight disagree: the plan breaks it
            exc.failure = describe_failure(exc, model)
            raise
        set_attributes(model, updates)
        if check:
            try:
                with preserved_state(model, same_modes=True), torch.no_grad(), \
                        provisional_config(model, graph, removals), \
                        watch:
                    forward_with_location(model, graph.example_inputs, graph.forward_fn)
            except Exception as exc:
                guard.restore()
                failure = getattr(exc, "cleanai_failure", None) or describe_failure(exc, model)
                layer = failure.layer
                where = f" in {layer}" if layer else ""
                at = f" (at {failure.source})" if failure.source else ""
                raise PruningError(
                    f"{type(model).__name__} no longer runs after pruning: "
                    f"{type(exc).__name__}{where}: {exc}{at}. The model was restored. The layer "
                    f"probably keeps a channel count of its own: register a LayerPruner for it "
                    f"or list it in ignored_layers.", layer, failure) from exc
    renumber(graph, removals, keeps, kept)
    renumber_slices(graph, keeps)
    graph.signature = module_signature(model)
    lists: Dict[int, List[int]] = {}  # the dims of one group share its kept channels' tensor
    return ([{"name": n, "kind": k, "dim": d, "keep": _as_list(keep, lists)}
             for (n, k, d), keep in keeps.items()]
            + [{"name": n, "kind": "attr", "attr": a,  # a stored shape as a JSON list
                "value": list(v) if isinstance(v, tuple) else v} for n, a, v in updates])


def _owners(model: nn.Module, keeps: Dict[Key, torch.Tensor], updates: List[Tuple[str, str, Any]],
            containers: List[nn.Module]) -> List[nn.Module]:
    """Every module that slicing ``keeps`` and setting ``updates`` may change."""
    owners = {id(m): m for m in touched_modules(model, keeps, containers)}
    owners.update((id(m), m) for m in (model.get_submodule(n) for n, _, _ in updates))
    return list(owners.values())


def try_removals(model: nn.Module, graph: DependencyGraph,
                 removals: Dict[int, torch.Tensor]) -> Optional[Failure]:
    """Slice ``removals`` (part of a validated plan) into ``model``, run it once on the
    graph's example inputs, and put every tensor and attribute back: how it failed, or None
    when it ran. The graph is not renumbered; nothing is recorded."""
    kept = _kept_channels(graph, removals)
    keeps = layer_keeps(graph, removals, kept)
    updates = attribute_updates(model, graph, removals, keeps)
    containers = synced_containers(model)
    guard = atomic(_owners(model, keeps, updates, containers))
    try:
        slice_model(model, keeps, containers)
        set_attributes(model, updates)
        with preserved_state(model, same_modes=True), torch.no_grad(), \
                provisional_config(model, graph, removals), \
                watched_slices(model, graph, keeps):
            run_forward(model, graph.example_inputs, graph.forward_fn)
    except Exception as exc:
        return describe_failure(exc, model)
    finally:
        guard.restore()
    return None


def _as_list(keep: torch.Tensor, lists: Dict[int, List[int]]) -> List[int]:
    """``keep.tolist()``; a tensor seen before is copied from its list (``lists``: by id)."""
    done = lists.get(id(keep))
    if done is None:
        done = lists[id(keep)] = keep.tolist()
        return done
    return list(done)


def replay(model: nn.Module, layers: List[Dict[str, Any]]) -> None:
    """Re-apply one recorded step (``history[i]["layers"]``) to a model of the original
    architecture, atomically. Entries of kind ``"attr"`` set a module's integer attribute
    (``num_heads``, ``split_size``...) or stored shape (a list, set as a tuple) to ``value``;
    kind ``"config"`` sets a field of ``model.config`` (Hugging Face models); kind ``"bias"``
    gives a layer without one a zero bias (compensation put one there); kind ``"scale"`` sets
    an embedding's float scale that the config derives (:mod:`cleanai.pruner.derived_scales`;
    the weights rescaled with it come with the saved weights)."""
    keeps: Dict[Key, torch.Tensor] = {}
    updates, config, biases, scales = [], [], [], []
    for entry in layers:
        if entry["kind"] == "bias":
            biases.append(entry["name"])
            continue
        if entry["kind"] == "scale":
            scales.append(entry)
            continue
        if entry["kind"] in ("attr", "config"):
            (updates if entry["kind"] == "attr" else config).append(
                (entry["name"], entry["attr"], entry["value"]))
            continue
        keeps[(entry["name"], entry["kind"], int(entry["dim"]))] = torch.tensor(
            entry["keep"], dtype=torch.long)
    before = module_signature(model)
    owners = {id(m): m for m in touched_modules(model, keeps)}
    owners.update((id(m), m) for m in (model.get_submodule(n) for n, _, _ in updates))
    owners.update((id(m), m) for m in (model.get_submodule(n) for n in biases))
    owners.update((id(m), m) for m in (model.get_submodule(e["name"]) for e in scales))
    with atomic(list(owners.values())):
        slice_model(model, keeps)
        set_attributes(model, updates)
        for name in biases:
            add_zero_bias(model.get_submodule(name))
        replay_scales(model, scales)
    set_config(model, [(f, v) for _, f, v in config])
    record_step(model, {"layers": layers}, before)


def add_zero_bias(module: nn.Module) -> None:
    """Give a Linear or conv without a bias a zero one, sized to its outputs."""
    w = getattr(module, "weight", None)
    if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or w is None \
            or getattr(module, "bias", None) is not None:
        raise PruningError(f"cannot add a bias to {type(module).__name__}: only a Linear or "
                           f"conv without one takes a bias")
    out = w.shape[1] * module.groups if getattr(module, "transposed", False) else w.shape[0]
    module.bias = nn.Parameter(torch.zeros(out, dtype=w.dtype, device=w.device),
                               w.requires_grad)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy, for previewing a plan's impact without touching the model."""
    return deepcopy_module(model)
