"""What distillation compares: the output tensor of a model, and the losses between a
student's and a teacher's outputs."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..utils.fidelity import output_tensor
from .common import RecoveryError


def pick_output(output: Any) -> torch.Tensor:
    """The tensor to compare in a model's output (:func:`cleanai.utils.output_tensor`)."""
    try:
        return output_tensor(output)
    except ValueError as exc:
        raise RecoveryError(f"distill: {exc}") from None


def auto_loss(output: Any, picked: torch.Tensor, custom_pick: bool) -> str:
    if not custom_pick:
        for key, name in (("logits", "kl"), ("last_hidden_state", "cosine")):
            if (key in output) if isinstance(output, dict) else hasattr(output, key):
                return name
    if picked.dim() == 2:
        return "kl"
    return "cosine" if picked.dim() >= 3 else "mse"


def relative_mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)


def loss_value(name: str, s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    s, t = s.float(), t.float()
    if name == "kl":
        log_s = F.log_softmax(s / temperature, dim=-1)
        log_t = F.log_softmax(t / temperature, dim=-1)
        return (log_t.exp() * (log_t - log_s)).sum(-1).mean() * temperature ** 2
    if name == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1).mean()
    return relative_mse(s, t)
