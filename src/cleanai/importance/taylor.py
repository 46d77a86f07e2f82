"""First-order Taylor importance: ``|w * dL/dw|`` summed over a channel's weights."""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core.graph import DependencyGraph, Group
from ..core.runtime import preserved_state
from .base import Importance, channel_sums, member_weights, normalize, slice_norms
from .stats import iterate_batches

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def cross_entropy_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The default loss: ``cross_entropy(model(x), y)`` for an ``(x, y)`` batch."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError("TaylorImportance's default loss needs (inputs, targets) batches; "
                         "pass loss_fn=lambda model, batch: ... for other data")
    x, y = batch
    out = model(x)
    out = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(out, y)


class TaylorImportance(Importance):
    """``sum |w * g|`` over every weight of channel c, where g is the gradient of
    ``loss_fn(model, batch)`` accumulated over the calibration batches.

    The model's own ``.grad`` fields are left as they were.

    Args:
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; default: cross-entropy on
            ``(inputs, targets)`` batches.
        normalizer: see :func:`~cleanai.importance.normalize`.

    Needs :meth:`StructuredPruner.calibrate` before planning, and again after each step.
    """

    requires_data = True

    def __init__(self, loss_fn: Optional[LossFn] = None, normalizer: Optional[str] = "mean") -> None:
        normalize(torch.ones(2), normalizer)
        self.loss_fn = loss_fn or cross_entropy_loss
        self.normalizer = normalizer
        self.grads: Optional[Dict[int, torch.Tensor]] = None

    @property
    def ready(self) -> bool:
        return self.grads is not None

    def calibrate(self, model: nn.Module, graph: DependencyGraph, data: Iterable,
                  max_batches: Optional[int] = None, forward_fn=None, progress: bool = False) -> None:
        params = [p for p in model.parameters()]
        saved = [(p, p.grad, p.requires_grad) for p in params]
        grads: Dict[int, torch.Tensor] = {}
        batches = 0
        try:
            with preserved_state(model), torch.enable_grad():
                model.eval()
                for p in params:
                    p.grad = None
                    if p.is_floating_point():
                        p.requires_grad_(True)
                for batch in iterate_batches(data, max_batches, progress, "taylor"):
                    loss = self.loss_fn(model, batch)
                    loss.backward()
                    batches += 1
                for p in params:
                    if p.grad is not None:
                        grads[id(p)] = p.grad.detach()  # p.grad is put back below: no copy needed
        finally:
            for p, g, flag in saved:
                p.grad = g
                p.requires_grad_(flag)
        if batches == 0:
            raise ValueError("calibration data yielded no batches")
        self.grads = grads

    def synchronize(self, model: nn.Module, process_group) -> None:
        if self.grads is None:
            return
        from ..distributed import all_reduce_tensors
        params = list(model.parameters())
        summed = all_reduce_tensors([self.grads.get(id(p)) for p in params], params,
                                    process_group)
        self.grads = {id(p): g for p, g in zip(params, summed) if g is not None}

    def follow(self, layers: List[dict]) -> None:
        self.grads = None  # the weights changed shape: gradients must be measured again

    def __call__(self, group: Group, model: nn.Module) -> torch.Tensor:
        if self.grads is None:
            raise RuntimeError("TaylorImportance needs gradients: call pruner.calibrate(data) "
                               "before planning (and again after each pruning step)")
        total = torch.zeros(group.size)
        for member, tensor, dim in member_weights(group, model):
            # layer pruners may hand out reshaped views (an LSTM's gate blocks, attention heads)
            base = tensor._base if tensor._base is not None else tensor
            g = self.grads.get(id(base))
            if g is None or g.shape != base.shape or base.numel() != tensor.numel():
                continue
            g = g.reshape(tensor.shape)
            total += channel_sums(member, slice_norms(tensor.detach() * g, dim, 1), group.size)
        return normalize(total, self.normalizer)

    def __repr__(self) -> str:
        return "TaylorImportance()"
