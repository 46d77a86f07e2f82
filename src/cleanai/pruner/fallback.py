"""What ``StructuredPruner.step()`` protects when a pruned model no longer runs.

Code that keeps a width of its own (``gate.view(-1, 16, 1, 1)`` in a model's forward, a split
with sizes written down, an attention block that rebuilds its head size) fails the check
forward after slicing; no trace can see it. The step is rolled back and the groups whose
removal breaks the model are found by bisection over the plan's groups: the plan's first
``k`` groups are sliced in, the model run and put back, and ``k`` halved towards the
smallest prefix that fails, whose last group is one at fault (``log2(n)`` forwards for ``n``
groups). It is set aside and the rest tried again, until the rest runs (see
:func:`find_breaking`). Exactly those groups are protected, with one warning per failure
that names the exception and where it happened (the module, or the model's own forward, and
the line of code); the others are pruned as planned. Every try is checked by a real forward,
and so is the step that follows, so a search misled by groups that only fail in some
combinations still ends with a model that runs.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..core.graph import DependencyGraph, Group
from .apply import PruningError, try_removals
from .failure import Failure
from .ranking import tie_fraction


def protect_breaking(model: nn.Module, graph: DependencyGraph, removals: Dict[int, torch.Tensor],
                     error: PruningError) -> bool:
    """Protect the groups of ``removals`` (a plan that failed with ``error``) whose removal
    breaks ``model``, warning once per failure; False when none is found (the caller then
    raises ``error``)."""
    if getattr(error, "failure", None) is None:
        return False
    culprits = find_breaking(model, graph, removals, error.failure)
    if not culprits:
        return False
    by_id = {g.id: g for g in graph.groups}
    culprits = _tie_together(model, graph, removals, culprits)
    sites: Dict[Tuple, List[Tuple[Group, Failure, Optional[str]]]] = {}
    for gid, failure in culprits:
        g = by_id[gid]
        fixed = _fixed_split(model, g, failure)
        site = (failure.error, failure.source or failure.layer_type or failure.layer, fixed)
        sites.setdefault(site, []).append((g, failure, fixed))
    name = type(model).__name__
    for hits in sites.values():
        groups = [g for g, _, _ in hits]
        failure, fixed = hits[0][1], hits[0][2]
        if fixed:
            reason = f"split by {fixed} into parts of sizes fixed in its code"
            tail = (f"CleanAI keeps the {_plural(len(groups), 'group')} that {fixed} splits "
                    f"into parts of fixed sizes and prunes the rest")
        else:
            reason = f"pruning it breaks the forward: {failure.error}{failure.where(name)}"
            tail = (f"CleanAI keeps {'its' if len(groups) == 1 else 'their'} channels and "
                    f"prunes the rest")
        _protect(groups, reason)
        listed = ", ".join(_describe(g) for g in groups[:4])
        if len(groups) > 4:
            listed += f" and {len(groups) - 4} more"
        what = f"group {listed}" if len(groups) == 1 else f"groups {listed}"
        verb = "loses" if len(groups) == 1 else "lose"
        warnings.warn(f"{name} no longer runs when {what} {verb} channels: "
                      f"{failure.describe(name)}. {tail}.", stacklevel=_caller_level())
    return True


def find_breaking(model: nn.Module, graph: DependencyGraph, removals: Dict[int, torch.Tensor],
                  failure: Optional[Failure] = None) -> List[Tuple[int, Failure]]:
    """The groups of ``removals`` (which, applied together, break ``model``; ``failure``: how)
    whose removal breaks it, each with the failure it causes, found by bisection on the model
    itself (every try is rolled back).

    The unpruned model runs; the smallest failing prefix of the plan's groups, in plan order,
    ends with a group at fault. That group is set aside and, while the rest still fails, the
    search goes on from there (the prefix before it is known to run): one try of the rest,
    then bisection, about ``log2(n)`` forwards per group at fault among ``n``. Where groups at
    fault come one after another (every attention block of a transformer), the search
    gallops instead, trying 1, 2, 4, ... more groups: about one forward each.
    """
    # groups that must lose as many channels as each other go in and out together
    tied = {g.id: g.equal_counts for g in graph.groups if g.equal_counts}
    order: List[List[int]] = []
    placed: set = set()
    for gid, idx in removals.items():
        if idx.numel() and gid not in placed:
            unit = [t for t in tied.get(gid, [gid]) if t in removals and removals[t].numel()]
            placed.update(unit)
            order.append(unit)
    found: List[Tuple[int, Failure]] = []

    def attempt(k: int) -> Optional[Failure]:
        return try_removals(model, graph, {g: removals[g] for unit in order[:k] for g in unit})

    good, close = 0, 0  # order[:good] runs; how many groups at fault in a row came close
    while good < len(order):
        lo, hi, at_hi = good, None, None
        if close >= 2:  # gallop: the next one at fault is likely close by
            step = 1
            while hi is None:
                k = min(lo + step, len(order))
                f = attempt(k)
                if f is not None:
                    hi, at_hi = k, f
                elif k == len(order):
                    return found  # the rest runs
                else:
                    lo, step = k, step * 2
        else:
            at_hi = failure if failure is not None else attempt(len(order))
            if at_hi is None:
                return found
            hi = len(order)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            f = attempt(mid)
            if f is None:
                lo = mid
            else:
                hi, at_hi = mid, f
        found += [(gid, at_hi) for gid in order.pop(hi - 1)]
        close = close + 1 if hi - 1 - good <= 1 else 0
        good, failure = hi - 1, None
    return found


def _tie_together(model: nn.Module, graph: DependencyGraph, removals: Dict[int, torch.Tensor],
                  culprits: List[Tuple[int, Failure]]) -> List[Tuple[int, Failure]]:
    """Tie the groups at fault that run when they shrink by the same fraction, and return
    the others (to protect).

    An attention block that derives its head size from its input's width
    (``x.reshape(B, N, 3, self.num_heads, C // self.num_heads)``) breaks when its heads or
    that width lose channels alone, and runs when both keep the same fraction (5 of 6 heads
    and 5/6 of the width). Groups at fault that share a layer are tried together: each
    loses channels to the common fraction nearest the plan's, next to the rest of the plan,
    in one check forward (rolled back). Where the model runs, the groups keep that tie in
    every later plan (``Group.equal_fractions``), with one warning."""
    by_id = {g.id: g for g in graph.groups}
    failures = dict(culprits)
    ids = [gid for gid, _ in culprits if not by_id[gid].equal_fractions]  # not tied in vain
    # a partner the plan left alone (3 heads keep all 3 at ratio 0.25) is tried too
    at_layer: Dict[str, List[int]] = {}
    for g in graph.groups:
        if not len(removals.get(g.id, ())) and g.prunable and not g.equal_fractions:
            for name in {m.name for m in g.members}:
                at_layer.setdefault(name, []).append(g.id)
    for gid in list(ids):
        for name in {m.name for m in by_id[gid].members}:
            ids += [h for h in at_layer.get(name, ()) if h not in ids and
                    by_id[h].kind != by_id[gid].kind]
    parent = {gid: gid for gid in ids}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # heads go with the widths they share a layer with; two widths are never tied this way
    # (a patch-merging layer reads one stage's width and writes the next's)
    layers = {gid: {m.name for m in by_id[gid].members} for gid in ids}
    for a in ids:
        for b in ids:
            if a < b and by_id[a].kind != by_id[b].kind and layers[a] & layers[b]:
                parent[root(a)] = root(b)
    parts: Dict[int, List[int]] = {}
    for gid in ids:
        parts.setdefault(root(gid), []).append(gid)
    at_fault = {gid for gid, _ in culprits}
    trial = {g: idx for g, idx in removals.items() if g not in at_fault}
    tied: set = set()
    sites: Dict[Tuple, List[Tuple[List[Group], Dict[int, int]]]] = {}
    for part in parts.values():
        groups = [by_id[i] for i in part]
        if len(groups) < 2:
            continue
        planned = [(g.size - len(removals.get(g.id, ()))) / g.size for g in groups]
        keep = tie_fraction(groups, {g.id: g.size for g in groups}, sum(planned) / len(planned),
                            {g.id: min(g.prunable, g.size - 1) for g in groups}, shrink=True)
        cut = {g.id: _some(g, g.size - keep[g.id], removals.get(g.id)) for g in groups}
        if all(len(idx) for idx in cut.values()) and \
                try_removals(model, graph, {**trial, **cut}) is None:
            trial.update(cut)
            tied.update(part)
            for g in groups:
                g.equal_fractions, g.fraction_base = sorted(part), g.size
            first = failures[next(i for i in part if i in failures)]
            site = (first.error, first.source or first.layer_type or first.layer)
            sites.setdefault(site, []).append((groups, keep))
    name = type(model).__name__
    for site, found in sites.items():
        groups = [g for part, _ in found for g in part]
        listed = ", ".join(_describe(g) for g in groups[:4]) + \
            (f" and {len(groups) - 4} more" if len(groups) > 4 else "")
        keep = found[0][1]
        example = next(g for g in found[0][0] if g.id in failures)
        sets = f" ({len(found)} sets, each tied within)" if len(found) > 1 else ""
        warnings.warn(f"{name} no longer runs when groups {listed} lose channels apart"
                      f"{sets}: {failures[example.id].describe(name)}. It runs when the heads "
                      f"and the width they share keep the same fraction of their channels "
                      f"(e.g. {keep[example.id]} of {example.size} in group {example.id}): "
                      f"CleanAI prunes them together.", stacklevel=_caller_level())
    return [(gid, f) for gid, f in culprits if gid not in tied]


def _some(group: Group, n: int, planned: Optional[torch.Tensor]) -> torch.Tensor:
    """``n`` unprotected channels of ``group`` for a check forward: the planned ones first."""
    order = [] if planned is None else planned.tolist()
    taken = set(order)
    free = [i for i in (~group.protected).nonzero().flatten().tolist() if i not in taken]
    return torch.tensor((order + free)[:n], dtype=torch.long)


def _caller_level() -> int:
    """The ``stacklevel`` that points a warning from the function calling this one at the
    first frame outside CleanAI (the user's ``pruner.step()`` or ``pruner.prune()``)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _fixed_split(model: nn.Module, group: Group, failure: Failure) -> Optional[str]:
    """The class of the module that splits ``group`` into parts of fixed sizes, when the
    failure happened inside it."""
    for where in group.fixed_splits:
        if failure.layer is not None and _within(failure.layer, {where}):
            try:
                return type(model.get_submodule(where)).__name__
            except AttributeError:
                return None
    return None


def _describe(group: Group) -> str:
    """``3 (16 channels: stem and 3 more layers)``."""
    layers = list(dict.fromkeys(m.name for m in group.members))
    first = next((m.name for m in group.members if m.kind == "out"), layers[0] if layers else "")
    more = f" and {len(layers) - 1} more layers" if len(layers) > 2 else \
        (" and 1 more layer" if len(layers) == 2 else "")
    return f"{group.id} ({group.size} channels: {first}{more})"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _protect(groups: List[Group], reason: str) -> None:
    """Protect every channel of ``groups``, ``reason`` counting those newly protected."""
    for g in groups:
        n = int((~g.protected).sum())
        if n:
            g.reasons[reason] = g.reasons.get(reason, 0) + n
        g.protected[:] = True


def _within(layer: str, scopes: set) -> bool:
    """True when ``layer`` is one of ``scopes`` or inside one (a set lookup per name prefix)."""
    if "" in scopes or layer in scopes:
        return True
    parts = layer.split(".")
    return any(".".join(parts[:i]) in scopes for i in range(1, len(parts)))
