"""Data-free importances: weight magnitude and random."""
from __future__ import annotations

import weakref
from typing import List, Optional

import torch
from torch import nn

from ..core.graph import Group
from .base import Importance, member_weights, normalize, slice_norms


class WeightImportance(Importance):
    """``||W_c||_p`` over every weight that holds channel c: producer rows, consumer columns and
    norm scales of the whole group, then normalised within the group.

    Args:
        p: the norm's order.
        normalizer: ``"mean"`` (default), ``"max"``, ``"sum"``, ``"rank"``, ``"zscore"`` or None.
    """

    def __init__(self, p: float = 2, normalizer: Optional[str] = "mean") -> None:
        if p <= 0:
            raise ValueError(f"p must be positive, got {p}")
        normalize(torch.ones(2), normalizer)  # validates the name now, not at pruning time
        self.p = p
        self.normalizer = normalizer
        self._cache: dict = {}

    def raw(self, group: Group, model: nn.Module) -> torch.Tensor:
        """Unnormalised ``||W_c||_p`` per group channel."""
        size = group.size
        total = torch.zeros(size)
        # members that hold part of the group (a DenseNet concat has dozens per group) are
        # added with one index_add_, in member order: every channel sums in the same order
        channels: List[torch.Tensor] = []
        values: List[torch.Tensor] = []
        for member, tensor, dim in member_weights(group, model):
            per_slice = self._slice_norms(tensor, dim)
            n = per_slice.shape[0]
            if member.identity and n == size:  # slice j is channel j
                if values:
                    _add_at(total, channels, values)
                total.add_(per_slice)
            else:
                channels.append(member.channels)
                values.append(per_slice.index_select(
                    0, member.positions if n == member.length else member.positions % n))
        if values:
            _add_at(total, channels, values)
        return total.pow(1.0 / self.p)

    def _slice_norms(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        # a layer read by many groups (a DenseNet concat consumer) is reduced once; the key
        # changes whenever the tensor is sliced or updated in place; the weak reference tells a
        # live tensor from a new one that reuses a collected tensor's id and memory
        if tensor.dim() < 2:  # a norm scale or bias: cheaper to reduce than to look up
            return slice_norms(tensor, dim, self.p)
        key = (id(tensor), tensor.data_ptr(), tensor._version, tuple(tensor.shape), dim)
        hit = self._cache.get(key)
        if hit is None or hit[0]() is not tensor:
            if len(self._cache) > 4096:
                self._cache.clear()
            forget = _forget(self._cache, key)  # the entry leaves with its tensor
            hit = self._cache[key] = (weakref.ref(tensor, forget), slice_norms(tensor, dim, self.p))
        return hit[1]

    def __call__(self, group: Group, model: nn.Module) -> torch.Tensor:
        return normalize(self.raw(group, model), self.normalizer)

    def __repr__(self) -> str:
        return f"WeightImportance(p={self.p}, normalizer={self.normalizer!r})"


def _add_at(total: torch.Tensor, channels: List[torch.Tensor], values: List[torch.Tensor]) -> None:
    """``total[channels[i]] += values[i]`` for every i, in order, as one index_add_; empties the lists."""
    if len(values) == 1:
        total.index_add_(0, channels[0], values[0])
    else:
        total.index_add_(0, torch.cat(channels), torch.cat(values))
    channels.clear()
    values.clear()


def _forget(cache: dict, key: tuple):
    def callback(_ref) -> None:
        cache.pop(key, None)
    return callback


class RandomImportance(Importance):
    """Uniform random scores: a baseline. ``seed`` makes the draw reproducible."""

    needs_values = False

    def __init__(self, seed: Optional[int] = None) -> None:
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    def __call__(self, group: Group, model: nn.Module) -> torch.Tensor:
        return torch.rand(group.size, generator=self.generator)

    def __repr__(self) -> str:
        return "RandomImportance()"
