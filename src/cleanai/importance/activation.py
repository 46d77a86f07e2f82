"""Data-dependent importances: activations alone, and the weight-activation hybrid."""
from __future__ import annotations

import logging
from typing import Iterable, List, Optional

import torch
from torch import nn

from ..core.graph import DependencyGraph, Group
from .base import Importance, normalize
from .stats import NEEDS, STATISTICS, ActivationStats, collect, stats_key
from .weight import WeightImportance

logger = logging.getLogger(__name__)


class ActivationImportance(Importance):
    """``||A_c||``: how strongly consumers see channel c on calibration data.

    Args:
        statistic: ``"l2"`` (root mean square), ``"mean_abs"`` or ``"variance"``.
        normalizer: see :func:`~cleanai.importance.normalize`.

    Needs :meth:`StructuredPruner.calibrate` before planning.
    """

    requires_data = True

    def __init__(self, statistic: str = "l2", normalizer: Optional[str] = "mean") -> None:
        if statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {statistic!r}; choose one of {STATISTICS}")
        normalize(torch.ones(2), normalizer)
        self.statistic = statistic
        self.normalizer = normalizer
        self.stats: Optional[ActivationStats] = None

    @property
    def ready(self) -> bool:
        return self.stats is not None

    def calibrate(self, model: nn.Module, graph: DependencyGraph, data: Iterable,
                  max_batches: Optional[int] = None, forward_fn=None, progress: bool = False) -> None:
        self.stats = collect(model, graph, data, max_batches, forward_fn, progress,
                             moments=NEEDS[self.statistic])

    def adopt(self, stats: ActivationStats) -> bool:
        if not set(NEEDS[self.statistic]) <= set(stats.kept):
            return False  # calibrate() collects what this statistic reads
        self.stats = stats
        return True

    def synchronize(self, model: nn.Module, process_group) -> None:
        if self.stats is not None:
            from ..distributed import all_reduce_stats
            all_reduce_stats(self.stats, process_group)

    def follow(self, layers: List[dict]) -> None:
        if self.stats is not None:
            for e in layers:
                if e["kind"] in ("in", "internal"):
                    self.stats.keep(stats_key(e["name"], e["kind"], e["dim"]),
                                    torch.tensor(e["keep"], dtype=torch.long))

    def raw(self, group: Group, model: nn.Module) -> torch.Tensor:
        """Unnormalised activation statistic per group channel."""
        if self.stats is None:
            raise RuntimeError(f"{type(self).__name__} needs activation statistics: call "
                               f"pruner.calibrate(data) before planning")
        scores = self.stats.group_scores(group, self.statistic)
        if scores is None:
            logger.debug("no consumer of group %d ran during calibration", group.id)
            return torch.ones(group.size)
        return scores

    def __call__(self, group: Group, model: nn.Module) -> torch.Tensor:
        return normalize(self.raw(group, model), self.normalizer)

    def __repr__(self) -> str:
        return f"ActivationImportance(statistic={self.statistic!r}, normalizer={self.normalizer!r})"


class WeightActivationImportance(Importance):
    """The hybrid score ``alpha * norm(||W_c||_p) + beta * norm(||A_c||)``.

    Both terms are normalised within the group before they are mixed, so ``weight_ratio``
    (alpha) and ``activation_ratio`` (beta) weigh comparable numbers.
    ``mode="product"`` scores ``norm(||W_c|| * ||A_c||)`` instead, the structured form of
    Wanda's ``|W| * ||X||``.

    Args:
        weight_ratio: alpha, >= 0.
        activation_ratio: beta, >= 0 (0 makes this a pure weight score that needs no data).
        normalizer: ``"mean"``, ``"max"``, ``"sum"``, ``"rank"`` or ``"zscore"``.
        mode: ``"sum"`` or ``"product"``.
        p: the weight norm's order.
        statistic: the activation statistic (``"l2"``, ``"mean_abs"``, ``"variance"``).
    """

    def __init__(self, weight_ratio: float = 0.5, activation_ratio: float = 0.5,
                 normalizer: Optional[str] = "mean", mode: str = "sum", p: float = 2,
                 statistic: str = "l2") -> None:
        if weight_ratio < 0 or activation_ratio < 0 or weight_ratio + activation_ratio == 0:
            raise ValueError(f"weight_ratio and activation_ratio must be >= 0 and not both 0, "
                             f"got {weight_ratio}, {activation_ratio}")
        if mode not in ("sum", "product"):
            raise ValueError(f"mode must be 'sum' or 'product', got {mode!r}")
        self.weight_ratio = float(weight_ratio)
        self.activation_ratio = float(activation_ratio)
        self.mode = mode
        self.normalizer = normalizer
        self.weight = WeightImportance(p=p, normalizer=normalizer)
        self.activation = ActivationImportance(statistic=statistic, normalizer=normalizer)

    @property
    def requires_data(self) -> bool:  # type: ignore[override]
        return self.activation_ratio > 0 or self.mode == "product"

    @property
    def ready(self) -> bool:
        return not self.requires_data or self.activation.ready

    def calibrate(self, *args, **kwargs) -> None:
        if self.requires_data:  # a pure weight score (activation_ratio=0) needs no forwards
            self.activation.calibrate(*args, **kwargs)

    def adopt(self, stats: ActivationStats) -> bool:
        return self.activation.adopt(stats) if self.requires_data else True

    def synchronize(self, model: nn.Module, process_group) -> None:
        self.activation.synchronize(model, process_group)

    def follow(self, layers: List[dict]) -> None:
        self.activation.follow(layers)

    def __call__(self, group: Group, model: nn.Module) -> torch.Tensor:
        w = self.weight.raw(group, model)
        if self.mode == "product":
            return normalize(w * self.activation.raw(group, model), self.normalizer)
        score = self.weight_ratio * normalize(w, self.normalizer)
        if self.activation_ratio > 0:
            a = self.activation.raw(group, model)
            score = score + self.activation_ratio * normalize(a, self.normalizer)
        return score

    def __repr__(self) -> str:
        return (f"WeightActivationImportance(weight_ratio={self.weight_ratio}, "
                f"activation_ratio={self.activation_ratio}, normalizer={self.normalizer!r}, "
                f"mode={self.mode!r})")
