"""Layer pruners for classes of optional libraries, matched by qualified class name.

CleanAI never imports those libraries; a class is recognised when a model already uses it.
"""
from __future__ import annotations

from typing import Dict, Optional

from torch import nn

from .layers import ConvPruner, LayerPruner, LinearPruner, _keep
from .layers_experts import ExpertsPruner, is_experts_class


class TransposedLinearPruner(LayerPruner):
    """A linear layer whose weight is ``[in, out]`` (``y = x @ W + b``), features on the last
    dim; ``size_attr`` holds the output count (Hugging Face ``Conv1D``: ``nf``; ``nx`` is the
    input count)."""

    def in_channels(self, m):
        return m.weight.shape[0]

    def out_channels(self, m):
        return m.weight.shape[1]

    def in_dim(self, m, ndim):
        return ndim - 1

    def weights(self, m, side):
        if side == "in":
            return [(m.weight, 0)]
        return [(m.weight, 1)] + ([(m.bias, 0)] if getattr(m, "bias", None) is not None else [])

    def prune(self, m, in_keep, out_keep):
        if in_keep is not None:
            _keep(m.weight, 0, in_keep)
            if isinstance(getattr(m, "nx", None), int):
                m.nx = len(in_keep)
        if out_keep is not None:
            _keep(m.weight, 1, out_keep)
            _keep(getattr(m, "bias", None), 0, out_keep)
            if isinstance(getattr(m, "nf", None), int):
                m.nf = len(out_keep)


class StandardizedConvPruner(ConvPruner):
    """A conv that standardises each filter over its inputs in ``forward`` before convolving
    (weight standardisation: timm's ``StdConv2d``, ``ScaledStdConv2d`` in NFNets and BiT);
    a per-filter ``gain`` ``[out, 1, 1, 1]`` goes with the output channels. Removing inputs
    changes each filter's statistics a little, as removing channels under a LayerNorm does."""

    def weights(self, m, side):
        out = super().weights(m, side)
        gain = getattr(m, "gain", None)
        if side == "out" and isinstance(gain, nn.Parameter):
            out.append((gain, 0))
        return out

    def prune(self, m, in_keep, out_keep):
        super().prune(m, in_keep, out_keep)
        if out_keep is not None:
            _keep(getattr(m, "gain", None), 0, out_keep)


_STD_CONV = StandardizedConvPruner()
_EXPERTS = ExpertsPruner()
_BY_NAME: Dict[str, LayerPruner] = {
    "transformers.pytorch_utils.Conv1D": TransposedLinearPruner(),
    # ``F.linear(x, self.weight, self.bias)`` in a forward of its own (a cast under
    # TorchScript): an nn.Linear, so its input statistics and compensation work as for one
    "timm.layers.linear.Linear": LinearPruner(),
    **{f"timm.layers.std_conv.{c}": _STD_CONV
       for c in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")},
}


def named_layer_pruner(cls: type) -> Optional[LayerPruner]:
    """The pruner for exactly ``cls``, when its qualified name is known, or for a Hugging
    Face experts class (:func:`~cleanai.core.layers_experts.is_experts_class`)."""
    found = _BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
    if found is None and is_experts_class(cls):
        return _EXPERTS
    return found
