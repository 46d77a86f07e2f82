"""Activation statistics, streamed: per-channel running sums at every consumer's input."""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple

import torch
from torch import nn

from ..core.graph import DependencyGraph, Group
from ..core.layers import get_layer_pruner
from ..core.runtime import ForwardFn, map_tensors, preserved_state, run_forward

logger = logging.getLogger(__name__)

STATISTICS = ("l2", "mean_abs", "variance")
#: the running sums :class:`ActivationStats` can keep per channel, and those each statistic reads
MOMENTS = ("sum", "sum_sq", "sum_abs")
NEEDS = {"l2": ("sum_sq",), "mean_abs": ("sum_abs",), "variance": ("sum", "sum_sq")}
#: the widest input whose second moments are collected (a C x C float64 matrix: 512 MB here);
#: a wider one (a VGG classifier reading 25088 flattened features) keeps its mean only
MAX_GRAM_CHANNELS = 8192


class ActivationStats:
    """Running sums per input channel of every consumer layer: count, sum, sum of squares, sum
    of absolute values. Memory is O(channels) however many batches are seen.

    Statistics are taken where consumers read a channel (after BatchNorm and the activation),
    so a channel that every consumer sees as zero scores zero.
    """

    def __init__(self, grams: Iterable[str] = (), moments: Iterable[str] = MOMENTS,
                 shard: Tuple[int, int] = (0, 1), halves: bool = False) -> None:
        #: the sums kept (rows of :attr:`sums` not kept stay zero): a score that reads one
        #: statistic lets calibration skip the others
        self.kept = tuple(m for m in MOMENTS if m in set(moments))
        if not self.kept or set(moments) - set(MOMENTS):
            raise ValueError(f"moments must be among {MOMENTS}, got {tuple(moments)}")
        self._rows = tuple(MOMENTS.index(m) for m in self.kept)
        #: positions seen per key (a 0-dim tensor on the device while padded batches run)
        self.count: Dict[str, Any] = {}
        self.sums: Dict[str, torch.Tensor] = {}  # name -> [3, channels]: sum, sum_sq, sum_abs
        #: the keys whose second moments are also summed: ``sum x x^T`` over every position
        #: (token, pixel) of the input, [channels, channels] in float64 (closed-form
        #: compensation reads them); memory O(channels^2) per key, never O(tokens)
        self.gram_keys = frozenset(grams)
        self.grams: Dict[str, torch.Tensor] = {}
        #: the same sums over the odd-numbered batches only (count, ``sum x`` [channels] and
        #: ``sum x x^T`` in float32): a half of the data a fit can leave out, so that
        #: compensation chooses its damping on data it did not fit. Batches are numbered as
        #: :func:`cleanai.distributed.shard` deals them: ``(rank, world)`` = ``shard``, so the
        #: ranks' halves, summed, are those of one process reading every batch. Kept only
        #: with ``halves``
        self.shard = shard
        self.keep_halves = halves
        self.half_count: Dict[str, Any] = {}
        self.half_sums: Dict[str, torch.Tensor] = {}
        self.half_grams: Dict[str, torch.Tensor] = {}
        self.batches = 0
        #: ``nn.MultiheadAttention`` layers seen only as self-attention (query, key and value
        #: the same tensor on every batch): their input statistics hold for all three
        self.self_attention: set = set()
        self._cross: set = set()
        #: the current batch's ``attention_mask`` ([batch, tokens], nonzero for real tokens),
        #: when its inputs carry one: padded positions do not count
        self.mask: Optional[torch.Tensor] = None

    def update(self, name: str, x: torch.Tensor, dim: int) -> None:
        """Add one batch of activations ``x`` read by layer ``name``; ``dim`` holds its channels.

        Token positions that :attr:`mask` marks as padding are left out."""
        x = x.detach().float()
        dim = dim % x.dim()
        real = _real_tokens(x, dim, self.mask)
        if x.numel() == 0:
            return
        if real is not None:  # padded tokens zeroed, not indexed away: no wait for the device
            x = torch.where(real.reshape(real.shape + (1,) * (x.dim() - 2)), x, 0.0)
        # reduced where the tensor lies, no transposed copy (channels last: down the rows;
        # channels inside: fused norms over the contiguous positions after them), so the hooks
        # cost little next to the layers; summed where the activations are: a copy to the CPU
        # here would wait for the device on every layer of every batch; float64 where the
        # device has it
        wide = torch.float64 if x.device.type in ("cpu", "cuda") else torch.float32
        channels = x.shape[dim]
        if dim == x.dim() - 1:
            rows = x.reshape(-1, channels)
            moment = {"sum": lambda: rows.sum(0), "sum_sq": lambda: (rows * rows).sum(0),
                      "sum_abs": lambda: rows.abs().sum(0)}
        else:
            m = x.reshape(math.prod(x.shape[:dim]), channels, -1)
            moment = {"sum": lambda: m.sum((0, 2)),
                      "sum_sq": lambda: torch.linalg.vector_norm(m, 2, 2).square().sum(0),
                      "sum_abs": lambda: torch.linalg.vector_norm(m, 1, 2).sum(0)}
        positions: Any = x.numel() // max(channels, 1)
        if real is not None:  # a 0-dim tensor on the device, read once calibration ends
            positions = real.sum(dtype=wide) * (positions // real.numel())
        fresh = not (name in self.sums and self.sums[name].shape == (3, channels))
        if fresh:
            self.sums[name] = torch.zeros(3, channels, dtype=wide, device=x.device)
            self.count[name] = positions if real is not None else float(positions)
            for held in (self.half_count, self.half_sums, self.half_grams):
                held.pop(name, None)
        else:
            self.count[name] += positions
        sums = self.sums[name]
        for row, key in zip(self._rows, self.kept):
            sums[row].add_(moment[key]())  # float32 batch sums into float64 totals
        if name in self.gram_keys and channels <= MAX_GRAM_CHANNELS:
            # one batch's products in float32 (several times faster than float64 on a CPU),
            # summed across batches in float64; channels last is a free view
            if dim != x.dim() - 1:
                rows = x.movedim(dim, -1).reshape(-1, channels)
            product = rows.T @ rows
            gram = product.to(wide)
            if fresh or name not in self.grams:
                self.grams[name] = gram
            else:
                self.grams[name] += gram
            if self.keep_halves and (self.batches * self.shard[1] + self.shard[0]) % 2 == 1:
                self._add_half(name, positions, rows.sum(0).to(wide), product)

    def _add_half(self, name: str, positions: Any, total: torch.Tensor,
                  product: torch.Tensor) -> None:
        if name in self.half_grams:
            self.half_count[name] += positions
            self.half_sums[name] += total
            self.half_grams[name] += product
        else:  # a count on the device is a tensor: a copy, not the total's own
            self.half_count[name] = positions.clone() if isinstance(positions, torch.Tensor) \
                else positions
            self.half_sums[name] = total
            self.half_grams[name] = product.clone()

    def note_attention_call(self, name: str, args: tuple, kwargs: dict) -> None:
        """Record whether an attention layer was called with one tensor as query, key and
        value (self-attention) or not."""
        q, k, v = (list(args) + [None] * 3)[:3]
        q, k, v = kwargs.get("query", q), kwargs.get("key", k), kwargs.get("value", v)
        if q is not None and q is k and k is v and name not in self._cross:
            self.self_attention.add(name)
        else:
            self._cross.add(name)
            self.self_attention.discard(name)

    def moments(self, name: str) -> Optional[Tuple[torch.Tensor, torch.Tensor, float]]:
        """``(mean, second moment, count)`` of the input of ``name`` in float64 on the CPU:
        ``E[x]`` [channels] and ``E[x x^T]`` [channels, channels] over every position seen;
        ``None`` when its second moments were not collected."""
        if name not in self.grams:
            return None
        n = max(self.positions(name), 1.0)
        return (self.sums[name][0].cpu().double() / n, self.grams[name].cpu().double() / n,
                self.positions(name))

    def held_out(self, name: str) -> Optional[Tuple[Tuple[torch.Tensor, torch.Tensor, float],
                                                     Tuple[torch.Tensor, torch.Tensor, float]]]:
        """The :meth:`moments` of the even- and of the odd-numbered calibration batches of
        ``name``'s input, two disjoint halves of the data (float64, CPU); ``None`` when one
        of them is empty (a single batch)."""
        full = self.moments(name)
        if full is None or name not in self.half_grams:
            return None
        n_odd = self.half_count[name]
        if isinstance(n_odd, torch.Tensor):
            n_odd = self.half_count[name] = float(n_odd)
        n_all = full[2]
        n_even = n_all - n_odd
        if n_odd < 1 or n_even < 1:
            return None
        s_odd = self.half_sums[name].cpu().double()
        g_odd = self.half_grams[name].cpu().double()
        s_all = self.sums[name][0].cpu().double()
        g_all = self.grams[name].cpu().double()
        return ((s_all - s_odd) / n_even, (g_all - g_odd) / n_even, n_even), \
               (s_odd / n_odd, g_odd / n_odd, n_odd)

    def nbytes(self) -> int:
        """The memory these statistics hold: sums, second moments and their held-out half."""
        held = [self.sums, self.grams, self.half_sums, self.half_grams]
        return sum(t.numel() * t.element_size() for d in held for t in d.values())

    def positions(self, name: str) -> float:
        """How many positions (tokens, pixels, samples) of the input of ``name`` were seen."""
        n = self.count[name]
        if isinstance(n, torch.Tensor):
            n = self.count[name] = float(n)
        return n

    def per_position(self, name: str, statistic: str) -> Optional[torch.Tensor]:
        """One value per input channel of layer ``name``: ``l2`` is the root of the mean square,
        ``mean_abs`` the mean of ``|a|``, ``variance`` the variance."""
        if name not in self.sums:
            return None
        if statistic in NEEDS and not set(NEEDS[statistic]) <= set(self.kept):
            raise ValueError(f"the {statistic!r} statistic reads {NEEDS[statistic]}, but these "
                             f"statistics kept only {self.kept}: calibrate again")
        s, n = self.sums[name].cpu().double(), max(self.positions(name), 1.0)
        if statistic == "l2":
            return (s[1] / n).sqrt().float()
        if statistic == "mean_abs":
            return (s[2] / n).float()
        if statistic == "variance":
            return (s[1] / n - (s[0] / n) ** 2).clamp_min(0).float()
        raise ValueError(f"unknown statistic {statistic!r}; choose one of {STATISTICS}")

    def keep(self, name: str, keep: torch.Tensor) -> None:
        """Follow a pruning step: keep only the statistics of the kept input channels."""
        if name in self.sums and self.sums[name].shape[1] != len(keep):  # not followed yet
            keep = keep.to(self.sums[name].device)
            self.sums[name] = self.sums[name][:, keep]
            if name in self.grams:
                self.grams[name] = self.grams[name][keep][:, keep]
            if name in self.half_grams:
                self.half_sums[name] = self.half_sums[name][keep]
                self.half_grams[name] = self.half_grams[name][keep][:, keep]

    def group_scores(self, group: Group, statistic: str) -> Optional[torch.Tensor]:
        """Per group channel, the statistic aggregated (averaged) over every consumer position
        that reads it, and over a layer's internal positions (attention heads' outputs);
        ``None`` when no consumer of the group was seen."""
        total = torch.zeros(group.size)
        hits = torch.zeros(group.size)
        for m in group.members:
            if m.kind not in ("in", "internal"):
                continue
            values = self.per_position(stats_key(m.name, m.kind, m.dim), statistic)
            if values is None or values.numel() != m.length:
                continue
            total.index_add_(0, m.channels, values[m.positions])
            hits.index_add_(0, m.channels, torch.ones(len(m.positions)))
        if not bool((hits > 0).any()):
            return None
        return total / hits.clamp_min(1)


def padding_mask(inputs: Any) -> Optional[torch.Tensor]:
    """The ``attention_mask`` of a dict batch (Hugging Face style, [batch, tokens]) as bools,
    or ``None``."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.bool()
    return None


def _real_tokens(x: torch.Tensor, dim: int, mask: Optional[torch.Tensor]
                 ) -> Optional[torch.Tensor]:
    """``mask`` on ``x``'s device when it marks ``x``'s padded tokens (``x`` is
    ``[batch, tokens, ..., channels]`` with channels last and leading dims matching), else
    ``None``."""
    if mask is None or x.dim() < 3 or dim != x.dim() - 1 or x.shape[:2] != mask.shape:
        return None
    return mask.to(x.device, non_blocking=True)


def drop_padding(x: torch.Tensor, dim: int, mask: Optional[torch.Tensor]
                 ) -> Tuple[torch.Tensor, int]:
    """``x`` without its padded token positions: a ``[batch, tokens, ..., channels]`` tensor
    whose leading dims match ``mask`` becomes ``[real tokens, ..., channels]``; anything else
    (channels not last, other shapes) is returned as it is."""
    if mask is None or x.dim() < 3 or dim != x.dim() - 1 or x.shape[:2] != mask.shape:
        return x, dim
    return x[mask.to(x.device)], dim - 1


def stats_key(name: str, kind: str, dim: int) -> str:
    """Where a member's statistics are kept: the layer name for its input, ``name#i`` for its
    internal dim i."""
    return name if kind == "in" else f"{name}#{dim}"


@contextmanager
def consumer_hooks(model: nn.Module, graph: DependencyGraph, stats: ActivationStats) -> Iterator[None]:
    """Forward pre-hooks on every layer that consumes a group's channels; removed on exit,
    also when the body raises."""
    names = sorted({m.name for g in graph.groups for m in g.members if m.kind == "in"})
    inside = {}  # layer -> {internal dim index: positions}
    for g in graph.groups:
        for m in g.members:
            if m.kind == "internal":
                inside.setdefault(m.name, {})[m.dim] = m.length
    handles = []

    def hook(name: str, pruner, module):
        def fn(mod, args, kwargs) -> None:
            if isinstance(mod, nn.MultiheadAttention):
                stats.note_attention_call(name, args, kwargs)
            x = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if x is not None and x.dim() > 0:
                dim = pruner.in_dim(mod, x.dim())
                if x.shape[dim] == pruner.in_channels(mod):
                    stats.update(name, x, dim)
        return fn

    def internal_hook(name: str, pruner, lengths):
        def fn(mod, args, kwargs, output) -> None:
            for i, a in enumerate(pruner.internal_activations(mod, args, kwargs, output)):
                if i in lengths and isinstance(a, torch.Tensor) and a.dim() > 0 \
                        and a.shape[-1] == lengths[i]:
                    stats.update(stats_key(name, "internal", i), a, a.dim() - 1)
        return fn

    try:
        for name in names:
            module = model.get_submodule(name)
            pruner = get_layer_pruner(module)
            if pruner is not None:
                handles.append(module.register_forward_pre_hook(
                    hook(name, pruner, module), with_kwargs=True))
        for name, lengths in inside.items():
            module = model.get_submodule(name)
            pruner = get_layer_pruner(module)
            if pruner is not None:
                handles.append(module.register_forward_hook(
                    internal_hook(name, pruner, lengths), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def iterate_batches(data: Iterable, max_batches: Optional[int], progress: bool,
                    desc: str = "calibrating") -> Iterator[Any]:
    """Yield up to ``max_batches`` batches, with a tqdm bar (or log lines) when ``progress``."""
    total = max_batches
    if total is None and hasattr(data, "__len__"):
        total = len(data)
    it: Iterable = data
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, desc=desc, unit="batch")
        except ImportError:
            bar = None
    try:
        for i, batch in enumerate(it):
            if max_batches is not None and i >= max_batches:
                break
            yield batch
            if bar is not None:
                bar.update(1)
            elif progress:
                logger.info("%s: batch %d%s", desc, i + 1, f"/{total}" if total else "")
    finally:
        if bar is not None:
            bar.close()


def model_inputs(batch: Any) -> Any:
    """The model's inputs in a calibration batch: a ``(inputs, target)`` pair gives ``inputs``;
    a tensor or dict is passed as is."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor) \
            and isinstance(batch[1], torch.Tensor) and batch[1].dim() <= 1:
        return batch[0]
    return batch


def collect(model: nn.Module, graph: DependencyGraph, data: Iterable,
            max_batches: Optional[int] = None, forward_fn: Optional[ForwardFn] = None,
            progress: bool = False, grams: Iterable[str] = (),
            moments: Iterable[str] = MOMENTS, shard: Tuple[int, int] = (0, 1),
            halves: bool = False) -> ActivationStats:
    """Run calibration batches in eval mode under ``no_grad`` and return the statistics;
    ``grams``: the keys (:func:`stats_key`) whose second moments are summed too;
    ``moments``: the per-channel sums kept (see :data:`NEEDS`); ``shard``: this process's
    ``(rank, world)`` when the batches are its share of the data; ``halves``: keep the odd
    batches' second moments apart too (:meth:`ActivationStats.held_out`)."""
    stats = ActivationStats(grams, moments, shard, halves)
    fn = forward_fn or graph.forward_fn
    with preserved_state(model), torch.no_grad(), consumer_hooks(model, graph, stats):
        model.eval()
        for batch in iterate_batches(data, max_batches, progress):
            inputs = _to_device(model_inputs(batch), model)
            stats.mask = padding_mask(inputs)
            run_forward(model, inputs, fn)
            stats.batches += 1
        stats.mask = None
    if stats.batches == 0:
        raise ValueError("calibration data yielded no batches")
    return stats


def _to_device(inputs: Any, model: nn.Module) -> Any:
    p = next(model.parameters(), None)
    if p is None:
        return inputs
    return map_tensors(inputs, lambda t: t.to(p.device))
