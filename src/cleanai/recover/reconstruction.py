"""Sequential local reconstruction: refit a pruned model, unit by unit in forward order, so that
each layer (closed-form ridge least squares) or block (Adam) reproduces on its own inputs what
the dense teacher computed at the same place. Values only: shapes and the pruning history stay."""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

from ..core.runtime import ForwardFn, map_tensors
from ..importance.stats import drop_padding, padding_mask
from ..utils.fidelity import output_tensor
from .least_squares import (choose_damping, closed_form_dim, regression_rows, ridge_solve,
                            solve_layout)
from .capture import Run, capture, probe, real_tokens, run_batch, unit_outputs
from .units import Unit, plan_units
from .common import (RecoveryError, all_or_nothing, check_pair, materialize,
                     model_device, relative_error, to_device)

logger = logging.getLogger(__name__)

#: closed form above this many unknowns per output (C_in/groups * prod(kernel)) uses Adam
MAX_CLOSED_FORM_DIM = 4096
#: with this many batches or more, every such batch is held out of a unit's Adam run
HELD_OUT_EVERY = 4
_SKIP_BELOW = 1e-10  # relative error under which an unpruned unit is left alone
_ROWS_PER_CHUNK = 16384  # rows of the unfolded input converted to float64 at once


@dataclasses.dataclass
class ReconstructionReport:
    """What :func:`reconstruct` did, one row per unit in forward order.

    Each unit is ``{"name", "kind": "layer"|"block", "method": "closed form"|"adam"|"skipped",
    "error_before", "error_after"}``: the relative squared error ``||out - target||^2 /
    ||target||^2`` of the unit on the calibration data, fed its own (already reconstructed)
    inputs, before and after it was refit. ``notes`` says where the plan had to deviate.

    ``output_error_before`` / ``output_error_after``: the same error for the whole model's
    output (its logits or last hidden state, padded tokens left out) on the held-out batches
    (every :data:`HELD_OUT_EVERY`-th; all batches when there are fewer), before and after
    reconstruction; ``None`` where the outputs cannot be compared. ``reverted``: the output
    moved further from the teacher's, so every unit got its weights back."""

    units: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    batches: int = 0
    notes: List[str] = dataclasses.field(default_factory=list)
    output_error_before: Optional[float] = None
    output_error_after: Optional[float] = None
    reverted: bool = False

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-able copy (non-finite errors become ``None``)."""
        def num(x: Optional[float]) -> Optional[float]:
            return float(x) if x is not None and math.isfinite(x) else None
        units = [{**u, "error_before": num(u["error_before"]), "error_after": num(u["error_after"])}
                 for u in self.units]
        return {"units": units, "seconds": self.seconds, "batches": self.batches,
                "notes": list(self.notes), "output_error_before": num(self.output_error_before),
                "output_error_after": num(self.output_error_after), "reverted": self.reverted}

    def __str__(self) -> str:
        """An aligned table: one line per unit, then totals and notes."""
        head = ("unit", "kind", "method", "error before", "error after")
        rows = [(u["name"], u["kind"], u["method"], f"{u['error_before']:.3e}",
                 f"{u['error_after']:.3e}") for u in self.units]
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in
                           enumerate(zip(r, widths))).rstrip() for r in [head] + rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(f"reconstruction: {len(self.units)} units, {self.batches} batches, "
                     f"{self.seconds:.2f} s")
        if self.output_error_before is not None and self.output_error_after is not None:
            lines.append(f"model output error: {self.output_error_before:.3e} -> "
                         f"{self.output_error_after:.3e}"
                         + (" (worse: every unit put back)" if self.reverted else ""))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def reconstruct(model: nn.Module, teacher: nn.Module, data: Iterable, *,
                granularity: str = "layer", steps: int = 200, lr: float = 1e-3,
                max_batches: Optional[int] = None, forward_fn: Optional[ForwardFn] = None,
                damping: Union[float, str] = "auto", offload: bool = False,
                progress: bool = True) -> ReconstructionReport:
    """Refit the pruned ``model``'s weights so that, unit by unit in forward order, each unit
    fed its own inputs reproduces the dense ``teacher``'s output at the same module (the
    teacher's channels the model pruned are dropped from the target).

    ``granularity="layer"``: every Linear and Conv1d/2d/3d (grouped, depthwise) is solved in
    closed form, ridge least squares of ``[W, b]`` on its (unfolded) input, streamed as float64
    ``X^T X`` / ``X^T Y`` (memory O(d^2) with d = C_in/groups * prod(kernel), + 1 for a bias);
    ``damping * mean(diag)`` is added to the diagonal, x10 while Cholesky fails. With
    ``damping="auto"`` and at least two batches, each layer's damping is chosen by two-fold
    cross-validation over the even- and odd-numbered batches
    (:data:`~cleanai.recover.least_squares.DAMPINGS`), and a layer
    whose refit does worse on the held-out half than its weights as they are is left alone
    (few rows next to many unknowns would fit noise); one batch: 1e-3. Layers with
    d > :data:`MAX_CLOSED_FORM_DIM` are trained with Adam instead.
    ``granularity="block"``: the non-leaf children of ``nn.Sequential`` / ``nn.ModuleList``
    holding a Linear or conv (residual blocks, transformer layers) are trained with Adam
    (``steps`` steps, ``lr``, in eval mode) on the normalised mean squared error of their
    floating-point output tensors, except inputs handed back (a block with an output tensor
    that does not line up with the teacher's is reconstructed layer by layer instead);
    Linear/conv layers outside blocks are solved in closed form. With
    :data:`HELD_OUT_EVERY` batches or more, every ``HELD_OUT_EVERY``-th batch is held out of
    every Adam run (a block, or a layer trained with Adam) and picks its step count.

    A unit never gets worse: if refitting did not lower its error (with held-out batches: on
    them), its weights are put back. Nor does the model: when its output (logits or last
    hidden state) ends further from the teacher's on the held-out batches than it started
    (units fit well on their own can add up badly, e.g. blocks fit on every token for a head
    that reads one), every unit is put back and the report says so (``reverted``).
    Any error leaves ``model`` exactly as it was; every hook is removed; train/eval modes and
    ``requires_grad`` flags come back as they were. ``data`` yields model inputs (or
    ``(inputs, target)`` pairs), read once; ``offload=True`` keeps a block's captured inputs
    and targets on the CPU.

    Raises:
        RecoveryError: bad options, no data, a batch that does not run, a teacher that is not
            the model's dense original, a model never pruned, NaN/inf in inputs or targets.
    """
    start = time.perf_counter()
    if granularity not in ("layer", "block"):
        raise RecoveryError(f"reconstruct: granularity must be 'layer' or 'block', "
                            f"got {granularity!r}")
    if not isinstance(steps, int) or steps < 1:
        raise RecoveryError(f"reconstruct: steps must be a positive int, got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise RecoveryError(f"reconstruct: lr must be a positive number, got {lr!r}")
    if damping != "auto" if isinstance(damping, str) else not (
            isinstance(damping, (int, float)) and damping >= 0 and math.isfinite(damping)):
        raise RecoveryError(f"reconstruct: damping must be 'auto' or a number >= 0, "
                            f"got {damping!r}")
    check_pair(model, teacher, "reconstruct")
    batches = materialize(data, max_batches, "reconstruct")
    report = ReconstructionReport(batches=len(batches))
    run = Run(model, teacher, batches, forward_fn, steps, float(lr),
               damping if damping == "auto" else float(damping), offload,
               report.notes)
    modes = [(m, m.training) for m in list(model.modules()) + list(teacher.modules())]
    try:
        with all_or_nothing(model) as restore, torch.no_grad():
            model.eval()
            teacher.eval()
            order, s_shapes = probe(model, batches[0], forward_fn, "model")
            _, t_shapes = probe(teacher, batches[0], forward_fn, "teacher")
            units = plan_units(model, teacher, granularity, order, s_shapes, t_shapes,
                               report.notes)
            check = _held_out(len(batches)) or list(range(len(batches)))
            before = _output_error(run, check)
            for unit in _progress(units, progress):
                report.units.append(_reconstruct_unit(run, unit))
            if before is None:
                report.notes.append("the model's output does not line up with the teacher's: "
                                    "the whole model was not checked")
            else:
                after = _output_error(run, check)
                report.output_error_before, report.output_error_after = before, after
                if not after <= before:  # also NaN
                    restore()
                    report.reverted = True
                    report.notes.append(
                        f"the model's output moved further from the teacher's on "
                        f"{len(check)} held-out batch(es) ({before:.3e} -> {after:.3e}), though "
                        f"units fit their own targets: every unit was put back")
    finally:
        for m, mode in modes:
            if m.training != mode:
                m.training = mode
    report.seconds = time.perf_counter() - start
    return report


def _held_out(n: int) -> List[int]:
    """The batches (of ``n``) held out of every fit: every :data:`HELD_OUT_EVERY`-th, none
    when there are fewer."""
    every = HELD_OUT_EVERY
    return [i for i in range(n) if n >= every and i % every == every - 1]


def _output_error(run: Run, which: Sequence[int]) -> Optional[float]:
    """The relative squared error of the model's output (:func:`output_tensor`) against the
    teacher's on batches ``which``, padded tokens left out; ``None`` where the two cannot be
    compared (no floating-point tensor, other shapes)."""
    diff = ref = 0.0
    for i in which:
        got = [run_batch(m, run.batches[i], run.forward_fn, i, who)
               for m, who in ((run.model, "model"), (run.teacher, "teacher"))]
        try:
            out, y = (output_tensor(g) for g in got)
        except (ValueError, AttributeError):  # an output that holds no tensor
            return None
        if out.shape != y.shape or not out.is_floating_point():
            return None
        out, y = real_tokens(out, y.to(out.device), padding_mask(run.batches[i]))
        out = out.reshape(-1, out.shape[-1] if out.dim() else 1)
        y = y.reshape(out.shape)
        # in float64 a slice at a time: an LLM's logits would not fit whole
        step = max(1, _ROWS_PER_CHUNK * 64 // max(1, out.shape[1]))
        for s in range(0, out.shape[0], step):
            o, t = out[s:s + step].double(), y[s:s + step].double()
            diff += float(((o - t) ** 2).sum())
            ref += float((t * t).sum())
    return relative_error(diff, ref)


def _progress(units: Sequence[Unit], progress: bool) -> Iterator[Unit]:
    if not progress:
        yield from units
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        for k, u in enumerate(units):
            logger.info("reconstruct: unit %d/%d %s", k + 1, len(units), u.name)
            yield u
        return
    yield from tqdm(units, desc="reconstruct", unit="unit")


def _reconstruct_unit(run: Run, unit: Unit) -> Dict[str, Any]:
    if unit.kind == "layer":
        d = closed_form_dim(unit.module)
        if d is not None and d <= MAX_CLOSED_FORM_DIM:
            return _closed_form(run, unit)
    return _adam(run, unit)


# --- closed form ------------------------------------------------------------------------------

def _closed_form(run: Run, unit: Unit) -> Dict[str, Any]:
    m = unit.module
    g = getattr(m, "groups", 1)
    bias = m.bias is not None
    halves: List[List[torch.Tensor]] = []  # per half of the batches (even, odd): its three sums
    for i in range(len(run.batches)):
        args, kwargs, (y,) = capture(run, unit, i)
        x = args[0] if args else kwargs["input"]
        y = y.movedim(unit.dim, -1)
        if isinstance(m, nn.Linear):  # padded token positions do not count
            mask = padding_mask(run.batches[i])
            x, y = drop_padding(x, x.dim() - 1, mask)[0], drop_padding(y, y.dim() - 1, mask)[0]
        rows = regression_rows(m, x)
        y = y.reshape(rows.shape[0], g, -1)
        if not halves:
            d = rows.shape[-1] + bias
            halves = [[torch.zeros(g, d, d, dtype=torch.float64, device=rows.device),
                       torch.zeros(g, d, y.shape[-1], dtype=torch.float64, device=rows.device),
                       torch.zeros((), dtype=torch.float64, device=rows.device)]
                      for _ in range(2)]
        half = halves[i % 2]
        for s in range(0, rows.shape[0], _ROWS_PER_CHUNK):
            xc = rows[s:s + _ROWS_PER_CHUNK].double()
            if bias:
                xc = torch.cat([xc, xc.new_ones(xc.shape[:2] + (1,))], -1)
            yc = y[s:s + _ROWS_PER_CHUNK].double()
            half[0] += torch.einsum("rgi,rgj->gij", xc, xc)
            half[1] += torch.einsum("rgi,rgo->gio", xc, yc)
            half[2] += (yc * yc).sum()
    gram, xty, yy = (a + b for a, b in zip(*halves))
    ref = float(yy)

    def error(w: torch.Tensor) -> float:
        sq = (w * (gram @ w)).sum() - 2 * (w * xty).sum() + yy
        return relative_error(max(float(sq), 0.0), ref)

    w0 = solve_layout(m)
    before = error(w0)
    if not unit.pruned and before < _SKIP_BELOW:
        return _row(unit, "skipped", before, before)
    damping = run.damping
    if damping == "auto":
        damping = choose_damping(*zip(*halves), w0) if len(run.batches) > 1 else 1e-3
        if damping is None:  # the held-out halves say the weights are better as they are
            if before >= _SKIP_BELOW:
                run.notes.append(f"{unit.name}: a refit did worse on held-out batches; "
                                 f"weights kept")
            return _row(unit, "closed form", before, before)
    w = ridge_solve(gram, xty, damping, unit.name, w0)
    after = error(w)
    if after <= before:
        d = w.shape[1] - bias
        with torch.no_grad():
            m.weight.copy_(w[:, :d].transpose(1, 2).reshape(m.weight.shape))
            if bias:
                m.bias.copy_(w[:, d].reshape(-1))
    else:
        if before >= _SKIP_BELOW:
            run.notes.append(f"{unit.name}: the solve did not lower the error; weights kept")
        after = before
    return _row(unit, "closed form", before, after)


# --- Adam -------------------------------------------------------------------------------------

def _adam(run: Run, unit: Unit) -> Dict[str, Any]:
    """Train the unit's parameters with Adam on ``||out - target||^2 / ||target||^2``.

    With at least :data:`HELD_OUT_EVERY` batches, every ``HELD_OUT_EVERY``-th one is held out
    of training: it picks the step count (the parameters of the checkpoint with the lowest
    held-out error are kept) and whether the unit is refit at all."""
    m = unit.module
    dev = model_device(run.model)
    store = torch.device("cpu") if run.offload else dev
    data = [map_tensors(capture(run, unit, i) + (padding_mask(run.batches[i]),),
                        lambda t: t.to(store)) for i in range(len(run.batches))]
    held = _held_out(len(data))
    train = [i for i in range(len(data)) if i not in held]

    def error(which: Sequence[int]) -> float:
        diff = ref = 0.0
        for i in which:
            args, kwargs, ys, mask = data[i]
            args, kwargs = to_device(args, dev), to_device(kwargs, dev)
            outs = unit_outputs(m(*args, **kwargs), args, kwargs)
            for out, y in zip(outs, ys):
                out, y = real_tokens(out.double(), y.to(dev).double(), mask)
                diff += float(((out - y) ** 2).sum())
                ref += float((y * y).sum())
        return relative_error(diff, ref)

    everything = range(len(data))
    before = error(everything)
    params = [p for p in m.parameters() if p.is_floating_point()]
    if (not unit.pruned and before < _SKIP_BELOW) or not params:
        return _row(unit, "skipped", before, before)
    saved = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    best = error(held) if held else None
    best_params = saved
    check = max(1, run.steps // 10)
    try:
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=run.lr)
        with torch.enable_grad():
            for step in range(run.steps):
                args, kwargs, ys, mask = to_device(data[train[step % len(train)]], dev)
                loss = sum(_relative_mse(*real_tokens(out, y, mask))
                           for out, y in zip(unit_outputs(m(*args, **kwargs), args, kwargs), ys))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if held and ((step + 1) % check == 0 or step + 1 == run.steps):
                    with torch.no_grad():
                        now = error(held)
                    if now < best:
                        best, best_params = now, [p.detach().clone() for p in params]
        opt.zero_grad(set_to_none=True)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    if held:
        with torch.no_grad():
            for p, s in zip(params, best_params):
                p.copy_(s)
        if best_params is saved:
            run.notes.append(f"{unit.name}: Adam did not lower the error on held-out batches "
                             f"(lr {run.lr:g}); weights kept")
            return _row(unit, "adam", before, before)
    after = error(everything)
    if not after <= before:  # also NaN
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        run.notes.append(f"{unit.name}: Adam did not lower the error (lr {run.lr:g}); "
                         f"weights kept")
        after = before
    return _row(unit, "adam", before, after)


def _relative_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean() / (y * y).mean().clamp_min(1e-30)


def _row(unit: Unit, method: str, before: float, after: float) -> Dict[str, Any]:
    return {"name": unit.name, "kind": unit.kind, "method": method,
            "error_before": float(before), "error_after": float(after)}
