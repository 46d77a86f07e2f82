"""Running a model the way its inputs ask, and putting it back exactly as it was."""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
from torch import nn

ForwardFn = Callable[[nn.Module, Any], Any]


class LeanRecordingError(RuntimeError):
    """A forward read a saved activation that a lean trace recording dropped (it runs
    backward itself): see :func:`cleanai.core.record.record_forward`."""


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside nested tuples, lists, dicts and dataclasses (e.g. ``ModelOutput``)."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            yield o
        elif isinstance(o, dict):
            stack.extend(reversed(list(o.values())))
        elif isinstance(o, (list, tuple)):
            stack.extend(reversed(o))
        elif dataclasses.is_dataclass(o) and not isinstance(o, type):
            stack.extend(reversed([getattr(o, f.name) for f in dataclasses.fields(o)]))


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in nested tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, map_tensors(v, fn)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def run_forward(model: nn.Module, inputs: Any, forward_fn: Optional[ForwardFn] = None) -> Any:
    """Call the model the way its inputs ask: a dict as keywords, a tuple as positionals."""
    if forward_fn is not None:
        return forward_fn(model, inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def find_submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)``, walking ``_modules`` directly: pruning looks up hundreds
    of layers by name, and ``get_submodule`` costs several times more per call."""
    m = model
    try:
        for part in name.split(".") if name else ():
            m = m._modules[part]
    except (KeyError, AttributeError):
        m = None
    return m if m is not None else model.get_submodule(name)


@contextmanager
def preserved_state(model: nn.Module, modules: Optional[List[nn.Module]] = None,
                    same_modes: bool = False) -> Iterator[None]:
    """Restore train/eval flags, ``requires_grad`` flags, buffers and the RNG on exit.

    ``modules`` is ``list(model.modules())`` when the caller has it already. ``same_modes=True``
    promises that no module is switched to training inside: the running statistics of
    PyTorch's own norm layers in eval mode then cannot change and are not copied."""
    if modules is None:
        modules = list(model.modules())
    modes = [(m, m.training) for m in modules]
    params, buffers = state_tensors(modules)
    flags = [(p, p.requires_grad) for p in params]
    if same_modes:
        fixed, held = set(), set()  # buffers of eval-mode norms; buffers of any other module
        for m in modules:
            if m._buffers:
                ids = fixed if not m.training and type(m).forward in _NORM_FORWARDS else held
                ids.update(id(b) for b in m._buffers.values() if b is not None)
        if fixed:
            buffers = [b for b in buffers if id(b) not in fixed or id(b) in held]
    # a buffer on the meta device holds no values to restore (a model traced for its shapes)
    saved = [(b, b.detach().clone()) for b in buffers if not b.is_meta]
    rng = torch.get_rng_state()
    try:
        yield
    finally:
        for m, mode in modes:
            if m.training != mode:  # (nn.Module.__setattr__ is slow; most are unchanged)
                m.training = mode
        for p, flag in flags:
            if p.requires_grad is not flag:
                p.requires_grad_(flag)
        with torch.no_grad():
            # every buffer: kernels such as batch_norm's update running stats without
            # bumping the tensor's version, so no cheaper test says which ones changed; an
            # unchanged one is not written: autograd may hold it (an index table a cached
            # attention bias was gathered with), and a write would bump its version
            for b, copy in saved:
                if b.shape == copy.shape and not torch.equal(b, copy):
                    b.copy_(copy)
        torch.set_rng_state(rng)


# forwards that leave their buffers alone in eval mode (BatchNorm, InstanceNorm, SyncBatchNorm)
_NORM_FORWARDS = frozenset({nn.modules.batchnorm._BatchNorm.forward,
                            nn.SyncBatchNorm.forward,
                            nn.modules.instancenorm._InstanceNorm.forward})


def state_tensors(modules: List[nn.Module]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The parameters and buffers of ``modules``, each once: ``model.parameters()`` and
    ``model.buffers()`` without building their names."""
    seen = set()
    params: List[torch.Tensor] = []
    buffers: List[torch.Tensor] = []
    for m in modules:
        if m._parameters:
            for t in m._parameters.values():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    params.append(t)
        if m._buffers:
            for t in m._buffers.values():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    buffers.append(t)
    return params, buffers
