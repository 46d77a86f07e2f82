"""The importance interface: a score per channel of a group."""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..core.groups import Group, Member
from ..core.layers import get_layer_pruner
from ..core.runtime import find_submodule

NORMALIZERS = ("mean", "max", "sum", "rank", "zscore", None)


class Importance:
    """Scores the channels of a group; low scores are pruned first.

    Subclasses implement ``__call__(group, model) -> Tensor[group.size]`` (float, on CPU).
    Scores are compared within a group, and across groups when pruning globally, so return
    them normalised (see :func:`normalize`).

    Example, a custom importance that prefers channels with large biases::

        from cleanai.importance import member_weights, normalize
        from cleanai.importance.base import channel_sums

        class BiasImportance(cleanai.importance.Importance):
            def __call__(self, group, model):
                scores = torch.zeros(group.size)
                for member, tensor, dim in member_weights(group, model, sides=("out",)):
                    if tensor.dim() == 1:
                        scores += channel_sums(member, tensor.detach().abs(), group.size)
                return normalize(scores, "mean")
    """

    #: True when the scores need :meth:`StructuredPruner.calibrate` to run first.
    requires_data: bool = False
    #: False when the scores need no weight values, so a model on the meta device (shapes
    #: only) can be planned: random scores, or norms read from a checkpoint.
    needs_values: bool = True

    @property
    def ready(self) -> bool:
        """False while a data-dependent importance still waits for calibration."""
        return True

    def calibrate(self, model: nn.Module, graph, data, max_batches=None, forward_fn=None,
                  progress: bool = False) -> None:
        """Measure what the scores need on calibration ``data`` (no-op for data-free scores)."""

    def adopt(self, stats) -> bool:
        """Take activation statistics another pass already collected (the pruner's, when it
        calibrates for compensation); True when they are all this importance needs."""
        return False

    def synchronize(self, model: nn.Module, process_group) -> None:
        """Make what :meth:`calibrate` measured on this rank's data hold for every rank's data
        together (a sum across ranks, see :mod:`cleanai.distributed`). Called on every rank
        after calibration under a process group; a data-dependent importance that does not
        override it plans from rank 0's data alone."""

    def follow(self, layers: List[dict]) -> None:
        """Called after a pruning step with its history entry (``name``, ``kind``, ``keep``),
        so collected statistics can follow the sliced layers."""

    def __call__(self, group: Group, model: nn.Module) -> torch.Tensor:
        raise NotImplementedError


def normalize(scores: torch.Tensor, how: Optional[str]) -> torch.Tensor:
    """Put a group's scores on a common scale: divide by their mean, max or sum, replace them
    by their rank in [0, 1], or standardise them (``"zscore"``); ``None`` leaves them."""
    scores = scores.float()
    if how is None:
        return scores
    if how == "mean":
        return scores / scores.mean().clamp_min(1e-12)
    if how == "max":
        return scores / scores.max().clamp_min(1e-12)
    if how == "sum":
        return scores / scores.sum().clamp_min(1e-12)
    if how == "rank":
        ranks = torch.empty_like(scores)
        ranks[scores.argsort()] = torch.arange(len(scores), dtype=scores.dtype)
        return ranks / max(1, len(scores) - 1)
    if how == "zscore":
        return (scores - scores.mean()) / scores.std(unbiased=False).clamp_min(1e-12)
    raise ValueError(f"unknown normalizer {how!r}; choose one of {NORMALIZERS}")


def member_weights(group: Group, model: nn.Module, sides=("out", "in", "same", "param", "internal")
                   ) -> List[Tuple[Member, torch.Tensor, int]]:
    """Every weight tensor that holds a group channel, with the dim its channels are on.

    Producer rows for ``out`` members, consumer columns for ``in`` members, scales for
    ``same`` members (norm layers), the traced dim for bare parameters and a layer's own
    tensors for ``internal`` members (attention heads, hidden units).
    """
    out = []
    for m in group.members:
        if m.kind not in sides:
            continue
        if m.kind == "param":
            owner, _, leaf = m.name.rpartition(".")
            if leaf in model.get_submodule(owner)._parameters:  # not a buffer
                out.append((m, model.get_parameter(m.name), m.dim))
            continue
        module = find_submodule(model, m.name)
        pruner = get_layer_pruner(module)
        if pruner is None:
            continue
        if m.kind == "in" and pruner.coupling(module) == "same":
            continue  # a depthwise conv's weights are counted on its output side
        if m.kind == "internal":
            out.extend((m, tensor, dim) for tensor, dim in pruner.internal_weights(module, m.dim))
            continue
        side = "out" if m.kind == "same" else m.kind
        for tensor, dim in pruner.weights(module, side):
            out.append((m, tensor, dim))
    return out


def slice_norms(tensor: torch.Tensor, dim: int, p: float) -> torch.Tensor:
    """``sum |w|^p`` of each slice of ``tensor`` along ``dim`` (a 1-D CPU tensor)."""
    # (the checks below skip no-op calls: this runs for every weight of a model)
    w = tensor.detach()
    if w.dtype is not torch.float32:
        w = w.float()
    shape = w.shape
    n = shape[dim]
    if len(shape) == 1:
        out = w * w if p == 2 else w.abs().pow(p)  # w * w: one pass, same values as |w|^2
    elif 0 in shape:
        return torch.zeros(n)
    elif dim == 0 and p == 2:  # producer rows: one fused pass, no w * w copy (same up to rounding)
        out = torch.linalg.vector_norm(w.reshape(n, -1), dim=1)
        out = out * out
    else:
        w = w * w if p == 2 else w.abs().pow(p)
        if dim == 0:  # producer rows: one reduction over contiguous rows
            out = w.reshape(n, -1).sum(1)
        else:
            # one reduction over the dims before and after ``dim``: no transposed copy (two
            # chained sums, or a sum over a trailing dim of size 1, cost several times more on
            # small layers)
            out = w.reshape(math.prod(shape[:dim]), n, -1).sum((0, 2))
    return out if out.device.type == "cpu" else out.cpu()


def channel_sums(member: Member, per_slice: torch.Tensor, size: int,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Add up per-slice values (from :func:`slice_norms`) into the member's group channels.

    A grouped layer stores fewer slices than channels (``in_channels / groups`` columns);
    position j then reads slice ``j % n``. With ``out`` (a tensor of ``size`` values) the sums
    are added to it in place, and it is returned.
    """
    if out is None:
        out = torch.zeros(size)
    n = per_slice.shape[0]
    if member.identity and n == size:  # slice j is channel j
        return out.add_(per_slice)
    pos = member.positions
    if n != member.length:
        pos = pos % n
    return out.index_add_(0, member.channels, per_slice.index_select(0, pos))
