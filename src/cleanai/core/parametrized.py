"""Layers whose weight is computed from other tensors: ``torch.nn.utils.parametrize``
(``parametrizations.weight_norm``, ``spectral_norm``, ``orthogonal``) and the older hook-based
``torch.nn.utils.weight_norm``. A slice must cut the tensors the weight is computed from.

Weight normalisation, ``w = g * v / ||v||`` with the norm over every dim but ``dim``, is cut
exactly: along ``dim`` both ``g`` and ``v`` are sliced; along another dim ``v`` is sliced and
``g`` rescaled by the norm it lost, so the kept weights are unchanged. Any other
parametrization (a spectral norm divides by the whole matrix's largest singular value, an
orthogonal map has no sliced form) keeps the layer's channels: :func:`unsliceable` says why,
and the trace protects them.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .slicing import _SLICE_LOG, _keep


Norms = Dict[Tuple[nn.Module, str], Tuple[Tensor, Tensor, int]]


def _weight_norms(module: nn.Module, recurse: bool = True) -> Optional[Norms]:
    """Per ``(layer, tensor name)`` in ``module`` (itself or, with ``recurse``, a layer inside
    it, such as an ``nn.MultiheadAttention``'s ``out_proj``): ``(g, v, dim)`` of its weight
    normalisation (``dim`` -1: the norm over the whole tensor). ``{}`` when nothing is
    computed; None when a computed tensor is anything else."""
    found: Norms = {}
    for sub in module.modules() if recurse else (module,):
        if parametrize.is_parametrized(sub):
            for name, chain in sub.parametrizations.items():
                if len(chain) != 1 or type(chain[0]).__name__ != "_WeightNorm" or \
                        not hasattr(chain, "original1"):
                    return None
                found[(sub, name)] = (chain.original0, chain.original1, int(chain[0].dim))
        for hook in sub._forward_pre_hooks.values():
            if type(hook).__name__ == "WeightNorm" and hasattr(hook, "name"):
                g = getattr(sub, hook.name + "_g", None)
                v = getattr(sub, hook.name + "_v", None)
                if g is None or v is None:
                    return None
                found[(sub, hook.name)] = (g, v, -1 if hook.dim is None else int(hook.dim))
    return found


def computed_weight(module: nn.Module, recurse: bool = True) -> bool:
    """True when some weight of ``module`` (or, with ``recurse``, of a layer inside it) is
    computed from other tensors on every call (a write into it would be lost)."""
    return _weight_norms(module, recurse) != {}


def unsliceable(module: nn.Module) -> Optional[str]:
    """Why ``module``'s computed weights cannot be sliced, or None (none, or weight norm)."""
    if _weight_norms(module) is not None:
        return None
    kinds = sorted({type(p).__name__.lstrip("_") for sub in module.modules()
                    for chain in getattr(sub, "parametrizations", {}).values() for p in chain})
    kinds = kinds or ["a weight-norm hook without its tensors"]
    return (f"{type(module).__name__}'s weight is computed by {', '.join(kinds)} "
            f"(torch.nn.utils.parametrize), which a slice cannot keep")


def computed_writer(owner: nn.Module, name: str):
    """How to write ``owner.<name>`` (a weight of ``owner`` itself, not of a layer inside it):
    False when it is a plain tensor (write into it); for a weight-normed one, a function
    ``write(value) -> undo`` that makes it equal ``value`` (``v = value``, ``g = ||value||``:
    exact) and returns a function putting the old ``g`` and ``v`` back; None when it is
    computed otherwise (a write would be lost)."""
    hook = next((h for h in owner._forward_pre_hooks.values()
                 if type(h).__name__ == "WeightNorm" and getattr(h, "name", None) == name), None)
    if not parametrize.is_parametrized(owner, name) and hook is None:
        return False
    entry = (_weight_norms(owner, recurse=False) or {}).get((owner, name))
    if entry is None:
        return None
    g, v, norm_dim = entry

    def refresh() -> None:
        # the hook-based form keeps the weight as an attribute, recomputed only when the layer
        # itself is called: a reader of the attribute (an attention's out_proj) sees it now
        if hook is not None:
            setattr(owner, name, hook.compute_weight(owner).detach())

    @torch.no_grad()
    def write(value: Tensor):
        old = g.detach().clone(), v.detach().clone()
        value = value.to(v.dtype)
        norm = torch.norm_except_dim(value, 2, norm_dim).reshape(g.shape)
        empty = norm == 0  # a zero row: g 0, any v (never 0 / 0)
        v.copy_(value.masked_fill(empty.expand_as(v) if empty.dim() else empty, 1.0))
        g.copy_(norm)
        refresh()

        def undo() -> None:
            with torch.no_grad():
                g.copy_(old[0])
                v.copy_(old[1])
                refresh()
        return undo
    return write


def deepcopy_module(module: nn.Module, memo: Optional[Dict[int, Any]] = None) -> nn.Module:
    """``copy.deepcopy(module, memo)`` that also copies a layer under the hook-based
    ``torch.nn.utils.weight_norm``, whose computed weight (a result of autograd, which
    ``deepcopy`` refuses) is copied as a plain tensor: the hook recomputes it on the next call."""
    memo = {} if memo is None else memo
    for sub in module.modules():
        for t in sub.__dict__.values():
            if isinstance(t, Tensor) and not t.is_leaf and id(t) not in memo:
                memo[id(t)] = t.detach().clone()
    return copy.deepcopy(module, memo)


@contextlib.contextmanager
def slicing_originals(module: nn.Module) -> Iterator[None]:
    """Inside the block a layer pruner slices ``module.weight`` as if it were a parameter; on
    leaving, each of those slices is made on the tensors the weight is computed from."""
    norms = _weight_norms(module)
    if not norms:
        yield
        return
    outer = _SLICE_LOG.get()
    log: list = []
    token = _SLICE_LOG.set(log)
    try:
        with parametrize.cached():
            computed = {key: getattr(key[0], key[1]) for key in norms}
            yield
    finally:
        _SLICE_LOG.reset(token)
    for t, dim, idx in log:
        key = next((k for k, c in computed.items() if c is t), None)
        if key is None:  # a plain tensor (the bias): already sliced
            if outer is not None:
                outer.append((t, dim, idx))
            continue
        g, v, norm_dim = norms[key]
        norm_dim = -1 if norm_dim == -1 else norm_dim % v.dim()
        if outer is not None and dim != norm_dim:
            # the log replays slices only (cleanai.prune_checkpoint, on a weightless copy)
            raise RuntimeError(
                f"{type(key[0]).__name__}.{key[1]} is weight-normed over dim {norm_dim}: "
                f"cutting dim {dim} rescales its gain from the values, which a checkpoint "
                f"pruned slice by slice does not have; load the model and prune it instead")
        _slice_weight_norm(g, v, norm_dim, dim, idx)


@torch.no_grad()
def _slice_weight_norm(g: Tensor, v: Tensor, norm_dim: int, dim: int, idx: Tensor) -> None:
    if dim == norm_dim:  # whole rows (columns) with their own norms
        _keep(g, dim, idx)
        _keep(v, dim, idx)
        return
    before = torch.norm_except_dim(v, 2, norm_dim)
    _keep(v, dim, idx)
    after = torch.norm_except_dim(v, 2, norm_dim)
    # g * v[idx] / ||v|| is the weight kept: the new norm ||v[idx]|| moves into g
    scale = after / before.clamp_min(torch.finfo(before.dtype).tiny)
    g.data = (g.data * scale.to(g.dtype)).reshape(g.shape)
    empty = (after == 0).reshape(g.shape)
    if bool(empty.any()):  # all that is kept of a row is zero: so is its weight, never 0 / 0
        g.data = g.data.masked_fill(empty, 0.0)
        v.data = v.data.masked_fill(empty.expand_as(v) if empty.dim() else empty, 1.0)
