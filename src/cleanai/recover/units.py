"""Which parts of a pruned model ``reconstruct`` refits, in forward order: layers (Linear,
conv) and blocks (the non-leaf children of ``nn.Sequential`` / ``nn.ModuleList``), each matched
to the teacher's module of the same name, output channels mapped through the pruning history."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..core.layers import get_layer_pruner
from ..core.named_layers import TransposedLinearPruner
from ..core.runtime import find_submodule
from .common import Key, kept_indices

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_WEIGHTED = (nn.Linear,) + _CONVS


Output = Tuple[Optional[torch.Tensor], int]  # teacher channels kept on a dim (negative)


@dataclasses.dataclass
class Unit:
    """One thing ``reconstruct`` refits: a layer or a block, its teacher counterpart, and for
    each tensor of its output, the teacher's output channels it kept and on which dim."""

    name: str
    kind: str                    # "layer" | "block"
    module: nn.Module            # in the pruned model
    target: nn.Module            # the teacher's module of the same name
    outputs: List[Output]        # one per output tensor, in ``iter_tensors`` order
    pruned: bool

    @property
    def keep(self) -> Optional[torch.Tensor]:
        """The kept channels of the first output tensor (``None``: all of them)."""
        return self.outputs[0][0]

    @property
    def dim(self) -> int:
        """The (negative) channel dim of the first output tensor."""
        return self.outputs[0][1]


def _weighted(m: nn.Module) -> bool:
    """A layer reconstruction fits: Linear, Conv1d/2d/3d, or a linear layer stored
    transposed (Hugging Face ``Conv1D``, trained with Adam)."""
    return isinstance(m, _WEIGHTED) or isinstance(get_layer_pruner(m), TransposedLinearPruner)


def _find_blocks(model: nn.Module) -> List[str]:
    """Non-leaf children of Sequential/ModuleList containers holding a Linear or conv,
    outermost first (an inner container of a block is part of the block)."""
    blocks, stack = [], [("", model)]
    while stack:
        prefix, m = stack.pop()
        container = isinstance(m, (nn.Sequential, nn.ModuleList))
        for cname, child in m._modules.items():
            if child is None:
                continue
            full = f"{prefix}.{cname}" if prefix else cname
            if container and child._modules and any(_weighted(x) for x in child.modules()):
                blocks.append(full)
            else:
                stack.append((full, child))
    return blocks


def plan_units(model: nn.Module, teacher: nn.Module, granularity: str, order: List[str],
               s_shapes: Dict[str, Any], t_shapes: Dict[str, Any],
               notes: List[str]) -> List[Unit]:
    """The units to reconstruct, in forward order (``order``: module names in first-call
    order; ``*_shapes``: the shapes of each one's output tensors in the model and the
    teacher). What cannot be matched to the teacher is skipped with a line in ``notes``."""
    keep = kept_indices(model)
    pos = {n: i for i, n in enumerate(order)}
    touched = {k[0] for k in keep}
    blocks = [b for b in _find_blocks(model) if b in pos] if granularity == "block" else []
    units: List[Unit] = []
    inside: List[str] = []  # blocks whose layers are units
    for b in blocks:
        unit = _block_unit(model, teacher, b, order, s_shapes[b], t_shapes.get(b), keep, touched)
        if unit is None:
            notes.append(f"{b}: its output channels could not be matched to the teacher's; "
                             f"its layers were reconstructed one by one instead")
        else:
            units.append(unit)
            inside.append(b + ".")
    for name in order:
        m = find_submodule(model, name)
        if not _weighted(m) or any(name.startswith(p) for p in inside):
            continue
        unit = _layer_unit(teacher, name, m, s_shapes[name], t_shapes.get(name), keep, touched,
                           notes)
        if unit is not None:
            units.append(unit)
    units.sort(key=lambda u: pos[u.name])
    return units


def _layer_unit(teacher: nn.Module, name: str, m: nn.Module, s_shapes, t_shapes,
                keep: Dict[Key, Any], touched: set, notes: List[str]) -> Optional[Unit]:
    s_shape, t_shape = (s_shapes[0] if s_shapes else None), (t_shapes[0] if t_shapes else None)
    if s_shape is None or t_shape is None or len(s_shape) != len(t_shape):
        notes.append(f"{name}: its output does not line up with the teacher's; skipped")
        return None
    dim = _out_dim(m, len(s_shape))
    kept = keep.get((name, "out", -1))
    want = list(t_shape)
    if kept is not None:
        want[dim] = len(kept)
    if list(s_shape) != want:
        notes.append(f"{name}: output {tuple(s_shape)} does not match the teacher's "
                         f"{tuple(t_shape)} after its kept channels; skipped")
        return None
    return Unit(name, "layer", m, find_submodule(teacher, name), [(kept, dim)], name in touched)


def _out_dim(m: nn.Module, ndim: int) -> int:
    """The (negative) dim of ``m``'s ``ndim``-dim output that holds its output channels; a
    subclass of Linear or conv with a ``forward`` of its own (timm's ``Linear``) is read as
    its base class."""
    pruner = get_layer_pruner(m, inherited=True)
    if pruner is not None:
        return pruner.out_dim(m, ndim) - ndim
    return -1 if isinstance(m, nn.Linear) else -len(m.kernel_size) - 1


def _block_unit(model: nn.Module, teacher: nn.Module, b: str, order: List[str],
                s_shapes: Optional[Sequence[torch.Size]], t_shapes: Optional[Sequence[torch.Size]],
                keep: Dict[Key, Any], touched: set) -> Optional[Unit]:
    """The block as a unit, each of its output tensors matched to the teacher's; ``None`` when
    any cannot be (a block trained on part of its outputs would be free to spoil the rest).

    A narrowed output's channel map is the "out" keep list of a layer inside the block that
    fits it: the last in forward order for a single output; for several outputs, the one
    distinct list that fits each (the last layer may feed another output)."""
    if not s_shapes or not t_shapes or len(s_shapes) != len(t_shapes):
        return None
    inner = [keep[(n, "out", -1)] for n in reversed(order)
             if n.startswith(b + ".") and (n, "out", -1) in keep]
    outputs = []
    for s_shape, t_shape in zip(s_shapes, t_shapes):
        if len(s_shape) != len(t_shape):
            return None
        diff = [d for d in range(len(s_shape)) if s_shape[d] != t_shape[d]]
        if not diff:
            outputs.append((None, -1))
            continue
        if len(diff) > 1:
            return None
        size, full = s_shape[diff[0]], t_shape[diff[0]]
        fits = [k for k in inner if len(k) == size and int(k.max()) < full]
        if not fits or (len(s_shapes) > 1 and any(not torch.equal(k, fits[0]) for k in fits)):
            return None
        outputs.append((fits[0], diff[0] - len(s_shape)))
    pruned = any(n == b or n.startswith(b + ".") for n in touched)
    return Unit(b, "block", find_submodule(model, b), find_submodule(teacher, b), outputs,
                pruned)
