"""Model size and cost: unique parameters, and multiply-accumulates of one forward pass.

MACs come from :class:`torch.utils.flop_counter.FlopCounterMode`, which counts the matrix
products and convolutions PyTorch dispatches (the usual fvcore/ptflops convention: element-wise
ops, norms and activations are not counted). One MAC is two FLOPs.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter
from torch.utils.flop_counter import FlopCounterMode

from ..core.runtime import ForwardFn, preserved_state, run_forward

__all__ = ["count_params", "count_macs"]


def count_params(model: nn.Module) -> int:
    """Number of parameter elements in ``model``; a parameter shared by several layers (tied
    weights) is counted once.

    Raises:
        ValueError: if the model still has uninitialized (lazy) parameters.
    """
    total = 0
    for name, p in model.named_parameters():  # named_parameters() skips repeats of a Parameter
        if isinstance(p, UninitializedParameter):
            raise ValueError(
                f"{type(model).__name__}.{name} is a lazy parameter that is not initialized yet; "
                f"run one forward pass before counting parameters.")
        total += p.numel()
    return total


def count_macs(model: nn.Module, example_inputs: Any,
               forward_fn: Optional[ForwardFn] = None) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on ``example_inputs``.

    Args:
        model: any ``nn.Module``; its train/eval mode, buffers and the RNG are left as they were.
        example_inputs: a tensor, a tuple (passed positionally) or a dict (passed as keywords),
            on the model's device. The batch size counts: MACs grow with it.
        forward_fn: optional ``forward_fn(model, example_inputs) -> outputs`` for models that
            need a custom call.

    Returns:
        MACs as counted by ``FlopCounterMode`` (FLOPs // 2), under ``torch.no_grad``.

    Raises:
        RuntimeError: if the forward pass fails, naming the model and the original error.
    """
    counter = FlopCounterMode(display=False)
    with preserved_state(model, same_modes=True), torch.no_grad():
        try:
            with counter:
                run_forward(model, example_inputs, forward_fn)
        except Exception as exc:  # the user's forward: report it with the model's name
            raise RuntimeError(
                f"count_macs could not run {type(model).__name__} on the example inputs: "
                f"{type(exc).__name__}: {exc}") from exc
    return int(counter.get_total_flops()) // 2
