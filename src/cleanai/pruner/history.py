"""The pruning history a model carries: enough to rebuild its shape from the original.

Every applied step (by any :class:`StructuredPruner`, or by :func:`replay`) is appended to a
plain JSON-able record stored on the model itself, so a model pruned in several steps by
several pruners can be saved with :func:`cleanai.save_pruned` without keeping the pruners.
The record survives ``copy.deepcopy`` and is never part of the ``state_dict``.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

from torch import nn

from ..core.graph import module_signature

ATTRIBUTE = "_cleanai_history"


def signature_json(signature: Dict[str, Tuple[int, ...]]) -> Dict[str, List[int]]:
    """A module signature (name -> shape) with lists instead of tuples, for JSON."""
    return {name: list(shape) for name, shape in signature.items()}


def record_step(model: nn.Module, entry: Dict[str, Any],
                signature_before: Optional[Dict[str, Tuple[int, ...]]] = None,
                signature_after: Optional[Dict[str, Tuple[int, ...]]] = None) -> None:
    """Append one applied step (``{"layers": [...], ...}``) to ``model``'s history.

    ``signature_before`` is the model's :func:`module_signature` before the step; the first
    step stores it as the original architecture's fingerprint. If the model's shapes changed
    outside CleanAI since the last step, the history is marked broken (saving then refuses).
    ``signature_after`` is the signature after the step, when the caller has it already.
    """
    after = signature_json(signature_after if signature_after is not None
                           else module_signature(model))
    before = signature_json(signature_before) if signature_before is not None else None
    record = model.__dict__.get(ATTRIBUTE)
    if record is None:
        if before is None:
            return  # nothing known about the original: no history can be started
        record = {"original": before, "steps": [], "broken": None}
        object.__setattr__(model, ATTRIBUTE, record)
    elif before is not None and before != record["current"] and record["broken"] is None:
        record["broken"] = (f"the model's parameter shapes changed outside CleanAI before "
                            f"step {len(record['steps']) + 1}")
    record["steps"].append(_copy_step(entry))
    record["current"] = after


_ATOMIC = (int, float, str, bool, type(None))
_ATOMIC_SET = frozenset(_ATOMIC)


def _copy_step(entry: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of a step entry whose structure (the entry, its layer list, each layer's dict)
    is the model's own, so that editing a pruner's ``history`` cannot change it; the
    ``keep`` index lists, built for this entry and never changed, are shared rather than
    copied (a step holds tens of thousands of indices)."""
    out = {k: v if type(v) in _ATOMIC_SET else _copy(v) for k, v in entry.items() if k != "layers"}
    if "layers" in entry:
        out["layers"] = [{k: v if type(v) in _ATOMIC_SET or k == "keep" else _copy(v)
                          for k, v in layer.items()} for layer in entry["layers"]]
    return out


def _copy(value: Any) -> Any:
    """A deep copy of a JSON-like entry: dicts, lists and tuples rebuilt, scalars shared.

    Much faster than ``copy.deepcopy`` on the long ``keep`` lists of a step (no memo per
    int); anything else is deep-copied as usual."""
    kind = type(value)
    if kind is list or kind is tuple:
        if set(map(type, value)) <= _ATOMIC_SET:  # a keep list: copied at C speed
            return list(value) if kind is list else value
        items = [v if type(v) in _ATOMIC else _copy(v) for v in value]
        return items if kind is list else tuple(items)
    if kind is dict:
        return {k: v if type(v) in _ATOMIC else _copy(v) for k, v in value.items()}
    if kind in _ATOMIC:
        return value
    return copy.deepcopy(value)


def get_history(model: nn.Module) -> Optional[Dict[str, Any]]:
    """The history record of ``model`` (``{"original", "steps", "current", "broken"}``) or
    ``None`` when it was never pruned by CleanAI. Returned as stored: do not mutate it."""
    return model.__dict__.get(ATTRIBUTE)


def set_history(model: nn.Module, original: Dict[str, List[int]], steps: List[Dict[str, Any]]) -> None:
    """Replace ``model``'s history (used after loading a saved pruned model)."""
    object.__setattr__(model, ATTRIBUTE, {
        "original": _copy(original), "steps": _copy(steps), "broken": None,
        "current": signature_json(module_signature(model))})
