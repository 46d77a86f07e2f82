"""Which positions each layer dim keeps once a plan's channels are gone, and the graph's
groups renumbered to match, so that a pruned model needs no new trace."""
from __future__ import annotations

import array
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch

from ..core.graph import DependencyGraph, Group

Key = Tuple[str, str, int]  # (layer or parameter name, "in" | "out" | "param", dim)


def _longs(values: List[int]) -> torch.Tensor:
    """``torch.tensor(values, dtype=torch.long)``, read from a packed array: several times
    faster for the thousands of per-member counts of a large graph."""
    if not values:
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(array.array("q", values), dtype=torch.long)


class _Kept(NamedTuple):
    """The groups that lose channels (in graph order), each with the channels it keeps
    (ascending), and the removed flags over those groups' concatenated channels."""

    groups: List[Group]
    kept: List[torch.Tensor]
    gone: torch.Tensor
    starts: List[int]  # each group's offset in ``gone``


def _kept_channels(graph: DependencyGraph, removals: Dict[int, torch.Tensor]) -> _Kept:
    """What ``removals`` leave of each group, all groups flagged at once. Indices out of range
    are read group by group, as indexing reads them (negative from the end, else an error)."""
    groups: List[Group] = []
    idxs: List[torch.Tensor] = []
    starts: List[int] = []
    total = 0
    for g in graph.groups:
        idx = removals.get(g.id)
        if idx is not None and idx.numel():
            groups.append(g)
            idxs.append(idx)
            starts.append(total)
            total += g.size
    if not groups:
        return _Kept([], [], torch.zeros(0, dtype=torch.bool), [])
    offsets = _longs(starts)
    removed = _longs([idx.shape[0] for idx in idxs])
    flat = torch.cat(idxs)
    limit = torch.repeat_interleave(_longs([g.size for g in groups]), removed)
    if bool(((flat < 0) | (flat >= limit)).any()):
        parts = []
        for g, idx in zip(groups, idxs):
            part = torch.zeros(g.size, dtype=torch.bool)
            part[idx] = True
            parts.append(part)
        gone = torch.cat(parts)
    else:
        gone = torch.zeros(total, dtype=torch.bool)
        gone[flat + torch.repeat_interleave(offsets, removed)] = True
    left = ~gone
    bounds = _longs(starts + [total])
    counts = torch.diff(torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(left, 0)])
                        .index_select(0, bounds)).tolist()
    kept = torch.nonzero(left).flatten() - torch.repeat_interleave(offsets, _longs(counts))
    return _Kept(groups, list(kept.split(counts)), gone, starts)


def layer_keeps(graph: DependencyGraph, removals: Dict[int, torch.Tensor],
                kept: Optional[_Kept] = None) -> Dict[Key, torch.Tensor]:
    """Indices each layer dim keeps once ``removals`` (group id -> channels) are gone.

    A layer dim that one group holds whole, position j for channel j (``Member.identity``),
    keeps that group's kept channels; the others are done in one pass over concatenated
    tensors, every member's positions flagged from its group's removed channels. ``kept``:
    ``_kept_channels(graph, removals)``, when the caller has it.
    """
    if kept is None:
        kept = _kept_channels(graph, removals)
    holders: Dict[Key, List[Tuple[Any, int]]] = {}  # layer dim -> (member, group index)
    for gi, g in enumerate(kept.groups):
        for m in g.members:
            for kind in (("in", "out") if m.kind == "same" else (m.kind,)):
                key = (m.name, kind, m.dim)
                h = holders.get(key)
                if h is None:
                    holders[key] = [(m, gi)]
                else:
                    h.append((m, gi))
    out: Dict[Key, Any] = {}
    mixed: Dict[Key, int] = {}  # layer dims held otherwise, in order: index among them
    same: Dict[Key, Key] = {}  # a layer's output dim held just like its input dim
    for key, h in holders.items():
        m, gi = h[0]
        if len(h) == 1 and m.identity and m.length == kept.groups[gi].size:
            out[key] = kept.kept[gi]  # shared by the dims of one group: read-only indices
            continue
        out[key] = None
        name, kind, dim = key
        if kind == "out" and holders.get((name, "in", dim)) == h:
            same[key] = (name, "in", dim)
        else:
            mixed[key] = len(mixed)
    if mixed:
        for key, keep in zip(mixed, _mixed_keeps(kept, [holders[k] for k in mixed])):
            out[key] = keep
    for key, twin in same.items():
        out[key] = out[twin]
    return out


def _mixed_keeps(kept: _Kept, holders: List[List[Tuple[Any, int]]]) -> List[torch.Tensor]:
    """The kept positions of layer dims held by several members (or not as a whole), given
    each dim's (member, group index) pairs: one pass over concatenated tensors."""
    channels: List[torch.Tensor] = []
    positions: List[torch.Tensor] = []
    member_group: List[int] = []
    member_key: List[int] = []
    for ki, h in enumerate(holders):
        for m, gi in h:
            channels.append(m.channels)
            positions.append(m.positions)
            member_group.append(kept.starts[gi])
            member_key.append(ki)
    counts = _longs([c.shape[0] for c in channels])
    starts = torch.cumsum(_longs([0] + [h[0][0].length for h in holders]), 0)
    hit = kept.gone.index_select(0, torch.cat(channels) + torch.repeat_interleave(
        _longs(member_group), counts))
    where = torch.cat(positions) + torch.repeat_interleave(
        starts.index_select(0, _longs(member_key)), counts)
    removed = torch.zeros(int(starts[-1]), dtype=torch.int32)
    removed.index_put_((where,), hit.to(torch.int32), accumulate=True)
    left = torch.nonzero(removed == 0).flatten()  # ascending, so grouped by layer dim
    per_key = torch.diff(torch.searchsorted(left, starts)).tolist()
    local = left - torch.repeat_interleave(starts[:-1], _longs(per_key))
    return list(local.split(per_key))


def renumber(graph: DependencyGraph, removals: Dict[int, torch.Tensor],
             keeps: Dict[Key, torch.Tensor], kept: Optional[_Kept] = None) -> None:
    """Update the graph's groups to the pruned model, so it needs no new trace.

    Channel c of a group becomes its rank among the kept ones, position p of a layer dim its
    rank among that dim's kept positions. A member that holds its layer dim whole, position j
    for channel j, stays so; the others are renumbered in one pass over concatenated tensors
    (a DenseNet has over a thousand members). ``kept``: ``_kept_channels(graph, removals)``,
    when the caller has it.
    """
    if kept is None:
        kept = _kept_channels(graph, removals)
    after = {id(g): k.shape[0] for g, k in zip(kept.groups, kept.kept)}
    plain: List[Any] = []  # members that stay position j = channel j
    plain_lengths: List[int] = []  # their new lengths
    members: List[Any] = []  # the others
    member_group: List[int] = []  # offset of the member's group in the concatenated groups
    member_key: List[int] = []  # index of the member's layer dim among the kept dims
    lengths: List[int] = []  # the members' new lengths
    key_index: Dict[Key, int] = {}
    key_keeps: List[torch.Tensor] = []  # per layer dim: its kept positions
    key_lengths: List[int] = []  # per layer dim: its length before the step
    offset = 0
    for g in graph.groups:
        for m in g.members:
            key = (m.name, "out" if m.kind == "same" else m.kind, m.dim)
            keep = keeps.get(key)
            if keep is None:
                continue
            if m.identity and m.length == g.size and keep.shape[0] == after.get(id(g), g.size):
                plain.append(m)  # its dim keeps just what its group keeps: ranks 0 .. n-1
                plain_lengths.append(keep.shape[0])
                continue
            ki = key_index.get(key)
            if ki is None:
                ki = key_index[key] = len(key_keeps)
                key_keeps.append(keep)
                key_lengths.append(m.length)
            members.append(m)
            member_group.append(offset)
            member_key.append(ki)
            lengths.append(keep.shape[0])
        offset += g.size
    if members:
        _renumber_members(graph, removals, members, member_group, member_key, lengths,
                          key_keeps, key_lengths)
    if plain:
        ranks = torch.arange(sum(plain_lengths)) - torch.repeat_interleave(
            torch.cumsum(_longs([0] + plain_lengths[:-1]), 0), _longs(plain_lengths))
        positions, channels = ranks.split(plain_lengths), ranks.clone().split(plain_lengths)
        for m, p, c, n in zip(plain, positions, channels, plain_lengths):
            m.positions, m.channels, m.length = p, c, n
    if kept.groups:
        counts = list(after.values())
        protected = torch.cat([g.protected for g in kept.groups]).index_select(
            0, torch.nonzero(~kept.gone).flatten())
        for g, p, n, k in zip(kept.groups, protected.split(counts), counts, kept.kept):
            g.protected, g.size = p, n
            if g.outputs is not None:
                g.outputs = g.outputs.index_select(0, k)


def _renumber_members(graph: DependencyGraph, removals: Dict[int, torch.Tensor],
                      members: List[Any], member_group: List[int], member_key: List[int],
                      lengths: List[int], key_keeps: List[torch.Tensor],
                      key_lengths: List[int]) -> None:
    """:func:`renumber` for members given with their group's offset in the concatenated
    groups, their layer dim (an index into ``key_keeps``) and their new length."""
    sizes = [g.size for g in graph.groups]
    starts, offset, removed = [], 0, []
    for g in graph.groups:
        idx = removals.get(g.id)
        if idx is not None and idx.numel():
            starts.append(offset)
            removed.append(idx)
        offset += g.size
    # channel c of a group -> its rank among the group's kept channels (-1 once removed)
    kept_all = torch.ones(offset, dtype=torch.bool)
    if removed:
        kept_all[torch.cat(removed) + torch.repeat_interleave(
            _longs(starts), _longs([idx.shape[0] for idx in removed]))] = False
    ends = torch.cumsum(kept_all, 0)  # kept channels up to and including each one
    group_start = torch.cumsum(_longs([0] + sizes[:-1]), 0)
    kept_before = torch.cat([torch.zeros(1, dtype=torch.long), ends]).index_select(0, group_start)
    new_index = ends - 1 - torch.repeat_interleave(kept_before, _longs(sizes))
    # position p of a layer dim -> its rank among the dim's kept positions (-1 once removed)
    key_start = torch.cumsum(_longs([0] + key_lengths[:-1]), 0)
    keep_counts = _longs([k.shape[0] for k in key_keeps])
    remap_all = torch.full((sum(key_lengths),), -1, dtype=torch.long)
    owner_key = torch.repeat_interleave(torch.arange(len(key_keeps)), keep_counts)
    remap_all[torch.cat(key_keeps) + key_start.index_select(0, owner_key)] = torch.arange(
        int(keep_counts.sum())) - (torch.cumsum(keep_counts, 0) - keep_counts).index_select(
        0, owner_key)
    # (shape[0] rather than len(): Tensor.__len__ is a Python call, this runs per member)
    counts = _longs([m.channels.shape[0] for m in members])
    channels = torch.cat([m.channels for m in members]) + torch.repeat_interleave(
        _longs(member_group), counts)
    positions = torch.cat([m.positions for m in members]) + torch.repeat_interleave(
        key_start.index_select(0, _longs(member_key)), counts)
    stay = torch.nonzero(kept_all.index_select(0, channels)).flatten()
    channels = new_index.index_select(0, channels.index_select(0, stay))
    positions = remap_all.index_select(0, positions.index_select(0, stay))
    owner = torch.repeat_interleave(torch.arange(len(members)), counts).index_select(0, stay)
    per_member = torch.bincount(owner, minlength=len(members)).tolist()
    for m, p, c, n in zip(members, positions.split(per_member), channels.split(per_member),
                          lengths):
        m.positions, m.channels, m.length = p, c, n
