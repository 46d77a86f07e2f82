"""Known layers used through their weights instead of their forward.

Some models call ``F.linear(x, layer.weight, layer.bias)`` (torchvision's swin attention) or
``F.embedding(ids, layer.weight)``, or a depthwise conv as ``F.conv1d(x, conv.weight, groups=C)``:
the layer never runs, so its hooks see nothing, but its channels are still the layer's.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .layers import ConvPruner, UnsupportedLayer
from .slots import Slots


def functional_param(ctx, var: torch.Tensor, m: nn.Module, known_entry, module_in,
                     module_out, producers) -> Optional[Slots]:
    """A known layer's parameter used outside its forward (``F.linear(x, layer.weight,
    layer.bias)``): the weight carries the layer's input ids on its input dim, and a product
    that contracts them yields its output ids (``ctx.partners``); the bias carries the output
    ids. A layer that also ran uses the same ids (tied weights: an embedding that is also the
    output layer); where no product names where its outputs go, :func:`protect_unfollowed`
    keeps them. A layer without input channels (an embedding looked up with ``F.embedding``) gives its
    weight its output ids. The layer is then pruned as if it had run."""
    name, pr = known_entry
    if isinstance(pr, ConvPruner) and pr.coupling(m) == "same":
        return _depthwise_param(ctx, var, m, name, pr, module_in, module_out)
    if isinstance(pr, UnsupportedLayer) or pr.coupling(m) != "independent":
        return None
    n_in, n_out = pr.in_channels(m), pr.out_channels(m)
    if n_out is None:
        return None
    if name not in module_out:
        module_out[name] = ctx.fresh(n_out)
        ctx.tie_blocks(module_out[name], pr.blocks(m), f"{type(m).__name__} {name} (out)")
        producers.append(name)
        if n_in is not None:
            module_in[name] = ctx.fresh(n_in)
            ctx.tie_blocks(module_in[name], pr.in_blocks(m), f"{type(m).__name__} {name} (in)")
            ctx.partners[int(module_in[name][0])] = (module_in[name], module_out[name], name)
    for side, ids in (("in", module_in.get(name)), ("out", module_out[name])):
        if ids is None:
            continue
        for t, dim in pr.weights(m, side):
            # a weight carries one set of ids: its input ids, where it has them
            if t is var and (side == "in" or t.dim() == 1 or n_in is None):
                if side == "in":
                    ctx.weights_read[name] = module_out[name]
                return Slots(dim, ids, True)
    return None


def protect_unfollowed(ctx) -> None:
    """Protect the output channels of every layer whose weight the walk met where no product
    said where those channels go (its weight went into an op the tracer does not follow, or
    the layer ran before, so its input ids name no partner): slicing them would change a
    tensor nobody adjusts."""
    followed = {ctx.partners[key][2] for key in ctx.partners_used}
    for name, out_ids in ctx.weights_read.items():
        if name not in followed:
            ctx.protect(out_ids, f"output of {name}, whose weight is used outside its forward "
                                 f"where CleanAI cannot follow its outputs")


def _depthwise_param(ctx, var: torch.Tensor, m: nn.Module, name: str, pr, module_in,
                     module_out) -> Optional[Slots]:
    """A depthwise conv's weight or bias used outside its forward (``F.conv1d(x,
    conv.weight, groups=C)``): its rows are the layer's channels, in and out alike."""
    n = pr.in_channels(m)
    if n is None or pr.repeat(m) != 1:
        return None
    if name not in module_in:
        module_in[name] = module_out[name] = ctx.fresh(n)
    for t, dim in pr.weights(m, "out"):
        if t is var:
            return Slots(dim, module_in[name], True)
    return None
