"""The error a channel's removal leaves once its consumers are refit: the structured Optimal
Brain Surgeon score, the importance that matches ``compensate="lstsq"``."""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from ..core.graph import DependencyGraph, Group
from ..core.layers import get_layer_pruner
from ..core.runtime import find_submodule
from .activation import WeightActivationImportance
from .base import Importance, normalize, slice_norms
from .stats import MAX_GRAM_CHANNELS, ActivationStats, collect, stats_key


class OBSImportance(Importance):
    """``sum over consumers of ||W_c||^2 / [S^-1]_cc``: the squared output error that removing
    channel c alone leaves in each layer that reads it, after the least-squares refit of
    ``compensate="lstsq"`` (S: the second moment of the consumer's input, with a constant).

    ``1 / [S^-1]_cc`` is what the other channels and a constant cannot predict of channel c, so
    a channel that is large but redundant scores low, where a magnitude or activation score
    would keep it. Scores come from the same calibration pass as compensation (a pruner with
    ``compensate="lstsq"`` shares it); groups whose consumers have no second moments (none
    reached, or a layer kind compensation does not know) fall back to the hybrid score.

    Args:
        damping: ridge added to S's diagonal, relative to its mean.
        normalizer: see :func:`~cleanai.importance.normalize`.
    """

    requires_data = True

    def __init__(self, damping: float = 1e-4, normalizer: Optional[str] = "mean") -> None:
        if not damping > 0:
            raise ValueError(f"damping must be positive, got {damping!r}")
        normalize(torch.ones(2), normalizer)
        self.damping = float(damping)
        self.normalizer = normalizer
        self.fallback = WeightActivationImportance(normalizer=normalizer)
        self.stats: Optional[ActivationStats] = None
        self._inverses: Dict[str, torch.Tensor] = {}  # stats key -> S^-1 over its channels

    @property
    def ready(self) -> bool:
        return self.stats is not None

    def calibrate(self, model: nn.Module, graph: DependencyGraph, data: Iterable,
                  max_batches: Optional[int] = None, forward_fn=None, progress: bool = False) -> None:
        keys = {stats_key(m.name, m.kind, m.dim) for g in graph.groups
                if g.prunable and g.size > 1 for m in g.members
                if m.kind == "in" and m.length <= MAX_GRAM_CHANNELS}
        self.adopt(collect(model, graph, data, max_batches, forward_fn, progress, grams=keys))

    def adopt(self, stats: ActivationStats) -> bool:
        if not stats.gram_keys:
            return False  # no second moments: calibrate() collects its own
        self.stats = stats
        self.fallback.adopt(stats)
        self._inverses.clear()
        return True

    def synchronize(self, model: nn.Module, process_group) -> None:
        if self.stats is not None:
            from ..distributed import all_reduce_stats
            all_reduce_stats(self.stats, process_group)  # the fallback's too: the same object
            self._inverses.clear()

    def follow(self, layers: List[dict]) -> None:
        self.fallback.follow(layers)
        self._inverses.clear()

    def _inverse(self, key: str) -> Optional[torch.Tensor]:
        """``S^-1`` over the input channels of ``key`` (float32), S with a constant appended."""
        if key not in self._inverses:
            found = self.stats.moments(key) if self.stats is not None else None
            if found is None:
                return None
            mean, second, _ = found
            n = mean.shape[0]
            s = torch.ones(n + 1, n + 1, dtype=torch.float64)
            s[:n, :n], s[:n, n], s[n, :n] = second, mean, mean
            damp = self.damping * float(second.diagonal().mean().clamp_min(1e-12))
            s[:n, :n] += damp * torch.eye(n, dtype=torch.float64)
            if not bool(torch.isfinite(s).all()):
                return None  # overflowed statistics: no score from them
            chol, info = torch.linalg.cholesky_ex(s)
            for _ in range(8):
                if not int(info):
                    break
                damp *= 10
                s[:n, :n] += damp * torch.eye(n, dtype=torch.float64)
                chol, info = torch.linalg.cholesky_ex(s)
            else:
                return None
            self._inverses[key] = torch.cholesky_inverse(chol)[:n, :n].float()
        return self._inverses[key]

    def raw(self, group: Group, model: nn.Module) -> Optional[torch.Tensor]:
        """Unnormalised scores per group channel, or ``None`` when no consumer has data."""
        total = torch.zeros(group.size)
        seen = False
        for m in group.members:
            if m.kind != "in":
                continue
            module = find_submodule(model, m.name)
            pruner = get_layer_pruner(module)
            inv = self._inverse(stats_key(m.name, m.kind, m.dim))
            if pruner is None or inv is None or inv.shape[0] != m.length:
                continue
            weights = pruner.weights(module, "in")
            if not weights or any(t.shape[d] != m.length for t, d in weights):
                continue  # a grouped conv's columns (in/groups): not scored here
            counts = torch.bincount(m.channels, minlength=group.size)
            if bool((counts <= 1).all()):  # one position per channel: the diagonal formula
                per = sum(slice_norms(t, d, 2) for t, d in weights)  # ||W_p||^2 per slice
                cost = per / inv.diagonal().clamp_min(1e-30)
                total.index_add_(0, m.channels, cost[m.positions])
            else:  # a channel over several positions (an attention head): removed as a block
                total += _block_costs(m, weights, inv, group.size)
            seen = True
        return total if seen else None

    def __call__(self, group: Group, model: nn.Module) -> torch.Tensor:
        if self.stats is None:
            raise RuntimeError("OBSImportance needs calibration statistics: call "
                               "pruner.calibrate(data) before planning")
        scores = self.raw(group, model)
        if scores is None:
            return self.fallback(group, model)
        return normalize(scores, self.normalizer)

    def __repr__(self) -> str:
        return f"OBSImportance(damping={self.damping}, normalizer={self.normalizer!r})"


def _block_costs(member, weights, inv: torch.Tensor, size: int) -> torch.Tensor:
    """Per channel c held at positions B: ``tr(W_B (S^-1_BB)^-1 W_B^T)``, the error left by
    removing B together after the refit (the block form of the Optimal Brain Surgeon)."""
    cols = [t.detach().float().movedim(d, 0).reshape(t.shape[d], -1) for t, d in weights]
    w = torch.cat(cols, 1) if len(cols) > 1 else cols[0]  # [positions, outputs]
    out = torch.zeros(size)
    for c in torch.unique(member.channels).tolist():
        b = member.positions[member.channels == c]
        block = inv[b][:, b].double()
        wb = w[b].double()  # [|B|, outputs]
        sol = torch.linalg.solve(block + 1e-12 * torch.eye(len(b), dtype=block.dtype), wb)
        out[c] = float((wb * sol).sum())
    return out
