"""Output sensitivity: how much the model's output moves when a channel is removed, to first
order, measured on calibration data with no labels (a Fisher-style mask score)."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from ..core.graph import DependencyGraph, Group
from ..core.layers import get_layer_pruner
from ..core.runtime import iter_tensors, preserved_state, run_forward
from .base import Importance, normalize
from .stats import _to_device, iterate_batches, model_inputs, padding_mask

OutputFn = Callable[[Any, Any], Any]


class OutputSensitivity(Importance):
    """``sum over samples of (d <r, f(x)> / d m_c)^2`` per channel c: m_c is a multiplicative
    mask (1 = kept) on channel c wherever a layer reads it, f(x) the model's output on one
    calibration sample and r a fresh Gaussian vector per batch, so the sum estimates the
    squared norm of the output's change when c is removed (the Fisher information of the mask).

    Its scores are in one unit across the whole model (output change), so they compare
    channels of different layers without normalising. That is what it is for: as
    ``StructuredPruner(allocation=OutputSensitivity())`` it decides how many channels each
    group loses, and the pruner's ``importance`` which. It needs no labels.

    Args:
        output_fn: ``output_fn(outputs, inputs) -> tensor(s)``: what counts as the model's
            output (e.g. a pooled, normalised sentence embedding). Default: every floating
            tensor the model returns; under an ``attention_mask`` padded tokens do not count.
        seed: seeds the random projections, so the scores are reproducible.
        normalizer: see :func:`~cleanai.importance.normalize`; ``None`` (default) keeps the
            common unit.

    A group none of whose consumers could be masked (its channels are read only inside a
    fused layer: ``nn.MultiheadAttention`` heads, an LSTM's hidden units) scores ``nan``:
    an allocation leaves it at its own ratio. Call :meth:`StructuredPruner.calibrate` before
    planning, and again after each step.
    """

    requires_data = True

    def __init__(self, output_fn: Optional[OutputFn] = None, seed: int = 0,
                 normalizer: Optional[str] = None) -> None:
        if output_fn is not None and not callable(output_fn):
            raise TypeError("output_fn must be callable: output_fn(outputs, inputs) -> tensor")
        normalize(torch.ones(2), normalizer)
        self.output_fn = output_fn
        self.seed = int(seed)
        self.normalizer = normalizer
        self.scores: Optional[Dict[int, torch.Tensor]] = None

    @property
    def ready(self) -> bool:
        return self.scores is not None

    def calibrate(self, model: nn.Module, graph: DependencyGraph, data: Iterable,
                  max_batches: Optional[int] = None, forward_fn=None,
                  progress: bool = False) -> None:
        groups = [g for g in graph.groups if g.size > 1]
        readers = _Readers(model, groups)
        totals = {g.id: torch.zeros(g.size, dtype=torch.float64) for g in groups}
        gen = torch.Generator().manual_seed(self.seed)
        fn = forward_fn or graph.forward_fn
        batches = 0
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            with preserved_state(model), torch.enable_grad(), readers:
                model.eval()
                for p, _ in flags:
                    p.requires_grad_(False)
                for batch in iterate_batches(data, max_batches, progress, "sensitivity"):
                    inputs = _to_device(model_inputs(batch), model)
                    readers.start(_batch_size(inputs))
                    out = run_forward(model, inputs, fn)
                    target = _projected(self.output_fn(out, inputs) if self.output_fn else out,
                                        padding_mask(inputs), gen)
                    readers.add_scores(target, totals)
                    batches += 1
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
        if batches == 0:
            raise ValueError("calibration data yielded no batches")
        for gid in readers.unmeasured(groups):
            totals[gid].fill_(math.nan)
        self.scores = totals

    def synchronize(self, model: nn.Module, process_group) -> None:
        if self.scores is None:
            return
        from ..distributed import all_reduce_tensors
        ids = sorted(self.scores)
        summed = all_reduce_tensors([self.scores[i] for i in ids],
                                    [self.scores[i] for i in ids], process_group)
        self.scores = dict(zip(ids, summed))

    def follow(self, layers: List[dict]) -> None:
        self.scores = None  # the channels moved: measure again on the pruned model

    def __call__(self, group: Group, model: nn.Module) -> torch.Tensor:
        if self.scores is None:
            raise RuntimeError("OutputSensitivity needs calibration: call "
                               "pruner.calibrate(data) before planning (and after each step)")
        s = self.scores.get(group.id)
        if s is None or s.shape != (group.size,):
            return torch.full((group.size,), math.nan)
        return normalize(s.float(), self.normalizer)

    def __repr__(self) -> str:
        fn = "" if self.output_fn is None else \
            f"output_fn={getattr(self.output_fn, '__name__', type(self.output_fn).__name__)}, "
        return f"OutputSensitivity({fn}seed={self.seed}, normalizer={self.normalizer!r})"


class _Readers:
    """Forward pre-hooks that multiply the input of every layer reading a group's channels by
    a ones mask that requires grad (one row per sample where the input has a batch dim), and
    the per-group sums of the masks' squared gradients."""

    def __init__(self, model: nn.Module, groups: List[Group]) -> None:
        self.model = model
        self.groups = groups
        self.names = sorted({m.name for g in groups for m in g.members if m.kind == "in"})
        self.masks: Dict[str, List[Tuple[torch.Tensor, int, int]]] = {}  # (mask, rows dim, dim)
        self.seen: set = set()  # readers masked on some batch
        self.called: set = set()  # readers that ran (a layer the forward skips reads nothing)
        self.batch: Optional[int] = None  # this forward's batch size
        self.recording = True  # off while gradients run: a checkpointed block runs again
        self._handles: list = []

    def __enter__(self) -> "_Readers":
        try:
            for name in self.names:
                module = self.model.get_submodule(name)
                pruner = get_layer_pruner(module)
                if pruner is not None:
                    self._handles.append(module.register_forward_pre_hook(
                        self._hook(name, pruner), with_kwargs=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.masks.clear()

    def _hook(self, name: str, pruner: Any):
        def fn(module, args, kwargs):
            self.called.add(name)
            x = next((a for a in list(args) + list(kwargs.values())
                      if isinstance(a, torch.Tensor)), None)
            if x is None or x.dim() == 0 or not x.is_floating_point():
                return None
            dim = pruner.in_dim(module, x.dim()) % x.dim()
            if x.shape[dim] != pruner.in_channels(module):
                return None
            # one row per sample: the first other dim of the batch's size ([T, B, C] too)
            rows = next((d for d in range(x.dim()) if d != dim and x.shape[d] == self.batch),
                        None)
            shape = [1] * x.dim()
            shape[dim] = x.shape[dim]
            if rows is not None:
                shape[rows] = x.shape[rows]
            mask = torch.ones(shape, dtype=x.dtype, device=x.device, requires_grad=True)
            if self.recording:
                self.masks.setdefault(name, []).append((mask, rows, dim))
            y = x * mask  # every argument that is this tensor (query is key is value) reads y
            return (tuple(y if a is x else a for a in args),
                    {k: (y if v is x else v) for k, v in kwargs.items()})
        return fn

    def start(self, batch: Optional[int]) -> None:
        self.masks.clear()
        self.batch = batch

    def add_scores(self, target: Optional[torch.Tensor], totals: Dict[int, torch.Tensor]) -> None:
        """Add this batch's squared mask gradients of ``target`` (a scalar) to ``totals``.

        ``target`` projects every output on independent Gaussian draws, so the squared
        gradient is an unbiased estimate of the output's squared change whether it is
        taken per sample or over a whole batch; per sample it varies less. Readers whose
        rows differ (a ``[B*T, C]`` view next to a ``[B, T, C]`` input) are added over the
        batch before squaring, so their effects still add up."""
        entries = [(n, m) for n, calls in self.masks.items() for m in calls]
        if target is None or not entries or not target.requires_grad:
            return
        self.recording = False
        try:
            grads = torch.autograd.grad(target, [m[0] for _, m in entries], allow_unused=True)
        finally:
            self.recording = True
        per: Dict[str, torch.Tensor] = {}  # name -> [rows, channels], summed over calls
        for (n, (mask, rows, dim)), g in zip(entries, grads):
            g = torch.zeros_like(mask) if g is None else g.detach()
            if rows is None:
                g = g.reshape(1, -1)
            else:
                g = g.movedim((rows, dim), (0, 1)).reshape(mask.shape[rows], mask.shape[dim])
            g = g.double().cpu()
            if n in per and per[n].shape != g.shape:  # calls with other rows: the batch's sum
                g = per[n].sum(0, keepdim=True) + g.sum(0, keepdim=True)
            elif n in per:
                g = per[n] + g
            per[n] = g
        self.seen.update(per)
        for grp in self.groups:
            parts = []
            for m in grp.members:
                g = per.get(m.name) if m.kind == "in" else None
                if g is not None and g.shape[1] == m.length:
                    parts.append(torch.zeros(g.shape[0], grp.size, dtype=torch.float64)
                                 .index_add_(1, m.channels, g[:, m.positions]))
            if not parts:
                continue
            if len({p.shape[0] for p in parts}) > 1:
                parts = [p.sum(0, keepdim=True) for p in parts]
            acc = torch.stack(parts).sum(0)
            totals[grp.id] += (acc * acc).sum(0)

    def unmeasured(self, groups: List[Group]) -> List[int]:
        """The groups not every reader of which was masked: one read by no layer the hooks
        reach, or also read where no mask is (a bare parameter in a functional call, the
        inside of a fused layer, a layer called with an input the hook could not mask),
        whose score would miss that part. A reader the forward never calls (an auxiliary
        head in eval mode) reads nothing."""
        return [g.id for g in groups
                if not any(m.kind == "in" and m.name in self.seen for m in g.members)
                or any(m.kind in ("param", "internal") or
                       (m.kind == "in" and m.name in self.called and m.name not in self.seen)
                       for m in g.members)]


def _batch_size(inputs: Any) -> Optional[int]:
    """The leading dim of the first tensor of a batch's inputs."""
    t = next((t for t in iter_tensors(inputs) if t.dim() > 0), None)
    return None if t is None else t.shape[0]


def _projected(out: Any, mask: Optional[torch.Tensor], gen: torch.Generator
               ) -> Optional[torch.Tensor]:
    """``sum <r, t>`` over the floating tensors ``t`` of ``out`` that depend on the masks,
    ``r`` standard normal (zero at padded tokens when ``mask`` marks them)."""
    total = None
    for t in iter_tensors(out):
        if not (t.is_floating_point() and t.requires_grad) or t.dim() == 0:
            continue  # a 0-dim output is a loss (labels in the batch), not the model's output
        r = torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.device, t.dtype)
        if mask is not None and t.dim() >= 3 and t.shape[:2] == mask.shape:  # [B, T, ...]
            r = r * mask.to(t.device).reshape(mask.shape + (1,) * (t.dim() - 2)).to(t.dtype)
        term = (t * r).sum()
        total = term if total is None else total + term
    return total
