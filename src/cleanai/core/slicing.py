"""Slicing a layer's tensors in place: the one primitive every layer pruner cuts with, the log
that lets the same cuts be made elsewhere, and the autograd bookkeeping a cut leaves behind."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

# where the slices :func:`_keep` makes are logged, inside :func:`recorded_slices` only
_SLICE_LOG: "contextvars.ContextVar[Optional[List[Tuple[Tensor, int, Tensor]]]]" = \
    contextvars.ContextVar("cleanai_slice_log", default=None)


@contextlib.contextmanager
def recorded_slices() -> Iterator[List[Tuple[Tensor, int, Tensor]]]:
    """Log every slice the layer pruners make inside the block, in order, as
    ``(tensor, dim, kept indices on the CPU)``: the same cut can then be made on the tensor's
    values elsewhere (:func:`cleanai.prune_checkpoint` slices a checkpoint on disk this way,
    after pruning a meta-device copy of the model). Slices made without :func:`_keep` are
    not logged."""
    log: List[Tuple[Tensor, int, Tensor]] = []
    token = _SLICE_LOG.set(log)
    try:
        yield log
    finally:
        _SLICE_LOG.reset(token)


def _keep(t: Optional[Tensor], dim: int, idx: Tensor) -> None:
    """Slice a parameter or buffer in place (its ``.data``), keeping ``idx`` along ``dim``."""
    if t is None:
        return
    n = t.shape[dim]
    if idx.shape[0] != n or not torch.equal(idx.cpu(), torch.arange(n, dtype=idx.dtype)):  # else: keeps all
        log = _SLICE_LOG.get()
        if log is not None:
            log.append((t, dim, idx.cpu()))
        if idx.device != t.device:
            idx = idx.to(t.device)
        t.data = torch.index_select(t.data, dim, idx)  # a new contiguous tensor
    if isinstance(t, nn.Parameter) and t.grad is not None:
        t.grad = None


def drop_grad_accumulator(t: Tensor) -> None:
    """Forget the gradient accumulator autograd keeps for a leaf whose ``.data`` changed shape.

    Autograd reuses a leaf's accumulator while any graph holds it (a training loop's last
    ``loss`` keeps its whole graph), and assigning ``.data`` renews it only when the dtype or
    device changes: the next backward would then expect the old shape. Assigning data of
    another dtype, then the data back, renews it."""
    if not t.requires_grad:
        return
    data = t.data
    t.data = torch.empty(0, dtype=torch.float64 if data.dtype != torch.float64 else torch.float32,
                         device=data.device)
    t.data = data
