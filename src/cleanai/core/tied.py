"""Layers whose weights the trace meets outside their own forward.

One weight is one set of channels, whichever module object holds it: T5 keeps its token
embedding as ``shared``, ``encoder.embed_tokens`` and ``decoder.embed_tokens`` (three module
objects, one weight) and reads it again in ``lm_head``. Slicing the weight for one of them
slices it for all, so their channels on the weight's dims are the same channels.

A subclass of a known layer with a forward of its own (Gemma's scaled word embedding, a linear
layer that rescales its output) is followed op by op, and its weights are treated like a known
layer's weights used functionally: it is pruned by its ancestor's pruner, which keeps its
attributes (``embedding_dim``, ``out_features``) in step.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from .layers import UnsupportedLayer, get_layer_pruner


def is_subclass_layer(m: nn.Module) -> bool:
    """True for a subclass of a plain known layer (linear, conv, embedding: no submodules, no
    internal dims) with its own forward whose input and output channels are unrelated (a norm
    subclass is followed through its functional norm and pruned as its parameters instead)."""
    pr = get_layer_pruner(m, inherited=True)
    if pr is None or isinstance(pr, UnsupportedLayer) or next(m.children(), None) is not None:
        return False
    try:
        return pr.coupling(m) == "independent" and not pr.internal_dims(m)
    except Exception:  # a pruner that cannot read this subclass: follow it op by op
        return False


def tie_shared_weights(known: Dict[nn.Module, tuple], subclasses: Dict[nn.Module, tuple],
                       result) -> None:
    """Complete a :class:`~cleanai.core.trace_result.TraceResult` for tied weights:

    - layers that share a parameter have their channel ids tied along its dims;
    - a layer that did not run but holds exactly the parameters of one that did ran through
      that object: it gets the same ids.

    Subclass layers that got no ids are left out of the result's layers."""
    module_in, module_out = result.module_in, result.module_out
    layers = {**subclasses, **known}
    holders: Dict[int, int] = {}
    for m in layers:
        for p in m.parameters():
            holders[id(p)] = holders.get(id(p), 0) + 1
    if any(n > 1 for n in holders.values()):
        traced = {}  # (pruner type, parameters) of every layer that got channel ids -> name
        for m, (name, pr) in layers.items():
            if name in module_out or name in module_in:
                traced.setdefault((type(pr), _param_key(m)), name)
        for m, (name, pr) in layers.items():
            key = _param_key(m)
            twin = traced.get((type(pr), key)) if key else None
            if twin is None or name in module_out or name in module_in:
                continue
            for ids in (module_in, module_out):
                if twin in ids:
                    ids[name] = ids[twin]
        # (parameter, dim) -> the ids each layer gives it there
        on_dims: Dict[Tuple[int, int], List[torch.Tensor]] = {}
        for m, (name, pr) in layers.items():
            if isinstance(pr, UnsupportedLayer):
                continue
            for side, ids in (("in", module_in.get(name)), ("out", module_out.get(name))):
                if ids is None:
                    continue
                for t, dim in _weights(pr, m, side):
                    if holders.get(id(t), 0) > 1 and t.shape[dim] == len(ids):
                        on_dims.setdefault((id(t), dim), []).append(ids)
        for all_ids in on_dims.values():
            for ids in all_ids[1:]:
                result.uf.union_all(all_ids[0], ids)
        for m, (name, pr) in subclasses.items():  # its weights are all a known layer's
            if name in module_out:
                continue
            for side, ids in (("in", module_in), ("out", module_out)):
                for t, dim in _weights(pr, m, side):
                    found = on_dims.get((id(t), dim))
                    if found and name not in ids:
                        ids[name] = found[0]
            if name not in module_out:
                module_in.pop(name, None)
    for m, (name, _) in subclasses.items():
        if name not in module_out and name not in module_in:
            result.modules.pop(name, None)


def _weights(pr, m: nn.Module, side: str) -> List[Tuple[torch.Tensor, int]]:
    try:
        return pr.weights(m, side)
    except (AttributeError, TypeError):  # a custom pruner that does not describe its weights
        return []


def _param_key(m: nn.Module) -> tuple:
    return tuple((n, id(p)) for n, p in m.named_parameters())
