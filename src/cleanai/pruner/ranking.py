"""Which channels a plan takes across groups: the global ranking of normalised scores, and
the rule that no layer is emptied."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import torch

from ..core.graph import Group
from .quota import cap as quota_cap
from .quota import positions_per_channel, unit_of

if TYPE_CHECKING:  # pragma: no cover
    from .structured import StructuredPruner

__all__ = ["global_removals", "pool_removals", "ranked_counts", "spare_members", "equal_counts",
           "equal_fractions", "tie_fraction", "tied_removals", "group_score", "allocated_score"]


def global_removals(pruner: "StructuredPruner", pool: List[int],
                    keys: Dict[int, torch.Tensor], scores: Dict[int, torch.Tensor],
                    total: int) -> Dict[int, torch.Tensor]:
    """Remove ``total`` channels across the ``pool`` groups: one ranking of ``keys`` across
    the groups (each group's taken lowest first, never past its cap; with ``round_to``, in
    blocks that keep its width a multiple of it, the total then met to the nearest block)
    sets how many each group loses, and each loses its lowest-``scores`` channels."""
    counts = ranked_counts(pruner, pool, keys, total)
    return {gid: scores[gid].argsort(stable=True)[:n] for gid, n in counts.items() if n > 0}


def pool_removals(pruner: "StructuredPruner", pool: List[int], keys: Dict[int, torch.Tensor],
                  scores: Dict[int, torch.Tensor], quota: Dict[int, int],
                  spent: Dict[str, int]) -> Dict[int, torch.Tensor]:
    """The removals of the groups ranked together (``global_pruning``, an allocation): as
    many as their ``quota`` of this step add up to, less what ranked groups that may lose no
    more are past their share (``spent``, per kind), by :func:`global_removals`. With an
    allocation each kind of unit (heads, channels) is ranked apart and keeps its own total.
    Where the graph's ties still take channels back (a tied group outside the pool, equal
    fractions), the untied groups make up the difference where their caps allow."""
    by_id = {g.id: g for g in pruner.graph.groups}
    kinds = sorted({by_id[gid].kind for gid in pool}) if pruner.allocation is not None \
        else [None]
    out: Dict[int, torch.Tensor] = {}
    for kind in kinds:
        ranked = [gid for gid in pool if kind in (None, by_id[gid].kind)]
        total = max(0, sum(quota[gid] for gid in ranked) +
                    sum(v for k, v in spent.items() if kind in (None, k)))
        removals = global_removals(pruner, ranked, keys, scores, total)
        untied = [gid for gid in ranked if not (by_id[gid].equal_counts or
                                                by_id[gid].equal_fractions)]
        short = total - sum(len(i) for gid, i in tied_removals(pruner, removals, scores).items()
                            if gid in ranked)
        if short > 0 and len(untied) < len(ranked):
            taken = sum(len(removals.get(gid, ())) for gid in untied)
            removals = {gid: i for gid, i in removals.items() if gid not in untied}
            removals.update(global_removals(pruner, untied, keys, scores, taken + short))
        out.update(removals)
    return out


def ranked_counts(pruner: "StructuredPruner", pool: List[int], keys: Dict[int, torch.Tensor],
                  total: int) -> Dict[int, int]:
    """How many channels each ``pool`` group loses when ``total`` leave by one ranking of
    ``keys`` (see :func:`global_removals`). Groups tied to lose equal counts
    (``Group.equal_counts``) are ranked as one unit: its k-th step takes a channel from each,
    at the mean of their k-th keys."""
    if not pool or total <= 0:
        return {}
    by_id = {g.id: g for g in pruner.graph.groups}
    units: List[List[int]] = []
    placed: set = set()
    for gid in pool:
        if gid in placed:
            continue
        tie = [t for t in (by_id[gid].equal_counts or [gid]) if t in pool and t not in placed]
        tie = tie if gid in tie else [gid]
        placed.update(tie)
        units.append(tie)
    rows = []  # (mean key per channel of the block, unit index, block index, channels)
    for i, unit in enumerate(units):
        sorted_keys = []
        for gid in unit:
            most = quota_cap(by_id[gid], pruner.original_size[gid], pruner.max_pruning_ratio)
            k = keys[gid].sort().values[:max(0, most)]
            sorted_keys.append(k[torch.isfinite(k)])
        length = min(k.numel() for k in sorted_keys)
        k = torch.stack([k[:length] for k in sorted_keys]).mean(0)
        first = by_id[unit[0]]
        for j, (start, stop) in enumerate(_blocks(first, pruner.original_size[unit[0]], length,
                                                  pruner.round_to)):
            rows.append((float(k[start:stop].mean()), i, j, (stop - start) * len(unit)))
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    counts = {gid: 0 for gid in pool}
    closed: set = set()
    n = 0
    for _, i, j, size in rows:
        if n >= total:
            break
        if i in closed:
            continue
        if n + size > total + size // 2:  # past the total by more than half a block
            closed.add(i)  # its later blocks cannot go before this one
            continue
        for gid in units[i]:
            counts[gid] += size // len(units[i])
        n += size
    return counts


def _blocks(g: Group, size0: int, most: int, round_to: Optional[int]) -> List[Tuple[int, int]]:
    """The runs of a group's ranked channels that may leave together, at most ``most`` in all:
    single channels, or with ``round_to`` runs that leave a multiple of it (counted in
    producer positions) and at least one multiple."""
    round_to = unit_of(g, round_to)
    if round_to == 1:
        return [(i, i + 1) for i in range(most)]
    unit = round_to // math.gcd(round_to, positions_per_channel(g))
    if size0 < unit:
        return []
    out, start = [], 0
    step = g.size % unit or unit
    while start + step <= most and g.size - (start + step) >= unit:
        out.append((start, start + step))
        start, step = start + step, unit
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
    out = removals
    for tied in _ties(groups, "equal_counts"):
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


def _ties(groups: List[Group], attr: str) -> List[List[int]]:
    """Each tie among ``groups`` once: the group ids listed in their ``attr`` field."""
    known = {g.id for g in groups}
    done: set = set()
    out = []
    for g in groups:
        if getattr(g, attr) and g.id not in done:
            ids = [i for i in getattr(g, attr) if i in known]
            done.update(ids)
            out.append(ids)
    return out


def equal_fractions(groups: List[Group], removals: Dict[int, torch.Tensor],
                    score_of: Callable[[int], Optional[torch.Tensor]],
                    cap_of: Callable[[int], int]) -> Dict[int, torch.Tensor]:
    """Groups that must keep the same fraction of their ``fraction_base`` channels
    (``Group.equal_fractions``) keep the one nearest the mean of what the plan gave them
    (:func:`tie_fraction`), each losing its lowest-scored channels. ``score_of(id)``: a
    group's scores (protected channels ``inf``), None when it may not lose channels (then
    the whole tie keeps its width); ``cap_of(id)``: how many it may still lose. Returns
    ``removals`` itself when it keeps every tie."""
    by_id = {g.id: g for g in groups}
    out = removals
    for ids in _ties(groups, "equal_fractions"):
        tied = [by_id[i] for i in ids]
        planned = [(t.size - len(removals.get(t.id, ()))) / t.fraction_base for t in tied]
        scores = {t.id: score_of(t.id) for t in tied}
        if any(s is None for s in scores.values()):
            keep = {t.id: t.size for t in tied}
        else:
            keep = tie_fraction(tied, {t.id: t.fraction_base for t in tied},
                                sum(planned) / len(planned), {t.id: cap_of(t.id) for t in tied})
        for t in tied:
            n = t.size - keep[t.id]
            if len(removals.get(t.id, ())) == n:
                continue  # the plan's own choice already keeps the tie
            if out is removals:
                out = dict(removals)
            if n == 0:
                out.pop(t.id, None)
            else:
                out[t.id] = scores[t.id].argsort(stable=True)[:n]
    return out


def tie_fraction(tied: List[Group], bases: Dict[int, int], wanted: float,
                 caps: Dict[int, int], shrink: bool = False) -> Dict[int, int]:
    """Channels each of ``tied`` keeps at the common fraction of its ``bases`` width nearest
    ``wanted`` (the larger on a tie) that gives each a whole number of channels, no more than
    it has now, and removes no more than ``caps`` allows (with ``shrink``, fewer than it has
    now); their present widths when no such fraction exists."""
    least = min(tied, key=lambda t: bases[t.id])
    best: Optional[Tuple[float, Dict[int, int]]] = None
    for k in range(1, least.size + (0 if shrink else 1)):
        f = k / bases[least.id]
        keep = {}
        for t in tied:
            n = f * bases[t.id]
            if abs(n - round(n)) > 1e-9 or round(n) > t.size or t.size - round(n) > caps[t.id]:
                break
            keep[t.id] = int(round(n))
        else:
            if best is None or abs(f - wanted) <= abs(best[0] - wanted) + 1e-12:
                best = (f, keep)
    return best[1] if best is not None else {t.id: t.size for t in tied}


def tied_removals(pruner: "StructuredPruner", removals: Dict[int, torch.Tensor],
                  scores: Dict[int, torch.Tensor]) -> Dict[int, torch.Tensor]:
    """``removals`` made to keep the graph's ties: equal counts, then equal fractions
    (scoring a tied group the plan left alone, when it may lose channels)."""
    removals = equal_counts(pruner.graph.groups, removals, scores)
    by_id = {g.id: g for g in pruner.graph.groups}

    def score_of(gid: int) -> Optional[torch.Tensor]:
        g = by_id[gid]
        if gid not in scores:
            if pruner.group_ratio(g) is None or g.prunable == 0:
                return None
            scores[gid] = group_score(pruner, g)
        return scores[gid]

    return equal_fractions(pruner.graph.groups, removals, score_of, lambda gid: quota_cap(
        by_id[gid], pruner.original_size[gid], pruner.max_pruning_ratio))


def group_score(pruner: "StructuredPruner", g: Group) -> torch.Tensor:
    """The importance of ``g``'s channels (shape ``[g.size]``), checked; protected ones
    ``inf``, so that no ranking takes them."""
    s = pruner.importance(g, pruner.model).detach().float().cpu()
    if s.shape != (g.size,):
        raise ValueError(f"{type(pruner.importance).__name__} returned shape "
                         f"{tuple(s.shape)} for group {g.id} of {g.size} channels")
    return s.masked_fill(g.protected, float("inf")) if g.prunable < g.size else s


def allocated_score(pruner: "StructuredPruner", g: Group, scores: torch.Tensor
                    ) -> Optional[torch.Tensor]:
    """``pruner.allocation``'s scores of ``g`` carried onto the order of its importance
    ``scores`` (from :func:`group_score`): the channel the importance ranks k-th lowest gets the
    k-th lowest allocation score, protected channels stay ``inf``. A ranking across groups by
    these sets how many channels each group loses, and the importance which. ``None`` when
    the allocation could not score ``g`` (``nan``)."""
    a = pruner.allocation(g, pruner.model).detach().float().cpu()
    if a.shape != (g.size,):
        raise ValueError(f"{type(pruner.allocation).__name__} returned shape "
                         f"{tuple(a.shape)} for group {g.id} of {g.size} channels")
    free = torch.isfinite(scores)
    if not bool(torch.isfinite(a[free]).all()):
        return None
    out = torch.full_like(scores, float("inf"))
    out[scores.argsort(stable=True)[:int(free.sum())]] = a[free].sort().values
    return out
