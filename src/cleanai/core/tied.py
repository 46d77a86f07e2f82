"""Known layers that hold the very same parameter (tied weights).

One weight is one set of channels, whichever module object holds it: T5 keeps its token
embedding as ``shared``, ``encoder.embed_tokens`` and ``decoder.embed_tokens`` (three module
objects, one weight) and reads it again in ``lm_head``. Slicing the weight for one of them
slices it for all, so their channels on the weight's dims are the same channels.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from .layers import UnsupportedLayer
from .slots import UnionFind


def tie_shared_weights(known: Dict[nn.Module, tuple], uf: UnionFind,
                       module_in: Dict[str, torch.Tensor], module_out: Dict[str, torch.Tensor]) -> None:
    """Tie the channel ids of known layers along the dims of every parameter they share, and
    give a layer that did not run, but holds exactly the parameters of one that did, that
    layer's ids (it ran through the other object: pruning then updates both alike)."""
    holders: Dict[int, int] = {}
    for m in known:
        for p in m.parameters():
            holders[id(p)] = holders.get(id(p), 0) + 1
    if not any(n > 1 for n in holders.values()):
        return
    traced = {}  # (type, its parameters) of every layer that got channel ids -> its name
    for m, (name, _) in known.items():
        if name in module_out or name in module_in:
            traced.setdefault((type(m), _param_key(m)), name)
    for m, (name, _) in known.items():
        if name in module_out or name in module_in:
            continue
        key = _param_key(m)
        twin = traced.get((type(m), key)) if key else None
        if twin is None:
            continue
        for ids in (module_in, module_out):
            if twin in ids:
                ids[name] = ids[twin]
    # shared parameter -> its dim -> the ids each holder gives it there
    on_dims: Dict[int, Dict[int, List[torch.Tensor]]] = {}
    for m, (name, pr) in known.items():
        if isinstance(pr, UnsupportedLayer):
            continue
        for side, ids in (("in", module_in.get(name)), ("out", module_out.get(name))):
            if ids is None:
                continue
            for t, dim in _weights(pr, m, side):
                if holders.get(id(t), 0) > 1 and t.shape[dim] == len(ids):
                    on_dims.setdefault(id(t), {}).setdefault(dim, []).append(ids)
    for dims in on_dims.values():
        for all_ids in dims.values():
            for ids in all_ids[1:]:
                uf.union_all(all_ids[0], ids)


def _weights(pr, m: nn.Module, side: str) -> List[Tuple[torch.Tensor, int]]:
    try:
        return pr.weights(m, side)
    except (AttributeError, TypeError):  # a custom pruner that does not describe its weights
        return []


def _param_key(m: nn.Module) -> tuple:
    return tuple((n, id(p)) for n, p in m.named_parameters())
