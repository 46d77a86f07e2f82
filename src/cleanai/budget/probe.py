"""How a layer's parameters shrink with one of its channel dims: learnt by pruning weightless
(meta-device) copies of the layer with its own :class:`~cleanai.LayerPruner`, so a custom
layer with a registered pruner is covered like a built-in one."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..core.parametrized import deepcopy_module, slicing_originals

__all__ = ["size_laws"]


def size_laws(module: nn.Module, pruner: Any, key: Tuple[str, str, int],
              length: int) -> List[Tuple[str, int, float, float]]:
    """Which parameter dims of ``module`` the layer dim ``key`` slices, each with its law
    ``size = a * kept + b``, learnt by pruning weightless copies of the module to two widths."""
    name, kind, dim = key
    if length < 2:
        return []
    before = {n: tuple(p.shape) for n, p in module.named_parameters()}
    internal = None
    if kind == "internal":
        dims = pruner.internal_dims(module)
        internal = dims[dim] if dim < len(dims) else None
        if internal is None:
            return []
    blocks = 1
    if kind == "out":
        blocks = pruner.blocks(module)
    elif kind == "in":
        blocks = pruner.in_blocks(module)
    widths = []
    for fraction in (0.5, 1.0):
        keep = _probe_keep(length, blocks, internal, fraction)
        if keep is None:
            return []
        after = _pruned_shapes(module, pruner, kind, dim, keep, internal is not None)
        if after is None:
            return []
        widths.append((keep.shape[0], after))
    (k1, s1), (k2, s2) = widths
    laws = []
    for pname, shape in before.items():
        if pname not in s1 or pname not in s2:
            continue
        for d, size in enumerate(shape):
            x1, x2 = s1[pname][d], s2[pname][d]
            if x1 == size and x2 == size:
                continue
            a = (x2 - x1) / (k2 - k1) if k2 != k1 else 0.0
            b = x1 - a * k1
            if abs(a * length + b - size) > 1e-6:  # not linear up to the full width
                a, b = size / length, 0.0
            laws.append((pname, d, a, b))
    return laws


def _probe_keep(length: int, blocks: int, internal, fraction: float) -> Optional[torch.Tensor]:
    """Kept positions for a probe: a ``fraction`` of the channels (the largest count below
    the full width at 1.0), evenly per block, whole channels of an internal dim."""
    if internal is not None:
        c, per = internal.channels, internal.per_channel
        k = max(1, min(c - 1, int(c * fraction)))
        if c < 2:
            return None
        pos = torch.arange(c * per)
        chan = pos // per if internal.interleaved else pos % c
        return pos[chan < k]
    if blocks < 1 or length % blocks:
        return None
    per = length // blocks
    if per >= 2:
        k = max(1, min(per - 1, int(per * fraction)))
        return (torch.arange(blocks).unsqueeze(1) * per + torch.arange(k)).reshape(-1)
    k = max(1, min(blocks - 1, int(blocks * fraction)))  # one channel per block: whole blocks
    return torch.arange(k) if blocks >= 2 else None


def _pruned_shapes(module: nn.Module, pruner, kind: str, dim: int, keep: torch.Tensor,
                   internal: bool) -> Optional[Dict[str, Tuple[int, ...]]]:
    """Parameter shapes of a copy of ``module`` pruned to ``keep`` along the layer dim; the
    copy is weightless where the pruner allows it."""
    for meta in (True, False):
        clone = _clone(module, meta)
        try:
            with slicing_originals(clone):
                if internal:
                    pruner.prune(clone, None, None, internal={dim: keep})
                elif kind == "in":
                    pruner.prune(clone, keep, None)
                elif kind == "out" and pruner.coupling(module) == "same":
                    pruner.prune(clone, keep, keep)
                else:
                    pruner.prune(clone, None, keep)
        except Exception:
            continue
        return {n: tuple(p.shape) for n, p in clone.named_parameters()}
    return None


def _clone(module: nn.Module, meta: bool) -> nn.Module:
    """A deep copy of ``module``; with ``meta``, its tensors on the meta device (no data)."""
    if not meta:
        return deepcopy_module(module)
    memo: Dict[int, Any] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) \
            else empty
    return deepcopy_module(module, memo)
