"""Closed-form compensation: when a step removes channels, the layers that read them take over
what the removed channels used to contribute, computed from calibration statistics.

For a consumer ``y = sum_c W_c * x_c + b`` (``W_c`` the weights that read input channel c: a
Linear's column, a conv's ``[out, *kernel]`` slab), each removed channel r is replaced by its
best linear estimate from the kept channels K and a constant, taken at the same position
(token, pixel):

    x_r ~ sum_k T[r, k] x_k + t_r,   [T | t] = E[x_r x~_K^T] E[x~_K x~_K^T]^-1,  x~ = [x, 1]

so that ``W_k += sum_r T[r, k] W_r`` and ``b += sum_r t_r W_r`` (a conv's slab summed over its
kernel). For a Linear (or a 1x1 conv) this is the least-squares refit of the kept columns,
``W' = W S[:, K] S[K, K]^-1`` with S the input's second moment. A k x k conv uses its input's
channel second moments (C x C, the same pixel) rather than its unfolded input ((C k^2)^2): the
estimate ignores correlations between neighbouring pixels; where removed channels are linear
in kept ones it is exact, except that with zero padding the constant part is wrong at the
image borders. ``"bias"`` keeps only the constant: ``t_r = E[x_r]``, ``T = 0``.

A consumer whose bias cannot take the constant (an RNN or attention layer built without one)
is refit without it: ``T = E[x_r x_K^T] E[x_K x_K^T]^-1``.

The estimate is ridge-damped, its damping chosen on held-out calibration batches
(:mod:`cleanai.pruner.estimate`). A consumer whose weight another layer shares (tied
embeddings) is left as it is: refitting it would change that layer too.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..core.graph import DependencyGraph
from ..core.layers import get_layer_pruner
from ..core.named_layers import TransposedLinearPruner
from ..core.parametrized import computed_writer
from ..core.runtime import find_submodule
from ..importance.stats import MAX_GRAM_CHANNELS, ActivationStats, stats_key
from .estimate import regress

MODES = ("bias", "lstsq")


@dataclasses.dataclass
class _Target:
    """The weights of one consumer that read its input channels: ``weight`` with the input
    channels on ``dim`` and the outputs on ``out_dim``, in ``groups`` equal blocks (a grouped
    conv: output block j reads input block j), and where the constant goes."""

    weight: torch.Tensor
    dim: int
    out_dim: int
    groups: int
    owner: nn.Module
    bias: Optional[str]  # the owner's attribute that holds the bias
    can_add_bias: bool
    rows: Optional[slice] = None  # only these rows (of dim 0) read the input
    name: str = "weight"  # the owner's attribute that holds ``weight``


def _targets(module: nn.Module, kind: str, self_attention: bool = False
             ) -> Optional[List[_Target]]:
    """What compensating ``module``'s input (``kind="in"``) or its heads' output
    (``"internal"``) changes, or ``None`` when CleanAI does not know how. An
    ``nn.MultiheadAttention``'s input statistics are its query's: its key and value rows are
    compensated too only when calibration saw it called as self-attention (``self_attention``)."""
    if isinstance(module, nn.MultiheadAttention):
        if kind == "internal":
            out = module.out_proj
            return [_Target(out.weight, 1, 0, 1, out, "bias", False)]
        e = module.embed_dim
        if module.in_proj_weight is not None:
            rows = slice(0, 3 * e if self_attention else e)
            return [_Target(module.in_proj_weight, 1, 0, 1, module, "in_proj_bias", False, rows,
                            name="in_proj_weight")]
        return [_Target(module.q_proj_weight, 1, 0, 1, module, "in_proj_bias", False,
                        slice(0, e), name="q_proj_weight")]
    if kind == "internal":
        return None
    if isinstance(module, nn.Linear):
        return [_Target(module.weight, 1, 0, 1, module, "bias", True)]
    if isinstance(get_layer_pruner(module), TransposedLinearPruner):  # weight [in, out]
        return [_Target(module.weight, 0, 1, 1, module,
                        "bias" if getattr(module, "bias", None) is not None else None, False)]
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        if module.groups > 1 and module.groups == module.in_channels:
            return None  # depthwise: its output channel leaves with its input channel
        return [_Target(module.weight, 1, 0, module.groups, module, "bias", True)]
    if isinstance(module, nn.RNNBase):
        names = ["weight_ih_l0"] + (["weight_ih_l0_reverse"] if module.bidirectional else [])
        return [_Target(getattr(module, n), 1, 0, 1, module,
                        n.replace("weight", "bias") if module.bias else None, False, name=n)
                for n in names]
    if isinstance(module, nn.RNNCellBase):
        return [_Target(module.weight_ih, 1, 0, 1, module,
                        "bias_ih" if module.bias else None, False, name="weight_ih")]
    return None


def compensable_keys(model: nn.Module, graph: DependencyGraph) -> List[str]:
    """The statistics keys (:func:`stats_key`) whose second moments compensation may need:
    the inputs of every consumer it knows how to adjust, in groups that can lose channels."""
    keys = []
    for g in graph.groups:
        if g.prunable == 0 or g.size <= 1:
            continue
        for m in g.members:
            if m.kind not in ("in", "internal") or (m.kind == "internal" and m.dim > 1):
                continue
            if m.length <= MAX_GRAM_CHANNELS and \
                    _targets(find_submodule(model, m.name), m.kind) is not None:
                keys.append(stats_key(m.name, m.kind, m.dim))
    return list(dict.fromkeys(keys))


@dataclasses.dataclass
class CompensationReport:
    """What one step's compensation did: the consumers adjusted and, for the others, why not."""

    mode: str
    compensated: List[str] = dataclasses.field(default_factory=list)
    skipped: Dict[str, str] = dataclasses.field(default_factory=dict)
    added_bias: List[str] = dataclasses.field(default_factory=list)
    #: layers whose singular second moment needed more damping: the factor over the default
    damped: Dict[str, float] = dataclasses.field(default_factory=dict)
    #: per consumer, the estimate cross-validation chose: a damping (``"1e-06"``...), ``"mean
    #: only"`` or ``"none"`` (its removed inputs best left out); absent without held-out data
    chosen: Dict[str, str] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"compensation ({self.mode}): {len(self.compensated)} consumer(s) adjusted"]
        if self.added_bias:
            lines.append(f"  bias added to: {', '.join(self.added_bias)}")
        if self.damped:
            lines.append(f"  damped more (singular statistics): {', '.join(self.damped)}")
        if self.chosen:
            counts: Dict[str, int] = {}
            for c in self.chosen.values():
                counts[c] = counts.get(c, 0) + 1
            lines.append("  chosen on held-out batches: " + ", ".join(
                f"{c} ({n})" for c, n in sorted(counts.items())))
        for name, why in self.skipped.items():
            lines.append(f"  not compensated: {name}: {why}")
        return "\n".join(lines)


class Compensation:
    """The new values for one step, computed before anything changes.

    :meth:`write` puts them into the full-size tensors (shapes unchanged, so the step's own
    checks and rollback work as usual); :meth:`undo` puts the old values back; after the
    slicing, :meth:`finish` adds the biases that consumers without one need."""

    def __init__(self, report: CompensationReport) -> None:
        self.report = report
        self.updates: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (tensor, new full value)
        self.new_bias: Dict[str, Tuple[nn.Module, torch.Tensor]] = {}  # layer -> (module, bias)
        # id() of a computed weight (weight norm) in ``updates`` -> what writes its g and v
        self.writers: Dict[int, Any] = {}
        self._saved: List[Any] = []  # (tensor, old value), or a function that undoes a write

    def write(self) -> None:
        with torch.no_grad():
            for t, value in self.updates:
                held = self.writers.get(id(t))
                if held is not None:
                    self._saved.append(held[1](value))
                    continue
                self._saved.append((t, t.detach().clone()))
                t.copy_(value.to(t.dtype))

    def undo(self) -> None:
        with torch.no_grad():
            for saved in reversed(self._saved):
                if callable(saved):
                    saved()
                else:
                    saved[0].copy_(saved[1])
        self._saved.clear()

    def finish(self, keeps: Dict[Tuple[str, str, int], torch.Tensor]) -> List[dict]:
        """Add the planned biases (sliced to the outputs the step kept); returns their
        history entries (``{"name", "kind": "bias"}``: a replay adds a zero bias there)."""
        entries = []
        for name, (module, bias) in self.new_bias.items():
            out_keep = keeps.get((name, "out", -1))
            if out_keep is not None:
                bias = bias.index_select(0, out_keep.to(bias.device))
            w = module.weight
            module.bias = nn.Parameter(bias.to(w.dtype).to(w.device), w.requires_grad)
            entries.append({"name": name, "kind": "bias", "dim": -1, "keep": []})
            self.report.added_bias.append(name)
        return entries


def plan_compensation(model: nn.Module, graph: DependencyGraph,
                      keeps: Dict[Tuple[str, str, int], torch.Tensor],
                      stats: Optional[ActivationStats], mode: str) -> Compensation:
    """The compensation of every consumer that loses input channels in ``keeps`` (a step's
    :func:`~cleanai.pruner.keeps.layer_keeps`), from calibration ``stats``."""
    comp = Compensation(CompensationReport(mode))
    done = set()
    owners: Dict[int, int] = {}  # id(tensor) -> how many modules hold it
    for m in model.modules():
        for t in m._parameters.values():
            if t is not None:
                owners[id(t)] = owners.get(id(t), 0) + 1
    for (name, kind, dim), keep in keeps.items():
        if kind not in ("in", "internal") or (kind == "internal" and dim > 1):
            continue
        module = find_submodule(model, name)
        key = stats_key(name, kind, dim)
        if (name, kind) in done:  # heads and head_dims: the same positions, one refit
            continue
        done.add((name, kind))
        targets = _targets(module, kind, stats is not None and name in stats.self_attention)
        if targets is not None:
            writers = [computed_writer(t.owner, t.name) for t in targets]
            if any(w is None for w in writers):
                comp.report.skipped[name] = (
                    "its weight is computed (torch.nn.utils.parametrize) by something other "
                    "than weight norm: a refit would be lost")
                continue
            # the tensor is held with its writer: its id() stays its own
            comp.writers.update((id(t.weight), (t.weight, w)) for t, w in zip(targets, writers)
                                if w)
        if targets is None:
            if kind == "in" and getattr(get_layer_pruner(module), "coupling",
                                        lambda m: "")(module) == "same":
                continue
            comp.report.skipped[name] = f"{type(module).__name__} is not a layer compensation knows"
            continue
        if any(owners.get(id(t.weight), 0) > 1 for t in targets):
            comp.report.skipped[name] = ("its weight is shared with another layer (tied); "
                                         "refitting it would change that layer too")
            continue
        length = targets[0].weight.shape[targets[0].dim] * targets[0].groups
        removed = _complement(keep, length)
        if removed.numel() == 0:
            continue
        found = stats.moments(key) if stats is not None else None
        mean_only = mode == "bias"
        if found is None and stats is not None and key in stats.sums:
            if mode == "lstsq":  # too wide for second moments: its mean only
                mean_only = True
                comp.report.skipped[name] = (
                    f"its input is too wide for second moments ({length} channels > "
                    f"{MAX_GRAM_CHANNELS}); only the removed channels' mean was compensated")
            n = max(stats.positions(key), 1.0)
            found = (stats.sums[key][0].cpu().double() / n, None, n)
        if found is None or found[0].shape[0] != length:
            if get_layer_pruner(module) is None:  # its class has a forward of its own
                comp.report.skipped[name] = (
                    f"{type(module).__name__} overrides forward, so calibration does not "
                    f"record its input as a layer's (register its class with "
                    f"cleanai.register_layer_pruner when it computes what its base class does)")
            else:
                comp.report.skipped[name] = "no calibration statistics for its input (not " \
                                            "reached by the calibration data)"
            continue
        halves = stats.held_out(key) if found[1] is not None and not mean_only else None
        for target in targets:
            _compensate(comp, name, target, keep, removed, found, halves,
                        "bias" if mean_only else mode)
        if name not in comp.report.skipped:
            comp.report.compensated.append(name)
        if isinstance(module, nn.MultiheadAttention) and kind == "in" and \
                name not in stats.self_attention:
            comp.report.skipped[name] = ("only its query projection refit: calibration did "
                                         "not see it called as self-attention")
    if comp.report.skipped:
        warnings.warn("compensation left some consumers as they were: " + "; ".join(
            f"{n} ({why})" for n, why in comp.report.skipped.items()), stacklevel=3)
    if comp.report.damped:
        warnings.warn(f"compensation: the input second moments of {len(comp.report.damped)} "
                      f"layer(s) were singular (fewer calibration samples than channels, or "
                      f"channels that never vary) and were damped more than the default: "
                      + ", ".join(f"{n} (x{f:g})" for n, f in comp.report.damped.items())
                      + "; more calibration data gives a better fit", stacklevel=3)
    return comp


def _complement(keep: torch.Tensor, length: int) -> torch.Tensor:
    gone = torch.ones(length, dtype=torch.bool)
    gone[keep.cpu()] = False
    return torch.nonzero(gone).flatten()


def _compensate(comp: Compensation, name: str, target: _Target, keep: torch.Tensor,
                removed: torch.Tensor, found: Tuple[torch.Tensor, Optional[torch.Tensor], float],
                halves: Optional[tuple], mode: str) -> None:
    """Fold the removed channels' estimate into ``target``'s kept weights and bias;
    ``found`` is the input's ``(mean, second moment, count)``, ``halves`` those of two
    disjoint halves of the batches (:meth:`ActivationStats.held_out`) or ``None``."""
    mean = found[0]
    full = target.weight.detach()
    w = full[target.rows] if target.rows is not None else full
    g = target.groups
    per_in = w.shape[target.dim]  # input channels per group
    wm = w.movedim(target.dim, 0).double().cpu()  # [per_in, ...]; outputs on out_dim + 1
    out_axis = target.out_dim + 1 if target.out_dim < target.dim else target.out_dim
    new = wm.clone()
    per_out = wm.shape[out_axis] // g
    bias_delta = torch.zeros(wm.shape[out_axis], dtype=torch.float64)
    keep = keep.cpu()
    bias = getattr(target.owner, target.bias) if target.bias else None
    constant = isinstance(bias, torch.Tensor) or target.can_add_bias
    if not constant and mode == "bias":
        comp.report.skipped[name] = "it has no bias to take the removed channels' mean"
        return
    for j in range(g):
        lo, hi = j * per_in, (j + 1) * per_in
        k_j = keep[(keep >= lo) & (keep < hi)]
        r_j = removed[(removed >= lo) & (removed < hi)]
        if r_j.numel() == 0:
            continue
        rows = slice(j * per_out, (j + 1) * per_out)
        block = wm.narrow(out_axis, j * per_out, per_out)  # [per_in, per_out(, ...), *kernel]
        w_r = block.index_select(0, r_j - lo)
        if mode == "lstsq" and k_j.numel():
            coef, const = regress(found, halves, r_j, k_j, w_r, name, comp.report, constant)
        else:
            coef, const = None, mean[r_j]
        if coef is not None:
            delta = torch.einsum("r...,rk->k...", w_r, coef)
            idx = k_j - lo
            new.narrow(out_axis, j * per_out, per_out).index_add_(0, idx, delta)
        spatial = [d for d in range(1, w_r.dim()) if d != out_axis]
        slab = w_r.sum(spatial) if spatial else w_r  # [removed, per_out]
        bias_delta[rows] += const @ slab
    value = new.movedim(0, target.dim)
    if target.rows is not None:
        whole = full.double().cpu()  # a copy: the rows outside stay as they are
        whole[target.rows] = value
        value = whole
    comp.updates.append((target.weight, value.to(w.device)))
    if not constant or not bool(bias_delta.any()):
        return
    if target.rows is not None and isinstance(bias, torch.Tensor):
        spread = torch.zeros(bias.shape[0], dtype=torch.float64)
        spread[target.rows] = bias_delta
        bias_delta = spread
    if isinstance(bias, torch.Tensor):
        comp.updates.append((bias, (bias.detach().double().cpu() + bias_delta).to(bias.device)))
    else:
        comp.new_bias[name] = (target.owner, bias_delta)
