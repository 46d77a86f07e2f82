"""Layer pruners: for each layer family, where its channels are and how to keep a subset.

A pruner answers four questions about a module: how many input and output channels it has,
on which dim of its input/output tensors they sit, how input and output channels relate
(independent, the same channels, or grouped), and how to slice its tensors down to kept indices.
Register one for a custom layer with :func:`register_layer_pruner`.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from .slicing import _keep

Tensor = torch.Tensor
#: Where a layer's extra input or output tensor carries channels: ``(dim, set)``, where ``set``
#: is ``"in"``, ``"out"`` or the name of one of the layer's :class:`InternalDim`.
ChannelSpec = Optional[Tuple[int, str]]


@dataclasses.dataclass(frozen=True)
class InternalDim:
    """Channels that live inside a layer and never show on its input or output tensors: an
    attention layer's heads, an LSTM's hidden units behind its projection.

    The layer stores them along ``channels * per_channel`` positions (the rows of a projection):
    with ``interleaved`` position p holds channel ``p // per_channel`` (heads of ``head_dim``
    rows each), otherwise channel ``p % channels`` (dim d of every head). Each becomes a group of
    its own; the plan's kept positions come back to :meth:`LayerPruner.prune` as ``internal``.
    ``kind`` says what a channel is: ``"heads"``, ``"head_dims"`` (attention units, of which the
    trace keeps the kind its ``attention`` setting asks for) or ``"channels"``.
    """

    name: str
    channels: int
    per_channel: int = 1
    interleaved: bool = True
    kind: str = "channels"

    @property
    def length(self) -> int:
        return self.channels * self.per_channel


class LayerPruner:
    """Base class. Subclasses override what differs; the defaults describe a layer that maps
    ``in_channels`` on dim 1 to ``out_channels`` on dim 1 independently (a 1x1 conv)."""

    def coupling(self, module: nn.Module) -> str:
        """``"independent"`` when input and output channels are unrelated (conv, linear);
        ``"same"`` when output channel i is input channel i (norms, depthwise conv)."""
        return "independent"

    def in_channels(self, module: nn.Module) -> Optional[int]:
        """Number of input channels, or ``None`` when the layer reads no channels (embedding)."""
        return None

    def out_channels(self, module: nn.Module) -> Optional[int]:
        """Number of output channels, or ``None`` when the layer has none to prune."""
        return None

    def in_dim(self, module: nn.Module, ndim: int) -> int:
        """The dim of an ``ndim``-dimensional input that holds the input channels."""
        return 1 if ndim > 1 else 0

    def out_dim(self, module: nn.Module, ndim: int) -> int:
        """The dim of an ``ndim``-dimensional output that holds the output channels."""
        return self.in_dim(module, ndim)

    def repeat(self, module: nn.Module) -> int:
        """For ``coupling == "same"``: each input channel yields this many output channels."""
        return 1

    def blocks(self, module: nn.Module) -> int:
        """Channel blocks that must stay equal in size (conv groups, GroupNorm groups)."""
        return 1

    def in_blocks(self, module: nn.Module) -> int:
        """Blocks of the input channels (``blocks()`` unless the two sides differ)."""
        return self.blocks(module)

    def passes_through(self, module: nn.Module) -> bool:
        """For a ``"same"`` layer with no channel count (``in_channels`` is None): True when it
        leaves channels alone (a single-parameter PReLU), False when it holds weights over
        channels it cannot slice (a LayerNorm over ``[C, H, W]``)."""
        return True

    def weights(self, module: nn.Module, side: str) -> List[Tuple[Tensor, int]]:
        """Tensors that carry a channel's weights on ``side`` ("in" or "out"), with their dim."""
        return []

    def internal_dims(self, module: nn.Module) -> List[Optional[InternalDim]]:
        """Channels inside the layer, each pruned as a group of its own. The list index is the
        dim's id in plans and history, so keep it stable (``None`` for a switched-off dim)."""
        return []

    def multiple(self, module: nn.Module) -> int:
        """Kept channel counts of every group this layer holds stay multiples of this (a
        kernel that needs aligned widths)."""
        return 1

    def equal_counts(self, module: nn.Module) -> List[List[int]]:
        """Internal dims (by index) that must keep as many channels each, their positions
        chosen freely (experts whose weights stay one tensor)."""
        return []

    def internal_weights(self, module: nn.Module, index: int) -> List[Tuple[Tensor, int]]:
        """Tensors (or views) whose ``dim`` runs over internal dim ``index``'s positions."""
        return []

    def internal_activations(self, module: nn.Module, args: tuple, kwargs: dict,
                             output) -> List[Optional[Tensor]]:
        """For activation statistics: per internal dim, a tensor whose last dim runs over its
        positions (what the layer computes there on this call), or ``None``."""
        return []

    def extra_inputs(self, module: nn.Module, shapes: Sequence[Tuple[int, ...]]) -> List[ChannelSpec]:
        """For the tensor inputs after the first (shapes given): which channels each carries.
        ``None`` means none that CleanAI follows; their producers are then protected."""
        return [None] * len(shapes)

    def extra_outputs(self, module: nn.Module, shapes: Sequence[Tuple[int, ...]]) -> List[ChannelSpec]:
        """For the tensor outputs after the first: which channels each carries (a tensor that
        holds one of ``blocks()`` equal blocks gets the first block's ids)."""
        return [None] * len(shapes)

    def prune(self, module: nn.Module, in_keep: Optional[Tensor], out_keep: Optional[Tensor]) -> None:
        """Keep input channels ``in_keep`` and output channels ``out_keep`` (sorted indices;
        ``None`` keeps all). Slices parameters and buffers and updates attributes. The index
        tensors are read-only: several layers may share one.

        A layer with :meth:`internal_dims` also takes ``internal={index: kept positions}``.
        """
        raise NotImplementedError


def _local(keep: Tensor, blocks: int, size: int) -> Tensor:
    """Positions kept inside one block of a grouped layer; every block must keep the same."""
    per = size // blocks
    local = keep[keep < per]
    expected = (torch.arange(blocks).unsqueeze(1) * per + local).reshape(-1)
    if not torch.equal(expected, keep.cpu()):
        raise ValueError(f"grouped layer: kept channels differ between its {blocks} groups")
    return local


class ConvPruner(LayerPruner):
    """Conv1d/2d/3d. Depthwise convs tie input and output channels; grouped convs keep the same
    positions in every group."""

    transposed = False

    def coupling(self, m) -> str:
        return "same" if m.groups == m.in_channels and m.groups > 1 else "independent"

    def in_channels(self, m):
        return m.in_channels

    def out_channels(self, m):
        return m.out_channels

    def in_dim(self, m, ndim):
        return ndim - len(m.kernel_size) - 1

    def repeat(self, m):
        return m.out_channels // m.in_channels

    def blocks(self, m):
        return 1 if self.coupling(m) == "same" else m.groups

    def weights(self, m, side):
        dim = (0 if side == "out" else 1) ^ int(self.transposed)
        out = [(m.weight, dim)]
        if side == "out" and m.bias is not None:
            out.append((m.bias, 0))
        return out

    def prune(self, m, in_keep, out_keep):
        g = m.groups
        out_dim, in_dim = (1, 0) if self.transposed else (0, 1)
        if self.coupling(m) == "same":
            k = self.repeat(m)
            if in_keep is None and out_keep is not None:
                in_keep = out_keep[::k] // k
            if in_keep is not None:
                out_keep = (in_keep.unsqueeze(1) * k + torch.arange(k)).reshape(-1)
                # depthwise: each group holds one input channel; weight dim 1 stays 1 (or k)
                _keep(m.weight, 0, out_keep if not self.transposed else in_keep)
                _keep(m.bias, 0, out_keep)
                m.in_channels, m.out_channels, m.groups = len(in_keep), len(out_keep), len(in_keep)
            return
        # the output side first: selecting rows of the full weight is cheaper than columns
        if out_keep is not None:
            if self.transposed and g > 1:
                _keep(m.weight, out_dim, _local(out_keep, g, m.out_channels))
            else:
                _keep(m.weight, out_dim, out_keep)
            _keep(m.bias, 0, out_keep)
            m.out_channels = len(out_keep)
        if in_keep is not None:
            idx = _local(in_keep, g, m.in_channels) if (g > 1 and not self.transposed) else in_keep
            if self.transposed and g > 1:
                _keep(m.weight, in_dim, in_keep)
            else:
                _keep(m.weight, in_dim, idx)
            m.in_channels = len(in_keep)


class ConvTransposePruner(ConvPruner):
    """ConvTranspose1d/2d/3d: the weight is ``[in, out/groups, *kernel]``."""

    transposed = True


class LinearPruner(LayerPruner):
    """Linear: features on the last dim."""

    def in_channels(self, m):
        return m.in_features

    def out_channels(self, m):
        return m.out_features

    def in_dim(self, m, ndim):
        return ndim - 1

    def weights(self, m, side):
        if side == "in":
            return [(m.weight, 1)]
        return [(m.weight, 0)] + ([(m.bias, 0)] if m.bias is not None else [])

    def prune(self, m, in_keep, out_keep):
        if out_keep is not None:  # rows first, as for a conv
            _keep(m.weight, 0, out_keep)
            _keep(m.bias, 0, out_keep)
            m.out_features = len(out_keep)
        if in_keep is not None:
            _keep(m.weight, 1, in_keep)
            m.in_features = len(in_keep)


class EmbeddingPruner(LayerPruner):
    """Embedding: reads token ids, produces ``embedding_dim`` channels on the last dim."""

    def out_channels(self, m):
        return m.embedding_dim

    def out_dim(self, m, ndim):
        return ndim - 1

    def weights(self, m, side):
        return [(m.weight, 1)] if side == "out" else []

    def prune(self, m, in_keep, out_keep):
        if out_keep is not None:
            _keep(m.weight, 1, out_keep)
            m.embedding_dim = len(out_keep)


class NormPruner(LayerPruner):
    """A per-channel layer whose output channel i is input channel i: BatchNorm, InstanceNorm,
    GroupNorm, PReLU. ``size_attr`` names the attribute that holds the channel count."""

    def __init__(self, size_attr: str = "num_features") -> None:
        self.size_attr = size_attr

    def coupling(self, m):
        return "same"

    def in_channels(self, m):
        n = getattr(m, self.size_attr)
        return n if n > 1 or not isinstance(m, nn.PReLU) else None

    out_channels = in_channels

    def blocks(self, m):
        return getattr(m, "num_groups", 1)

    def weights(self, m, side):
        return [(t, 0) for t in (getattr(m, "weight", None), getattr(m, "bias", None))
                if isinstance(t, Tensor)]

    def prune(self, m, in_keep, out_keep):
        keep = in_keep if in_keep is not None else out_keep
        if keep is None:
            return
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(m, name, None)
            if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] > 1:
                _keep(t, 0, keep)
        setattr(m, self.size_attr, len(keep))


class LayerNormPruner(NormPruner):
    """LayerNorm over the last dim (a 1-element ``normalized_shape``)."""

    def __init__(self) -> None:
        super().__init__("normalized_shape")

    def in_channels(self, m):
        return m.normalized_shape[0] if len(m.normalized_shape) == 1 else None

    out_channels = in_channels

    def in_dim(self, m, ndim):
        return ndim - 1

    def passes_through(self, m):
        return len(m.normalized_shape) == 1

    def prune(self, m, in_keep, out_keep):
        keep = in_keep if in_keep is not None else out_keep
        if keep is None:
            return
        for t in (m.weight, m.bias):
            _keep(t, 0, keep)
        m.normalized_shape = (len(keep),)


class UnsupportedLayer(LayerPruner):
    """A layer whose channels CleanAI cannot follow yet: the tracer protects what it touches."""


class _Registry(dict):
    """Layer class -> pruner; any change empties the lookup cache of :func:`get_layer_pruner`."""

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        _LOOKUPS.clear()

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        _LOOKUPS.clear()

    def pop(self, *args):
        _LOOKUPS.clear()
        return super().pop(*args)

    def update(self, *args, **kwargs) -> None:
        super().update(*args, **kwargs)
        _LOOKUPS.clear()


# module class -> {inherited: get_layer_pruner's answer}: a model has hundreds of modules of a
# few classes, and the answer walks the class's ancestors. Weak keys: torch.fx makes a class
# per GraphModule, which must not outlive it here.
_LOOKUPS: "weakref.WeakKeyDictionary[type, Dict[bool, Optional[LayerPruner]]]" = \
    weakref.WeakKeyDictionary()
_REGISTRY: Dict[Type[nn.Module], "LayerPruner"] = _Registry()


def register_layer_pruner(layer_type: Type[nn.Module], pruner: LayerPruner) -> None:
    """Tell CleanAI how to prune ``layer_type`` (and its subclasses that keep its ``forward``).

    Example::

        class ScalePruner(cleanai.LayerPruner):
            def coupling(self, m): return "same"
            def in_channels(self, m): return m.scale.numel()
            out_channels = in_channels
            def prune(self, m, in_keep, out_keep):
                m.scale.data = m.scale.data[in_keep if in_keep is not None else out_keep]

        cleanai.register_layer_pruner(Scale, ScalePruner())
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"layer_type must be an nn.Module subclass, got {layer_type!r}")
    if not isinstance(pruner, LayerPruner):
        raise TypeError(f"pruner must be a LayerPruner instance, got {type(pruner).__name__}")
    _REGISTRY[layer_type] = pruner


def get_layer_pruner(module: nn.Module, inherited: bool = False) -> Optional[LayerPruner]:
    """The pruner for ``module``'s type: its own, or an ancestor's if it keeps that ``forward``.

    With ``inherited=True`` an ancestor's pruner is returned even when the subclass overrides
    ``forward`` (the tracer follows such a layer op by op; the pruner still knows its attributes).
    Answers are kept per class until the registry changes: a class whose ``forward`` is replaced
    afterwards keeps its first answer.
    """
    answers = _LOOKUPS.get(type(module))
    if answers is not None and inherited in answers:
        return answers[inherited]
    from .named_layers import named_layer_pruner  # optional libraries' classes, by name
    cls = getattr(type(module), "cleanai_layer_type", type(module))
    found = None
    for i, base in enumerate(cls.__mro__):
        # the nearest class with a pruner: a named subclass of a torch layer (a
        # weight-standardised conv) has a forward of its own, and its own pruner
        pruner = _REGISTRY.get(base)
        if pruner is None:
            pruner = named_layer_pruner(base)
        if pruner is not None:
            found = pruner if i == 0 or inherited or cls.forward is base.forward else None
            break
    _LOOKUPS.setdefault(type(module), {})[inherited] = found
    return found


for _t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer_pruner(_t, ConvPruner())
for _t in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_layer_pruner(_t, ConvTransposePruner())
register_layer_pruner(nn.Linear, LinearPruner())
register_layer_pruner(nn.Embedding, EmbeddingPruner())
for _t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
           nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
    register_layer_pruner(_t, NormPruner("num_features"))
register_layer_pruner(nn.GroupNorm, NormPruner("num_channels"))
register_layer_pruner(nn.PReLU, NormPruner("num_parameters"))
register_layer_pruner(nn.LayerNorm, LayerNormPruner())
for _t in (nn.EmbeddingBag, nn.Bilinear):
    register_layer_pruner(_t, UnsupportedLayer())
