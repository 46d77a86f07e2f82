"""Known layers used through their weights instead of their forward.

Some models call ``F.linear(x, layer.weight, layer.bias)`` (torchvision's swin attention):
the layer never runs, so its hooks see nothing, but its channels are still the layer's.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .layers import UnsupportedLayer
from .slots import Slots


def functional_param(ctx, var: torch.Tensor, m: nn.Module, known_entry, module_in,
                     module_out, producers) -> Optional[Slots]:
    """A known layer's parameter used outside its forward (``F.linear(x, layer.weight,
    layer.bias)``): the weight carries the layer's input ids on its input dim, and a product
    that contracts them yields its output ids (``ctx.partners``); the bias carries the output
    ids. The layer is then pruned as if it had run."""
    name, pr = known_entry
    if isinstance(pr, UnsupportedLayer) or pr.coupling(m) != "independent":
        return None
    n_in, n_out = pr.in_channels(m), pr.out_channels(m)
    if n_in is None or n_out is None:
        return None
    if name not in module_out:
        module_in[name] = ctx.fresh(n_in)
        module_out[name] = ctx.fresh(n_out)
        producers.append(name)
        ctx.partners[int(module_in[name][0])] = (module_in[name], module_out[name])
    for side, ids in (("in", module_in[name]), ("out", module_out[name])):
        for t, dim in pr.weights(m, side):
            if t is var and (side == "in" or t.dim() == 1):
                return Slots(dim, ids, True)
    return None
