"""The one sure check that ``model.config`` describes a pruned model: the model class is
built from the config on the meta device (no memory, no weights) and its parameter and buffer
shapes and the float attributes its modules derive from sizes are compared with the pruned
model's (see :mod:`cleanai.pruner.model_config`)."""
from __future__ import annotations

import copy
import logging
import math
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

Mismatch = Tuple[str, Any, Any]  # (name, the pruned model's, a copy built from the config's)


class _Unset:
    """A config field that did not exist before CleanAI wrote it."""


UNSET = _Unset()


def with_values(config: Any, values: Dict[str, Any]) -> Any:
    """A copy of ``config`` with ``values`` set (``UNSET``: the field removed)."""
    config = copy.deepcopy(config)
    for f, v in values.items():
        if v is UNSET:
            if f in vars(config):
                delattr(config, f)
        else:
            setattr(config, f, v)
    return config


class _ScalarsOnCpu(TorchFunctionMode):
    """Under ``torch.device("meta")``: ``torch.tensor(3.5)`` (a module's 0-dim scale, as
    RecurrentGemma's ``normalizer = sqrt(hidden_size)``) is made on the CPU, so that a
    rebuilt copy's derived scalars can be compared; every other tensor stays on meta."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.tensor and args and isinstance(args[0], (int, float)) and \
                kwargs.get("device") is None:
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def _built(model: nn.Module, config: Any) -> Tuple[Optional[nn.Module], str]:
    """``type(model)(config)`` on the meta device (its 0-dim scalars on the CPU), or None and
    why it cannot be built so."""
    try:
        with torch.device("meta"), _ScalarsOnCpu(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return type(model)(config), ""
    except Exception as exc:  # a model that cannot be rebuilt from its config: nothing to check
        logger.debug("could not rebuild %s from its config: %s", type(model).__name__, exc)
        return None, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


def _rebuilt(model: nn.Module, config: Any) -> Optional[nn.Module]:
    """``type(model)(config)`` on the meta device, or None when it cannot be built so."""
    return _built(model, config)[0]


def config_mismatch(model: nn.Module, old: Optional[Dict[str, Any]] = None) -> List[Mismatch]:
    """Where ``type(model)(model.config)`` would differ from ``model``: parameters of another
    shape (or missing on one side); buffers of another shape (``inv_freq`` follows the rotary
    dims) and float attributes of its modules (a scale computed from a size), those two only
    where the config's last changes made them differ (``old``: the changed fields' previous
    values; a buffer a forward grows, a float set at run time differ anyway). Empty when it
    would not differ, or when the model cannot be built from its config."""
    fresh, error = _built(model, model.config)
    if fresh is None:
        # a config the step's sizes made unbuildable (a head count that no longer divides the
        # hidden size) is a mismatch; one that never built the model says nothing
        if old and _rebuilt(model, with_values(model.config, old)) is not None:
            return [("model.config", "pruned", error)]
        return []
    wrong = _shape_differences(model.named_parameters(), fresh.named_parameters())
    derived = _shape_differences(model.named_buffers(), fresh.named_buffers()) + \
        _float_differences(model, fresh)
    if derived and old:
        before = _rebuilt(model, with_values(model.config, old))
        if before is not None:  # what differed with the old sizes too is not the change's
            anyway = {n for n, _, _ in _shape_differences(model.named_buffers(),
                                                            before.named_buffers())
                      + _float_differences(model, before)}
            derived = [w for w in derived if w[0] not in anyway]
    return wrong + derived


def _shape_differences(mine, built) -> List[Mismatch]:
    """``(name, shape, built shape)`` for each named tensor whose shape differs, or that one
    side lacks (``None``)."""
    mine = {n: tuple(t.shape) for n, t in mine}
    built = {n: tuple(t.shape) for n, t in built}
    return [(n, mine.get(n), built.get(n)) for n in list(mine) + [n for n in built if n not in mine]
            if mine.get(n) != built.get(n)]


def _float_differences(model: nn.Module, fresh: nn.Module) -> List[Mismatch]:
    """Float attributes (``embed_scale = hidden_size ** 0.5``) and 0-dim float buffers built
    on the CPU (RecurrentGemma's ``normalizer``, see :class:`_ScalarsOnCpu`) that differ between
    the modules of ``model`` and those of ``fresh``, by qualified name."""
    built = dict(fresh.named_modules())
    out, held = [], []  # the attributes first: a warning names the scale, not its buffer
    for name, m in model.named_modules():
        other = built.get(name)
        if other is None:
            continue
        for attr, v in m.__dict__.items():
            w = other.__dict__.get(attr)
            if type(v) is float and type(w) is float and math.isfinite(v) and \
                    not math.isclose(v, w, rel_tol=1e-6):
                out.append((f"{name}.{attr}" if name else attr, v, w))
        for b, w in other._buffers.items():
            v = m._buffers.get(b)
            if w is None or w.dim() != 0 or not w.is_floating_point() or \
                    w.device.type == "meta" or v is None or v.dim() != 0 or \
                    v.device.type == "meta":
                continue
            if not math.isclose(float(v), float(w), rel_tol=1e-6):
                held.append((f"{name}.{b}" if name else b, float(v), float(w)))
    return out + held
