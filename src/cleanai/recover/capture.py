"""Running a pruned model and its dense teacher for reconstruction: one probe forward for
the module order and output shapes, forwards that stop once a unit has run, and the unit's
inputs and the teacher's targets captured there (kept channels only)."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..core.runtime import ForwardFn, iter_tensors, map_tensors, run_forward
from ..importance.stats import drop_padding
from .common import RecoveryError, check_finite, model_device, to_device
from .units import Unit


@dataclasses.dataclass
class Run:
    model: nn.Module
    teacher: nn.Module
    batches: List[Any]
    forward_fn: Optional[ForwardFn]
    steps: int
    lr: float
    damping: Union[float, str]
    offload: bool
    notes: List[str]


class _Stop(BaseException):
    """Raised by a capturing hook to end a forward early (BaseException: a model's own
    ``except Exception`` must not swallow it)."""


# --- finding the units ------------------------------------------------------------------------

def probe(model: nn.Module, batch: Any, forward_fn: Optional[ForwardFn],
           who: str) -> Tuple[List[str], Dict[str, Optional[List[torch.Size]]]]:
    """Module names in first-call order and the shapes of each one's output tensors (first
    call), from one forward of ``batch``."""
    order: List[str] = []
    shapes: Dict[str, Optional[List[torch.Size]]] = {}
    handles = []

    def pre(name):
        def hook(mod, args):
            if name not in shapes:
                shapes[name] = None
                order.append(name)
        return hook

    def post(name):
        def hook(mod, args, kwargs, out):
            if shapes.get(name) is None:
                shapes[name] = [t.shape for t in unit_outputs(out, args, kwargs)] or None
        return hook

    try:
        for name, m in model.named_modules():
            handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post(name), with_kwargs=True))
        run_batch(model, batch, forward_fn, 0, who)
    finally:
        for h in handles:
            h.remove()
    return order, shapes


# --- running and capturing --------------------------------------------------------------------

def run_batch(model: nn.Module, batch: Any, forward_fn: Optional[ForwardFn], i: int,
             who: str) -> Any:
    try:
        return run_forward(model, to_device(batch, model_device(model)), forward_fn)
    except _Stop:
        return None
    except Exception as exc:
        raise RecoveryError(f"batch {i} does not run through the {who}: "
                            f"{type(exc).__name__}: {exc}") from exc


def capture(run: Run, unit: Unit, i: int) -> Tuple[tuple, dict, List[torch.Tensor]]:
    """The unit's (args, kwargs) in the model (detached) and the teacher's targets at it, one
    per output tensor (kept channels only), on batch ``i``; both forwards stop once the unit
    has been seen."""
    got: Dict[str, Any] = {}

    def pre(mod, args, kwargs):
        got["args"], got["kwargs"] = args, kwargs
        raise _Stop

    def post(mod, args, kwargs, out):
        got["out"] = unit_outputs(out, args, kwargs)
        raise _Stop

    for model, module, hook, who in ((run.model, unit.module, pre, "model"),
                                     (run.teacher, unit.target, post, "teacher")):
        h = (module.register_forward_pre_hook(hook, with_kwargs=True) if who == "model"
             else module.register_forward_hook(hook, with_kwargs=True))
        try:
            run_batch(model, run.batches[i], run.forward_fn, i, who)
        finally:
            h.remove()
    if "args" not in got or len(got.get("out") or ()) != len(unit.outputs):
        raise RecoveryError(f"reconstruct: {unit.name} was not called (or returned no tensor) "
                            f"on batch {i}; are all batches alike?")
    args, kwargs = map_tensors((got["args"], got["kwargs"]), lambda t: t.detach())
    # a key/value cache (a Hugging Face ``DynamicCache``...) would grow with every replay
    args = tuple(None if _is_cache(a) else a for a in args)
    kwargs = {k: None if _is_cache(v) else False if k == "use_cache" else v
              for k, v in kwargs.items()}
    for t in iter_tensors((args, kwargs)):
        check_finite(t, f"the input of {unit.name} on batch {i}")
    targets = []
    for t, (keep, dim) in zip(got["out"], unit.outputs):
        t = t.detach()
        if keep is not None:
            t = t.index_select(dim, keep.to(t.device))
        check_finite(t, f"the teacher's output at {unit.name} on batch {i}")
        targets.append(t.to(model_device(run.model)))
    return args, kwargs, targets


def unit_outputs(out: Any, args: tuple, kwargs: dict) -> List[torch.Tensor]:
    """The tensors of a unit's output that reconstruction matches: floating-point ones (not
    a mask or the indices of kept tokens) that are not one of its inputs handed back (T5's
    blocks return the ``position_bias`` they were given)."""
    given = {id(t) for t in iter_tensors((args, kwargs))}
    return [t for t in iter_tensors(out) if t.is_floating_point() and id(t) not in given]


def _is_cache(value: Any) -> bool:
    """A key/value cache object handed to a block (Hugging Face's ``*Cache`` classes)."""
    return not isinstance(value, torch.Tensor) and type(value).__name__.endswith("Cache")


def real_tokens(out: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor]
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``out`` and ``y`` without padded token positions (see
    :func:`~cleanai.importance.stats.drop_padding`); unchanged when their shapes differ."""
    if y.shape != out.shape:
        return out, y
    return drop_padding(out, out.dim() - 1, mask)[0], drop_padding(y, y.dim() - 1, mask)[0]
