"""A known layer's call during the autograd walk: its input channels are the ids that
arrive (tied to its own), its output channels fresh ids (or its input's, for a per-channel
layer), and a few layers that run along another dim pass channel ids through unchanged."""
from __future__ import annotations

from typing import List, Optional

from torch import nn

from .layers import LayerNormPruner, LayerPruner, LinearPruner, UnsupportedLayer
from .parametrized import unsliceable
from .record import ModuleCall
from .slots import Slots


def _slides_along_channels(m: nn.Module, pr: LayerPruner, x: Optional[Slots], call: ModuleCall,
                           in_dim: Optional[int]) -> bool:
    """A one-channel conv run along the channels, which sit on one of its spatial dims, and
    keeps their count (ECA attention: ``Conv1d(1, 1, k)`` over pooled channels): each channel
    mixes with its neighbours, as in a LayerNorm, and any subset of them can stay."""
    if x is None or in_dim is None or x.dim <= in_dim or len(call.outputs) != 1:
        return False
    if not isinstance(m, nn.modules.conv._ConvNd) or pr.in_channels(m) != 1 or \
            pr.out_channels(m) != 1:
        return False
    shape = call.outputs[0][1]
    return len(shape) == len(call.input_shape) and shape[x.dim] == call.input_shape[x.dim]


def _maps_another_dim(pr: LayerPruner, x: Optional[Slots], call: ModuleCall,
                      in_dim: Optional[int]) -> bool:
    """A Linear applied along a dim without channel ids while another dim carries them
    (MLP-Mixer's token mixing on ``x.transpose(1, 2)``), or a LayerNorm over the last dim
    (Persimmon's per-head ``k_layernorm`` on ``[..., heads, head_dim]``): that dim is one of
    the layer's batch dims, each of its rows mapped alone, so its channels pass through
    unchanged. The layer's own dim (tokens, head_dim) is left as it is."""
    if x is None or in_dim is None or x.dim >= in_dim or \
            not isinstance(pr, (LinearPruner, LayerNormPruner)):
        return False
    shape = call.outputs[0][1] if len(call.outputs) == 1 else None
    return shape is not None and len(shape) == len(call.input_shape) and \
        shape[x.dim] == call.input_shape[x.dim] == len(x.ids)


def module_call(ctx, call: ModuleCall, x: Optional[Slots], module_in, module_out,
                producers) -> List[Optional[Slots]]:
    """The channel ids of ``call``'s outputs (``ctx``: the tracer; ``module_in``/``module_out``:
    layer name -> ids, filled on a layer's first call; ``producers``: layers with fresh
    output ids, appended to)."""
    m, pr, name = call.module, call.pruner, call.name
    n_out = len(call.outputs)
    if isinstance(pr, UnsupportedLayer):
        ctx.protect(x, f"input of {type(m).__name__} {name}, which CleanAI cannot prune yet")
        ctx.unknown.setdefault(type(m).__name__, []).append(name)
        return [None] * n_out
    n_in = pr.in_channels(m)
    same = pr.coupling(m) == "same"
    computed = unsliceable(m)  # a spectral-normed or orthogonal weight: its channels stay
    in_ids = None
    if n_in is not None:
        in_dim = pr.in_dim(m, len(call.input_shape)) if call.input_shape is not None else None
        fits = x is not None and x.dim == in_dim and len(x.ids) == n_in
        if not fits and (_slides_along_channels(m, pr, x, call, in_dim)
                         or _maps_another_dim(pr, x, call, in_dim)):
            return [Slots(x.dim, x.ids)]
        in_ids = module_in.get(name)
        if in_ids is None:
            # first call: the layer's input channels are the ids that arrive (no new ids)
            in_ids = module_in[name] = x.ids if fits else ctx.fresh(n_in)
            ctx.tie_blocks(in_ids, pr.in_blocks(m), f"{type(m).__name__} {name} (in)")
        if fits:
            ctx.uf.union_all(x.ids, in_ids)
            if computed is not None:
                ctx.protect(in_ids, computed)
        else:
            ctx.protect(x, f"input of {name} does not carry its channels on dim {in_dim}")
            ctx.protect(in_ids, f"input of {name} has no channel ids")
    elif same and n_out:
        if computed is not None:
            ctx.protect(x, computed)
        if pr.passes_through(m):
            return [x] + [None] * (n_out - 1)
        ctx.protect(x, f"{type(m).__name__} {name} holds per-channel weights CleanAI cannot slice")
        return [None] * n_out
    n_o = pr.out_channels(m)
    if n_o is None or not n_out:
        return [None] * n_out
    out_ids = module_out.get(name)
    if out_ids is None:
        if same and in_ids is not None:
            k = pr.repeat(m)
            out_ids = in_ids if k == 1 else in_ids.repeat_interleave(k)
        else:
            out_ids = ctx.fresh(n_o)
            ctx.tie_blocks(out_ids, pr.blocks(m), f"{type(m).__name__} {name} (out)")
            producers.append(name)
        module_out[name] = out_ids
    if computed is not None:
        ctx.protect(out_ids, computed)
    key, shape = call.outputs[0]
    out_dim = pr.out_dim(m, len(shape))
    if shape[out_dim] != n_o:
        ctx.protect(out_ids, f"output of {name} does not carry its channels on dim {out_dim}")
        return [None] * n_out
    return [Slots(out_dim, out_ids)] + [None] * (n_out - 1)
