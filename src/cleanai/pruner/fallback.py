"""What ``StructuredPruner.step()`` protects when a pruned model no longer runs.

A layer that keeps a width of its own (a split with sizes written in its code, an attention
block that rebuilds its head size from the input width) fails the forward after slicing. The
step is rolled back and, while the model still fails in a module of the same class, more is
protected each time: the channels that class splits into parts of fixed sizes, then the
channels inside the failing module, then those inside every module of its class. A layer
CleanAI prunes itself (a conv) that fails got an input of the wrong width from the code around
it: the groups that feed it are protected.
"""
from __future__ import annotations

import warnings
from typing import List

from torch import nn

from ..core.graph import Group
from ..core.layers import get_layer_pruner


def protect_failing(model: nn.Module, groups: List[Group], layer: str, error: str,
                    tried: set) -> bool:
    """Protect the next set of channels for a failure in module ``layer`` (``error``: the
    message); ``tried`` remembers earlier stages across calls of one step. False when there
    is nothing new to protect (the caller then raises)."""
    if get_layer_pruner(model.get_submodule(layer)) is not None:
        return _protect_inputs(groups, layer, error, tried)
    cls = type(model.get_submodule(layer))
    if cls in tried or cls is type(model):
        return False
    scopes = {n for n, m in model.named_modules() if type(m) is cls}
    if (cls, "splits") not in tried:  # first the channels its code splits by fixed sizes
        tried.add((cls, "splits"))
        if _protect_fixed_splits(groups, cls, scopes, error):
            return True
    reason = f"pruning breaks {cls.__name__}"
    if (cls, "one") not in tried:  # then the failing layer alone (its siblings may differ)
        tried.add((cls, "one"))
        hit = _protect_within(groups, {layer}, f"{reason} {layer}")
        if hit:
            warnings.warn(f"{error.split('. The model')[0]}. CleanAI now keeps the channels "
                          f"of {hit} groups inside {layer} ({cls.__name__}) and plans again.",
                          stacklevel=3)
            return True
    tried.add(cls)
    hit = _protect_within(groups, scopes, reason)
    if hit:
        warnings.warn(f"{error.split('. The model')[0]}. CleanAI now keeps the channels of "
                      f"{hit} groups inside {len(scopes)} {cls.__name__} layers and plans "
                      f"again.", stacklevel=3)
    return hit > 0


def _protect_within(groups: List[Group], scopes: set, reason: str) -> int:
    """Protect every group with a member inside ``scopes``; how many were not yet."""
    return _protect([g for g in groups if not g.protected.all()
                     and any(_within(m.name, scopes) for m in g.members)], reason)


def _protect_fixed_splits(groups: List[Group], cls: type, scopes: set, error: str) -> bool:
    """Protect the groups that ``cls``'s code splits into parts of fixed sizes."""
    reason = f"split by {cls.__name__} into parts of sizes fixed in its code"
    hit = _protect([g for g in groups if not g.protected.all()
                    and any(_within(w, scopes) for w in g.fixed_splits)], reason)
    if hit:
        warnings.warn(f"{error.split('. The model')[0]}. CleanAI now keeps the {hit} "
                      f"groups that {cls.__name__} splits into parts of fixed sizes and "
                      f"plans again.", stacklevel=4)
    return hit > 0


def _protect_inputs(groups: List[Group], layer: str, error: str, tried: set) -> bool:
    if layer in tried:
        return False
    tried.add(layer)
    reason = f"pruning breaks the input of {layer}"
    hit = _protect([g for g in groups if not g.protected.all() and
                    any(m.name == layer and m.kind in ("in", "same") for m in g.members)],
                   reason)
    if hit:
        warnings.warn(f"{error.split('. The model')[0]}. CleanAI now keeps the channels of "
                      f"the {hit} groups that feed {layer} and plans again.", stacklevel=4)
    return hit > 0


def _protect(groups: List[Group], reason: str) -> int:
    """Protect every channel of ``groups``, with ``reason`` counting those newly protected;
    returns how many groups."""
    for g in groups:
        g.reasons[reason] = int((~g.protected).sum())
        g.protected[:] = True
    return len(groups)


def _within(layer: str, scopes: set) -> bool:
    """True when ``layer`` is one of ``scopes`` or inside one (a set lookup per name prefix)."""
    if "" in scopes or layer in scopes:
        return True
    parts = layer.split(".")
    return any(".".join(parts[:i]) in scopes for i in range(1, len(parts)))
