"""Group-sparsity regularisation: a penalty that drives whole coupled channels towards zero
while the model trains, so that the channels a later pruning step removes carry little.

Each channel of a group is one unit: every weight that holds it, in every member (producer
rows and biases, norm scales and shifts, consumer columns, attention internals), enters one
norm. ``GroupSparsity`` is used as a loss term, ``loss = loss + reg()``: autograd then adds
its gradient to whatever the optimizer does (SGD, Adam, a fused or foreach implementation),
and ``torch.amp``'s ``GradScaler`` scales it with the rest of the loss.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from ..core.graph import DependencyGraph, Group
from ..importance.base import member_weights
from ..pruner.plan import PruningPlan
from ..recover.common import model_device
from ..pruner.structured import GROUP_KINDS, StructuredPruner
from ..pruner.state import check_groups, group_keys

Layout = List[Tuple[Group, Optional[torch.Tensor]]]  # a group, its unprotected channels
Squares = Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]]
EPS = 1e-12  # inside the square root: a finite gradient at an all-zero channel


class GroupSparsity:
    """``lam * sum over groups and channels c of ||W_c||``, ``W_c`` every weight of channel c
    across the group's members (group lasso over coupled channels).

    Args:
        pruner: a :class:`~cleanai.StructuredPruner` (its ``ignored_layers`` and ``kinds``
            choose the groups, as they would for pruning) or a
            :class:`~cleanai.DependencyGraph` (every prunable group).
        lam: the penalty's weight, ``>= 0``.
        kinds: only groups of these kinds (``"heads"``, ``"head_dims"``, ``"channels"``,
            ``"hidden"``); ``None`` keeps the pruner's choice (all, for a graph).
        norm: ``"l2"`` (one norm per channel, the group lasso) or ``"l1"`` (the sum of the
            channel's absolute weights).
        schedule: ``schedule(t) -> factor`` multiplying ``lam`` at the ``t``-th call
            (``t`` from 0), for a warm-up or a ramp; ``None`` keeps ``lam``.

    Protected channels (model outputs, ops CleanAI cannot follow) are never penalised: they
    cannot be pruned. The groups follow pruning steps taken between calls.
    Call once per training step: ``loss = criterion(model(x), y) + reg()``.
    """

    def __init__(self, pruner: Union[StructuredPruner, DependencyGraph], lam: float, *,
                 kinds: Optional[Iterable[str]] = None, norm: str = "l2",
                 schedule: Optional[Callable[[int], float]] = None) -> None:
        if isinstance(pruner, StructuredPruner):
            self.graph, self._pruner = pruner.graph, pruner
        elif isinstance(pruner, DependencyGraph):
            self.graph, self._pruner = pruner, None
        else:
            raise TypeError(f"GroupSparsity takes a StructuredPruner or a DependencyGraph, "
                            f"got {type(pruner).__name__}")
        if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not math.isfinite(lam) \
                or lam < 0:
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        if norm not in ("l1", "l2"):
            raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
        if schedule is not None and not callable(schedule):
            raise TypeError("schedule must be callable: schedule(t) -> factor")
        self.kinds = None if kinds is None else set([kinds] if isinstance(kinds, str) else kinds)
        if self.kinds is not None and not self.kinds <= set(GROUP_KINDS):
            raise ValueError(f"kinds must be among {GROUP_KINDS}, got {sorted(self.kinds)}")
        self.lam = float(lam)
        self.norm = norm
        self.schedule = schedule
        #: how many times the penalty was computed (the ``t`` passed to ``schedule``)
        self.calls = 0
        self._layout: Optional[Layout] = None
        self._signature = self.graph.signature
        self._target: Optional[Dict[int, torch.Tensor]] = None
        self._indices: Dict[tuple, torch.Tensor] = {}  # index tensors on the weights' device

    def target(self, plan: Optional[PruningPlan]) -> None:
        """Penalise only the channels ``plan`` removes (``pruner.plan()``, made now), so that
        the coming step cuts channels that already carry little while the others train
        freely; ``None`` penalises every prunable channel again. Re-plan from time to time
        (the channels chosen move as the weights do); a pruning step clears the target."""
        if plan is not None and plan.graph is not self.graph:
            raise ValueError("this plan was made for another graph than the regulariser's")
        self._target = None if plan is None else {
            gid: idx.clone() for gid, idx in plan.removals.items() if idx.numel()}
        self._layout, self._signature = None, self.graph.signature
        self._indices = {}

    def state_dict(self) -> Dict[str, Any]:
        """The regulariser's state as plain data: ``lam``, ``norm``, ``kinds``, the calls
        counted so far (the position in ``schedule``) and the channels :meth:`target` aims
        at (``None``: every prunable channel), with the groups' layout to check on load.
        ``schedule`` is code, not state: pass the same one to the resumed regulariser."""
        self._current_layout()  # a target set before a pruning step is gone
        return {
            "type": type(self).__name__,
            "lam": self.lam, "norm": self.norm,
            "kinds": None if self.kinds is None else sorted(self.kinds),
            "calls": self.calls,
            "target": None if self._target is None else
            {str(gid): idx.tolist() for gid, idx in self._target.items()},
            "groups": [{"members": k, "size": g.size}
                       for k, g in zip(group_keys(self.graph), self.graph.groups)],
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`, on a regulariser built as the saved one was over
        the resumed run's pruner (the model reloaded at its saved widths): ``lam``, the call
        count and the target are restored. Raises ``ValueError`` for a state of another
        kind of penalty, another ``norm`` or ``kinds``, or another model or widths; nothing
        changes then."""
        if not isinstance(state_dict, dict) or not {"lam", "norm", "calls", "target",
                                                    "groups"} <= set(state_dict):
            raise ValueError(f"load_state_dict needs a dict from "
                             f"{type(self).__name__}.state_dict()")
        mine = {"type": type(self).__name__, "norm": self.norm,
                "kinds": None if self.kinds is None else sorted(self.kinds)}
        for key, value in mine.items():
            if state_dict.get(key) != value:
                raise ValueError(f"this state was saved from a regulariser with {key}="
                                 f"{state_dict.get(key)!r}; this one has {key}={value!r}")
        check_groups(self.graph, state_dict["groups"], type(self).__name__)
        target = state_dict["target"]
        if target is not None:
            target = {int(gid): torch.tensor(idx, dtype=torch.long)
                      for gid, idx in target.items()}
            sizes = {g.id: g.size for g in self.graph.groups}
            bad = next((gid for gid, idx in target.items() if gid not in sizes or
                        not idx.numel() or int(idx.min()) < 0 or int(idx.max()) >= sizes[gid]),
                       None)
            if bad is not None:
                raise ValueError(f"this state's target names channels group {bad} does not "
                                 f"have; it does not belong to this model")
        lam = state_dict["lam"]
        if not isinstance(lam, (int, float)) or isinstance(lam, bool) or \
                not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        self.lam = float(lam)
        self.calls = int(state_dict["calls"])
        self._target = target
        self._layout, self._signature = None, self.graph.signature
        self._indices = {}

    @property
    def model(self) -> nn.Module:
        model = self.graph._model()
        if model is None:
            raise RuntimeError("the model this regulariser was built for no longer exists")
        return model

    def groups(self) -> List[Group]:
        """The groups penalised now."""
        return [g for g, _ in self._current_layout()]

    def __call__(self, model: Optional[nn.Module] = None) -> torch.Tensor:
        """The penalty now (a scalar tensor with autograd), ``lam * schedule(calls)``-weighted."""
        if model is not None and model is not self.model:
            raise ValueError("this regulariser was built for another model")
        factor = 1.0 if self.schedule is None else float(self.schedule(self.calls))
        self.calls += 1
        if not math.isfinite(factor) or factor < 0:
            raise ValueError(f"schedule returned {factor!r} at call {self.calls - 1}; it must "
                             f"return a finite factor >= 0")
        lam = self.lam * factor
        if lam == 0:
            return torch.zeros((), device=model_device(self.model))
        return lam * self.penalty()

    def penalty(self) -> torch.Tensor:
        """The unweighted sum of channel norms (a scalar tensor with autograd)."""
        model = self.model
        total = None
        squares: Squares = {}  # each tensor reduced once per dim
        for group, keep in self._current_layout():
            per_channel = self._channel_sums(group, model, squares)
            if keep is not None:
                per_channel = per_channel.index_select(
                    0, self._on(("keep", group.id), keep, per_channel.device))
            term = (per_channel + EPS).sqrt().sum() if self.norm == "l2" else per_channel.sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros((), device=model_device(model))
        return total

    def _members(self, group: Group, model: nn.Module):
        """``(member, tensor, dim)`` for every weight of the group's channels."""
        return member_weights(group, model)

    def _channel_sums(self, group: Group, model: nn.Module,
                      squares: Squares) -> torch.Tensor:
        """Per group channel: the sum of its weights' squares (``l2``) or absolute values."""
        total = None
        for member, tensor, dim in self._members(group, model):
            key = (id(tensor), dim)
            hit = squares.get(key)
            if hit is None:  # (the tensor is held too: a view's id is not reused meanwhile)
                hit = squares[key] = (tensor, _reduce(tensor, dim, self.norm))
            per_slice = hit[1]
            n = per_slice.shape[0]
            if member.identity and n == group.size:
                total = per_slice if total is None else total + per_slice
                continue
            if total is None:
                total = per_slice.new_zeros(group.size)
            device = per_slice.device
            channels = self._on(("channels", id(member)), member.channels, device)
            positions = self._on(("positions", id(member), n), member.positions if
                                 n == member.length else member.positions % n, device)
            total = total.index_add(0, channels, per_slice.index_select(0, positions))
        if total is None:
            return torch.zeros(group.size, device=model_device(model))
        return total

    def _on(self, key: tuple, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``index`` on ``device``, moved once per layout (not on every training step)."""
        key = key + (device,)
        hit = self._indices.get(key)
        if hit is None:
            hit = self._indices[key] = index.to(device)
        return hit

    def _current_layout(self) -> Layout:
        """The penalised groups with their channels (``None``: all); rebuilt after a step."""
        if self._layout is not None and self._signature is self.graph.signature:
            return self._layout
        if self._signature is not self.graph.signature:  # (a step sets a new signature)
            self._target = None  # pruned since it was set: the targeted channels are gone
        if self._target is not None:
            layout = [(g, self._target[g.id]) for g in self.graph.groups if g.id in self._target]
        else:
            layout = []
            for g in self.graph.groups:
                if g.size <= 1 or g.prunable == 0 or not self._selected(g):
                    continue
                keep = None if g.prunable == g.size else torch.nonzero(~g.protected).flatten()
                layout.append((g, keep))
        self._layout, self._signature = layout, self.graph.signature
        self._indices = {}  # the members' index tensors changed with the step
        return layout

    def _selected(self, group: Group) -> bool:
        if self.kinds is not None and group.kind not in self.kinds:
            return False
        return self._pruner is None or self._pruner.group_ratio(group) is not None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(lam={self.lam:g}, norm={self.norm!r}, "
                f"groups={len(self._current_layout())})")


class BatchNormScaleSparsity(GroupSparsity):
    """Network Slimming: ``lam * sum |gamma|`` over the scales of the BatchNorm layers in the
    prunable groups (an L1 penalty on each channel's BatchNorm scale only)."""

    def __init__(self, pruner: Union[StructuredPruner, DependencyGraph], lam: float, *,
                 schedule: Optional[Callable[[int], float]] = None) -> None:
        super().__init__(pruner, lam, norm="l1", schedule=schedule)

    def _members(self, group: Group, model: nn.Module):
        out = []
        for m in group.members:
            if m.kind != "same":
                continue
            module = model.get_submodule(m.name)
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
                out.append((m, module.weight, 0))
        return out

    def _selected(self, group: Group) -> bool:
        return super()._selected(group) and any(
            m.kind == "same" and isinstance(self.model.get_submodule(m.name),
                                            nn.modules.batchnorm._BatchNorm)
            for m in group.members)


def _reduce(tensor: torch.Tensor, dim: int, norm: str) -> torch.Tensor:
    """Per slice along ``dim``: the sum of squares (``l2``) or of absolute values (``l1``),
    in float32 at least (a bf16 or fp16 weight is summed in float32)."""
    t = tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()
    t = t * t if norm == "l2" else t.abs()
    if t.dim() == 1:
        return t
    if dim == 0:
        return t.reshape(t.shape[0], -1).sum(1)
    dims = [d for d in range(t.dim()) if d != dim]
    return t.sum(dims)
