"""Which channels a plan takes across groups: the global ranking of normalised scores, and
the rule that no layer is emptied."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, List

import torch

from ..core.graph import Group
from .quota import cap as quota_cap
from .quota import rounded

if TYPE_CHECKING:  # pragma: no cover
    from .structured import StructuredPruner

__all__ = ["global_removals", "spare_members", "equal_counts"]


def global_removals(pruner: "StructuredPruner", pool: List[int],
                    scores: Dict[int, torch.Tensor],
                    quota: Dict[int, int]) -> Dict[int, torch.Tensor]:
    """Remove the lowest scores across ``pool`` groups, as many as their quotas add up to,
    with no group going past its own cap."""
    if not pool:
        return {}
    total = sum(quota[g] for g in pool)
    by_id = {g.id: g for g in pruner.graph.groups}
    cap = {gid: quota_cap(by_id[gid], pruner.original_size[gid], pruner.max_pruning_ratio)
           for gid in pool}
    flat = torch.cat([scores[g] for g in pool])
    owner = torch.cat([torch.full((len(scores[g]),), i) for i, g in enumerate(pool)])
    local = torch.cat([torch.arange(len(scores[g])) for g in pool])
    taken: Dict[int, List[int]] = {g: [] for g in pool}
    n = 0
    for i in flat.argsort(stable=True).tolist():
        if n >= total or not math.isfinite(float(flat[i])):
            break
        gid = pool[int(owner[i])]
        if len(taken[gid]) < cap[gid]:
            taken[gid].append(int(local[i]))
            n += 1
    out = {}
    for gid, idx in taken.items():
        if pruner.round_to:  # the global ranking sets how many leave; round_to trims that
            g = by_id[gid]
            already = pruner.original_size[gid] - g.size
            n = min(rounded(g, already + len(idx), pruner.original_size[gid],
                            pruner.max_pruning_ratio, pruner.round_to) - already, cap[gid])
            idx = scores[gid].argsort(stable=True)[:max(0, n)].tolist()
        if idx:
            out[gid] = torch.tensor(idx, dtype=torch.long)
    return out


def spare_members(group: Group, idx: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Never empty a layer: where ``idx`` takes every channel a member holds in this group (a
    producer tied to part of a group), its best-scored channel stays."""
    # a member that holds every channel of the group keeps some: a plan leaves one at least
    members = [m for m in group.members if not m.identity and m.channels.shape[0]]
    if not members:
        return idx  # (PruningPlan sorts it)
    removed = torch.zeros(group.size, dtype=torch.bool)
    removed[idx] = True
    # one pass finds the members that lose every position; sparing a channel only helps the
    # others, so each candidate is checked again, in member order, before it is spared
    counts = torch.tensor([m.channels.shape[0] for m in members], dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(members)), counts)
    lost = torch.zeros(len(members), dtype=torch.long).index_add_(
        0, owner, removed.index_select(0, torch.cat([m.channels for m in members])).long())
    for i in torch.nonzero(lost == counts).flatten().tolist():
        m = members[i]
        if bool(removed.index_select(0, m.channels).all()):
            held = torch.unique(m.channels)
            removed[held[scores[held].argmax()]] = False
    return torch.nonzero(removed).flatten()


def equal_counts(groups: List[Group], removals: Dict[int, torch.Tensor],
                 scores: Dict[int, torch.Tensor]) -> Dict[int, torch.Tensor]:
    """Groups that must lose as many channels as each other (``Group.equal_counts``: the
    parts of a chunk, the parts one attribute sizes) lose the fewest any of them was to
    lose, each its lowest-scored channels among those planned. Returns ``removals`` itself
    when it keeps every tie."""
    by_id = {g.id: g for g in groups}
    done = set()
    out = removals
    for g in groups:
        if not g.equal_counts or g.id in done:
            continue
        tied = [gid for gid in g.equal_counts if gid in by_id]
        done.update(tied)
        n = min(len(removals.get(gid, ())) for gid in tied)
        for gid in tied:
            idx = removals.get(gid)
            if idx is None or len(idx) == n:
                continue
            if out is removals:
                out = dict(removals)
            s = scores.get(gid)
            if n == 0:
                out.pop(gid, None)
            elif s is None:
                out[gid] = idx[:n]
            else:
                out[gid] = idx[s.index_select(0, idx).argsort(stable=True)[:n]]
    return out
