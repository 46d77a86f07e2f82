"""What every recovery method shares: checking a (pruned model, dense teacher) pair, the
teacher's channels that the pruned model kept, calibration batches, and all-or-nothing calls."""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..core.slicing import drop_grad_accumulator
from ..core.graph import module_signature
from ..core.runtime import map_tensors, state_tensors
from ..pruner.history import get_history, signature_json

Key = Tuple[str, str, int]  # (layer or parameter name, "in" | "out" | "param" | "internal", dim)


class RecoveryError(ValueError):
    """Recovery could not run on the inputs given; the model was left exactly as it was."""


def check_pair(model: nn.Module, teacher: nn.Module, what: str = "recovery") -> None:
    """Raise :class:`RecoveryError` unless ``model`` was pruned by CleanAI and ``teacher`` has
    the architecture ``model`` had before its first pruning step (the same parameter and buffer
    names and shapes). Keep the teacher with ``copy.deepcopy(model)`` before pruning."""
    for name, obj in (("model", model), ("teacher", teacher)):
        if not isinstance(obj, nn.Module):
            raise TypeError(f"{what}: {name} must be an nn.Module, got {type(obj).__name__}")
    if model is teacher:
        raise RecoveryError(f"{what}: the teacher is the model itself; keep a copy of the dense "
                            f"model (copy.deepcopy(model)) before pruning")
    record = get_history(model)
    if record is None or not record["steps"]:
        raise RecoveryError(f"{what}: {type(model).__name__} was not pruned by CleanAI (it has "
                            f"no pruning history); there is nothing to recover")
    try:
        mine = signature_json(module_signature(teacher))
    except (RuntimeError, ValueError) as exc:  # lazy layers not yet run
        raise RecoveryError(f"{what}: cannot read the teacher's parameter shapes ({exc}); run "
                            f"it once on an input first") from None
    original = record["original"]
    if mine != original:
        diff = _first_diff(mine, original)
        raise RecoveryError(f"{what}: the teacher ({type(teacher).__name__}) is not the "
                            f"architecture {type(model).__name__} had before pruning ({diff}); "
                            f"pass the dense model kept before pruning")


def _first_diff(got: Dict[str, Any], want: Dict[str, Any]) -> str:
    for k in want:
        if k not in got:
            return f"it has no {k!r}"
        if got[k] != want[k]:
            return f"{k!r} is {got[k]} in the teacher, {want[k]} before pruning"
    extra = next((k for k in got if k not in want), None)
    return f"it has an extra {extra!r}" if extra else "same shapes"


def kept_indices(model: nn.Module) -> Dict[Key, torch.Tensor]:
    """For every layer dim the pruning history touched, the original (teacher) indices the
    pruned model still holds, in order: ``teacher_tensor.index_select(dim, kept)`` lines up
    with the pruned model's. Steps are composed; untouched dims are absent."""
    record = get_history(model)
    out: Dict[Key, torch.Tensor] = {}
    for step in (record["steps"] if record else []):
        for e in step.get("layers", []):
            if e.get("kind") not in ("in", "out", "param", "internal"):
                continue
            key = (e["name"], e["kind"], int(e["dim"]))
            keep = torch.tensor(e["keep"], dtype=torch.long)
            out[key] = out[key].index_select(0, keep) if key in out else keep
    return out


def materialize(data: Iterable, max_batches: Optional[int], what: str) -> List[Any]:
    """Up to ``max_batches`` batches of ``data`` as a list (a generator is read once), each
    reduced to the model's inputs as in :meth:`StructuredPruner.calibrate`."""
    from ..importance.stats import model_inputs

    if data is None:
        raise RecoveryError(f"{what} needs data: pass a DataLoader or an iterable of batches")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    out = [model_inputs(batch) for batch in take(data, max_batches, what)]
    if not out:
        raise RecoveryError(f"{what}: the data yielded no batches")
    return out


def take(data: Iterable, max_batches: Optional[int], what: str) -> List[Any]:
    """The first ``max_batches`` batches of ``data`` (all when None), as they are."""
    try:
        it = iter(data)
    except TypeError:
        raise RecoveryError(f"{what}: data must be an iterable of batches, got "
                            f"{type(data).__name__}") from None
    out = []
    for batch in it:
        if max_batches is not None and len(out) >= max_batches:
            break
        out.append(batch)
    return out


def to_device(inputs: Any, device: torch.device) -> Any:
    """Every tensor of ``inputs`` on ``device``."""
    return map_tensors(inputs, lambda t: t.to(device))


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def check_finite(t: torch.Tensor, where: str) -> None:
    """Raise :class:`RecoveryError` when ``t`` holds NaN or inf."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise RecoveryError(f"{where} holds NaN or inf values; check the data and the model "
                            f"(the model was left unchanged)")


@contextmanager
def all_or_nothing(model: nn.Module) -> Iterator[Callable[[], None]]:
    """On an exception (also KeyboardInterrupt), every parameter and buffer of ``model`` gets
    its values back, and every module its train/eval flag and ``requires_grad`` flags. Yields
    the function that does so, for a caller that decides to undo its work without raising."""
    modules = list(model.modules())
    params, buffers = state_tensors(modules)
    saved = [(t, t.detach().clone()) for t in params + buffers]
    modes = [(m, m.training) for m in modules]
    flags = [(p, p.requires_grad) for p in params]

    def restore() -> None:
        with torch.no_grad():
            for t, copy in saved:
                if t.shape == copy.shape:
                    t.copy_(copy)
                else:
                    t.data = copy
                    drop_grad_accumulator(t)
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)

    try:
        yield restore
    except BaseException:
        restore()
        raise


def relative_error(diff_sq: float, ref_sq: float) -> float:
    """``||pruned - dense||^2 / ||dense||^2`` from the two sums (0 when both are 0)."""
    if ref_sq <= 0:
        return 0.0 if diff_sq <= 0 else math.inf
    return diff_sq / ref_sq
