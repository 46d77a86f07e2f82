"""Re-estimating BatchNorm statistics after pruning."""
from __future__ import annotations

import itertools
from typing import Iterable, Optional

import torch
from torch import nn

from ..core.runtime import ForwardFn, run_forward


def recalibrate_bn(model: nn.Module, data: Iterable, max_batches: Optional[int] = 20,
                   forward_fn: Optional[ForwardFn] = None, progress: bool = False) -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``data``.

    Pruning shifts the statistics each BatchNorm sees; a few forward passes with the other
    layers in eval mode recover much accuracy before any fine-tuning. Uses a cumulative average
    over the batches (``momentum=None``), then restores momentum and train/eval modes.
    Batches are given as in :meth:`StructuredPruner.calibrate`. Returns the batches used.
    """
    from ..importance.stats import iterate_batches, model_inputs, _to_device

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return 0
    it = iter(iterate_batches(data, max_batches, progress, "recalibrating BatchNorm"))
    first = next(it, None)
    if first is None:  # checked before the statistics are reset: empty data changes nothing
        raise ValueError("recalibrate_bn: the data yielded no batches")
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    batches = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for batch in itertools.chain([first], it):
                run_forward(model, _to_device(model_inputs(batch), model), forward_fn)
                batches += 1
    finally:
        for m, mode in modes:
            m.training = mode
        for m, momentum in momenta:
            m.momentum = momentum
    return batches
