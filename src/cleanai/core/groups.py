"""The groups of a traced model: channels that must leave together, with every layer dim and
parameter that holds them (:class:`Member`), built from a trace's channel ids in a few
vectorised passes."""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .slots import UnionFind
from .trace_result import TraceResult


@dataclasses.dataclass(eq=False)
class Member:
    """One place a group's channels live: a layer's input or output channels, or a parameter dim.

    ``positions[j]`` is a position along that dim and ``channels[j]`` the group channel stored
    there. A flatten makes several positions carry one channel; a concat makes a layer's input a
    member of several groups, each owning a range of its positions.
    """

    name: str
    kind: str  # "out", "in", "same" (output channel i is input channel i), "param", "internal"
    dim: int  # the parameter's dim for "param", the internal dim's index for "internal"; else -1
    length: int  # size of the member's whole channel dim
    positions: torch.Tensor
    channels: torch.Tensor
    #: True when position j holds channel j for every channel of the group (the whole dim, in
    #: order): a shortcut for the common case, kept true by pruning; False is always safe
    identity: bool = False

    def describe(self) -> str:
        """One line for ``print(group)``: where the channels live and how many positions."""
        n = len(self.positions)
        span = "all" if n == self.length else f"{n}/{self.length} positions"
        per = n // max(1, len(torch.unique(self.channels)))
        rep = f", {per} per channel" if per > 1 else ""
        where = (f"{self.name}[dim {self.dim}]" if self.kind == "param" else
                 f"{self.name}.internal[{self.dim}]" if self.kind == "internal" else
                 f"{self.name}.{self.kind}")
        return f"{where} ({span}{rep})"


@dataclasses.dataclass(eq=False)
class Group:
    """A set of coupled channels: removing channel j removes it from every member at once.

    ``size`` is the number of channels; ``protected[j]`` is True for channels that must stay
    (model outputs, ops CleanAI cannot follow, inputs without channel ids), with a reason in
    ``reasons``. ``constraints`` describes ties imposed by grouped layers and reshapes.

    ``kind`` says what a channel is: ``"heads"`` (a whole attention head), ``"head_dims"``
    (one dim inside every head), ``"hidden"`` (a width shared by several layers through
    residual additions: a transformer's hidden size) or ``"channels"`` (one layer's outputs:
    MLP intermediate neurons, conv channels).
    """

    id: int
    size: int
    members: List[Member]
    protected: torch.Tensor
    reasons: Dict[str, int]
    constraints: List[str]
    kind: str = "channels"
    #: modules whose code splits these channels into parts of sizes it wrote down
    #: (``x.split(64)``): pruning works only if that code reads a width CleanAI updates
    fixed_splits: List[str] = dataclasses.field(default_factory=list)
    #: ``outputs[j]`` is True for a channel of a model output that nothing else protects:
    #: the channels :func:`release_outputs` frees (``StructuredPruner(prune_outputs=...)``);
    #: None when the group holds none
    outputs: Optional[torch.Tensor] = None
    #: the ids of the groups (this one among them) that must lose as many channels as each
    #: other: the parts of ``x.chunk(2)`` read by separate layers, or the parts a module's
    #: attribute sizes (``split([self.key_dim, self.key_dim, self.d])`` in every head);
    #: empty when the group is free
    equal_counts: List[int] = dataclasses.field(default_factory=list)
    #: the ids of the groups (this one among them) that must keep the same fraction of
    #: ``fraction_base`` channels, their sizes when the tie was found: an attention block
    #: that derives its head size from its input's width (``C // self.num_heads``) runs only
    #: while its heads and that width shrink together; empty when the group is free
    equal_fractions: List[int] = dataclasses.field(default_factory=list)
    fraction_base: int = 0
    #: kept counts stay multiples of this (a member's kernel needs aligned widths: the
    #: grouped matmul of mixture-of-experts layers); combined with ``round_to``
    multiple: int = 1

    @property
    def prunable(self) -> int:
        """How many channels may be removed (all but protected ones)."""
        return self.size - int(self.protected.sum())

    def __repr__(self) -> str:
        lines = [f"Group {self.id}: {self.size} channels"
                 + (f" ({self.kind})" if self.kind != "channels" else "")
                 + (f", {int(self.protected.sum())} protected" if bool(self.protected.any()) else "")]
        for m in self.members:
            lines.append("  " + m.describe())
        for c in self.constraints:
            lines.append("  tie: " + c)
        others = [str(i) for i in self.equal_fractions if i != self.id]
        if others:
            lines.append(f"  tie: keeps the same fraction of its {self.fraction_base} channels "
                         f"as group{'s' if len(others) > 1 else ''} {', '.join(others)}")
        for reason, n in self.reasons.items():
            lines.append(f"  protected {n}: {reason}")
        freed = self.released_outputs
        if freed:
            lines.append(f"  output {freed}: model output, prunable on request")
        return "\n".join(lines)

    @property
    def released_outputs(self) -> int:
        """How many of the group's channels are model outputs that may be pruned
        (:func:`release_outputs`)."""
        if self.outputs is None:
            return 0
        return int((self.outputs & ~self.protected).sum())



def build_groups(r: TraceResult) -> List[Group]:
    """Units linked by a shared producer form a group; every layer dim and parameter that holds
    a group's units becomes a member, with vectorised position -> channel maps.

    Parts that must keep equal counts (``r.count_ties``) stay free where each part is a
    whole group (its positions hold every channel of one group once): those groups must
    lose as many channels each (``Group.equal_counts``). A part that shares a group with
    other channels is tied to the other parts position by position instead, and the groups
    are assigned again."""
    while True:
        roots, group_of, channel_of, groups = _assign(r)
        ties, loose = [], []
        for tie in r.count_ties:
            held = _whole_groups(tie[0], roots, group_of, channel_of, groups)
            if held is None:
                loose.append(tie)
            else:
                ties.append((held, tie[1]))
        if not loose:
            break
        # a part shares its channels with others: tied position by position, the note where
        # the walk met the split (``print(graph)`` lists ties in the order they were made)
        for parts, what, at in sorted(loose, key=lambda t: -t[2]):
            for p in parts[1:]:
                r.uf.union_all(parts[0], p)
            r.notes.insert(at, (int(parts[0][0]), f"{what}: each keeps the same positions"))
        gone = {id(t[0]) for t in loose}
        moved = sorted(t[2] for t in loose)  # notes inserted before a later tie's place
        r.count_ties = [(p, w, at + sum(m <= at for m in moved)) for p, w, at in r.count_ties
                        if id(p) not in gone]
    _finish(r, roots, group_of, channel_of, groups)
    _equal_counts(groups, ties)
    return groups


def _whole_groups(parts: List[torch.Tensor], roots: torch.Tensor, group_of: torch.Tensor,
                  channel_of: torch.Tensor, groups: List[Group]) -> Optional[List[int]]:
    """The group of each part when every part holds all channels of one group, each once."""
    held = []
    for p in parts:
        units = roots.index_select(0, p.reshape(-1))
        gi = group_of.index_select(0, units)
        if not len(gi) or bool((gi < 0).any()) or bool((gi != gi[0]).any()):
            return None
        g = int(gi[0])
        chans = channel_of.index_select(0, units)
        if len(chans) != groups[g].size or torch.unique(chans).shape[0] != len(chans):
            return None
        held.append(g)
    return held


def _equal_counts(groups: List[Group], ties: List[Tuple[List[int], str]]) -> None:
    """Join the ties that share a group and give each group of a joint tie its members."""
    link = UnionFind()
    link.new(len(groups))
    for held, _ in ties:
        for g in held[1:]:
            link.union(held[0], g)
    sets: Dict[int, List[int]] = {}
    for gi in range(len(groups)):
        sets.setdefault(link.find(gi), []).append(gi)
    whats: Dict[int, List[str]] = {}
    for held, what in ties:
        whats.setdefault(link.find(held[0]), []).append(what)
    for root, members in sets.items():
        if len(members) < 2:
            continue
        why = ", ".join(dict.fromkeys(whats.get(root, [])))
        for gi in members:
            g = groups[gi]
            g.equal_counts = list(members)
            others = [m for m in members if m != gi]
            shown = ", ".join(map(str, others[:6])) + (" ..." if len(others) > 6 else "")
            g.constraints.append(f"loses as many channels as group{'s' if len(others) > 1 else ''}"
                                 f" {shown} ({why})")


def _assign(r: TraceResult):
    """Each unit's group and channel in it, and the (still empty) groups."""
    roots = r.uf.roots()
    n_units = len(roots)
    # each producer's fresh ids; the parts of one cut by a split with sizes (r.cuts) apart
    made = [p for name in r.producers for p in r.module_out[name].split(r.cuts.get(name) or
                                                                       len(r.module_out[name]))]
    made += [ids for dims in r.internal.values() for ids in dims if ids is not None]
    made += list(r.param_made.values())

    # producers that share a unit share a group; channels keep their first-appearance order
    group_of = torch.full((n_units,), -1, dtype=torch.long)  # unit id -> group
    channel_of = torch.full((n_units,), -1, dtype=torch.long)  # unit id -> channel in group
    groups: List[Group] = []
    if made:
        seen = roots.index_select(0, torch.cat(made))
        by_producer = torch.repeat_interleave(torch.arange(len(made)),
                                              torch.tensor([len(ids) for ids in made]))
        where = torch.arange(len(seen))
        first = torch.full((n_units,), len(seen), dtype=torch.long)
        first.scatter_reduce_(0, seen, where, reduce="amin")
        firsts = first.index_select(0, seen)  # where each entry's unit first appeared
        again = firsts != where
        link = UnionFind()
        link.new(len(made))
        for a, b in set(zip(by_producer[firsts[again]].tolist(), by_producer[again].tolist())):
            link.union(a, b)  # a unit met again: its producers share a group
        new = torch.nonzero(~again).flatten()
        units = seen.index_select(0, new)  # every unit once, in order of first appearance
        # each producer's new units are one block of ``units``; a group takes its producers'
        # blocks in order, and groups are numbered in the order their first block appears
        counts = torch.bincount(by_producer.index_select(0, new), minlength=len(made)).tolist()
        rank: Dict[int, int] = {}
        sizes: List[int] = []
        block_group, block_shift, block_len, start = [], [], [], 0
        for pi, n in enumerate(counts):
            if n:
                gi = rank.setdefault(link.find(pi), len(rank))
                if gi == len(sizes):
                    sizes.append(0)
                block_group.append(gi)
                block_shift.append(sizes[gi] - start)  # channel = position in units + shift
                block_len.append(n)
                sizes[gi] += n
                start += n
        blocks = torch.tensor(block_len, dtype=torch.long)
        group_of.index_copy_(0, units, torch.repeat_interleave(
            torch.tensor(block_group, dtype=torch.long), blocks))
        channel_of.index_copy_(0, units, torch.arange(len(units)) + torch.repeat_interleave(
            torch.tensor(block_shift, dtype=torch.long), blocks))
        for gi, n in enumerate(sizes):
            groups.append(Group(gi, n, [], torch.zeros(n, dtype=torch.bool), {}, []))
    return roots, group_of, channel_of, groups


def _finish(r: TraceResult, roots: torch.Tensor, group_of: torch.Tensor,
            channel_of: torch.Tensor, groups: List[Group]) -> None:
    """Members, protection, kinds and notes of the assigned groups."""
    entries: List[Tuple[str, str, int, torch.Tensor]] = []
    for name in r.modules:
        out, inp = r.module_out.get(name), r.module_in.get(name)
        if out is not None and out is inp:
            entries.append((name, "same", -1, out))
            continue
        if out is not None:
            entries.append((name, "out", -1, out))
        if inp is not None:
            entries.append((name, "in", -1, inp))
    for name, slots in r.params.items():
        entries.append((name, "param", slots.dim, slots.ids))
    for (name, dim), ids in r.param_dims.items():
        entries.append((name, "param", dim, ids))
    for name, dims in r.internal.items():
        for index, ids in enumerate(dims):
            if ids is not None:
                entries.append((name, "internal", index, ids))
    _add_members(groups, entries, roots, group_of, channel_of)

    for ids, where in r.fixed_splits:
        gi = int(group_of[roots[ids[0]]])
        if gi >= 0 and where not in groups[gi].fixed_splits:
            groups[gi].fixed_splits.append(where)
    _mark_protected(groups, r, roots, group_of, channel_of)
    summed = {int(group_of[roots[i]]) for i in r.added}
    gated = {int(group_of[roots[i]]) for i in r.multiplied} - summed
    for g in groups:
        # several producers added together and read by several layers: a residual stream
        # (two producers read by one layer are a gate, e.g. a gated MLP's up and gate; joined
        # by products alone, as Mamba's inner width, they are no stream either)
        # (a bare parameter's dim counts as a layer's output where a product makes channels
        # of it, as an input where a product contracts it: ``x @ W``)
        role = [m.kind if m.kind != "param" else
                "out" if f"{m.name}[{m.dim}]" in r.param_made else
                "in" if f"{m.name}[{m.dim}]" in r.param_read else "param" for m in g.members]
        if role.count("out") > 1 and role.count("in") > 1 and g.id not in gated:
            g.kind = "hidden"
    for i, kind in r.kinds:
        gi = int(group_of[roots[i]])
        if gi >= 0:
            groups[gi].kind = kind
    _align_head_dims(groups)
    for i, text in r.notes:
        gi = int(group_of[roots[i]])
        if gi >= 0 and text not in groups[gi].constraints:
            groups[gi].constraints.append(text)


def _mark_protected(groups: List[Group], r: TraceResult, roots: torch.Tensor,
                    group_of: torch.Tensor, channel_of: torch.Tensor) -> None:
    """Protect the channels of every unit the trace protected and of model outputs, counting
    reasons per group (in order of first appearance). A unit keeps its first reason, and
    "model output" overrides any."""
    texts: Dict[str, int] = {"model output": 0}
    units, codes = [], []
    if r.protected:
        units.append(roots.index_select(0, torch.tensor(list(r.protected), dtype=torch.long)))
        codes.append(torch.tensor([texts.setdefault(why, len(texts))
                                   for why in r.protected.values()], dtype=torch.long))
    for ids in r.output_ids:
        units.append(roots.index_select(0, ids.reshape(-1)))
        codes.append(torch.zeros(units[-1].shape[0], dtype=torch.long))
    if not units:
        return
    units, codes = torch.cat(units), torch.cat(codes)
    n = units.shape[0]
    distinct, inverse = torch.unique(units, return_inverse=True)
    where = torch.arange(n)
    appear = torch.full((distinct.shape[0],), n, dtype=torch.long)
    appear.scatter_reduce_(0, inverse, where, reduce="amin")  # the unit's first entry
    # the winning entry: the first output entry if any, else the first entry
    rank = torch.where(codes == 0, where - n, where)
    win = torch.full((distinct.shape[0],), n, dtype=torch.long)
    win.scatter_reduce_(0, inverse, rank, reduce="amin")
    win = torch.where(win < 0, win + n, win)
    codes = codes.index_select(0, win)
    gis = group_of.index_select(0, distinct)
    chans = channel_of.index_select(0, distinct)
    order = torch.argsort(gis * (n + 1) + appear)  # by group, then first appearance
    keep = order[gis.index_select(0, order) >= 0]
    gis, codes, chans = gis[keep], codes[keep], chans[keep]
    names = list(texts)
    hit, per = torch.unique_consecutive(gis, return_counts=True)
    per = per.tolist()
    for gi, c, k in zip(hit.tolist(), chans.split(per), codes.split(per)):
        g = groups[gi]
        g.protected[c] = True
        counts = torch.bincount(k, minlength=len(names)).tolist()
        for code in dict.fromkeys(k.tolist()):
            g.reasons[names[code]] = g.reasons.get(names[code], 0) + counts[code]
    # the output channels nothing else protects: what prune_outputs may free
    if r.output_ids:
        outs = torch.unique(roots.index_select(0, torch.cat([i.reshape(-1) for i in r.output_ids])))
        if r.protected:
            other = roots.index_select(0, torch.tensor(list(r.protected), dtype=torch.long))
            outs = outs[~torch.isin(outs, other)]
        gis, chans = group_of.index_select(0, outs), channel_of.index_select(0, outs)
        inside = gis >= 0
        gis, chans = gis[inside], chans[inside]
        for gi in torch.unique(gis).tolist():
            g = groups[gi]
            g.outputs = torch.zeros(g.size, dtype=torch.bool)
            g.outputs[chans[gis == gi]] = True


def _add_members(groups: List[Group], entries: List[Tuple[str, str, int, torch.Tensor]],
                 roots: torch.Tensor, group_of: torch.Tensor, channel_of: torch.Tensor) -> None:
    """Make every entry ``(name, kind, dim, ids)`` a member of each group its positions fall
    in: one pass over the concatenated ids (a DenseNet has over a thousand members), the
    members of an entry in ascending group order, positions ascending within each."""
    lengths = [e[3].shape[0] for e in entries]
    if not sum(lengths):
        return
    units = roots.index_select(0, torch.cat([e[3] for e in entries]))
    counts = torch.tensor(lengths, dtype=torch.long)
    pos = torch.arange(units.shape[0]) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts,
                                                                  counts)
    # key: entry * (groups + 1) + group + 1 (0 for positions in no group)
    key = torch.repeat_interleave(torch.arange(len(entries)) * (len(groups) + 1) + 1, counts)
    key += group_of.index_select(0, units)
    keys, sizes = torch.unique_consecutive(key, return_counts=True)
    if keys.shape[0] > 1 and not bool((keys[1:] > keys[:-1]).all()):
        # an entry returns to an earlier group (``cat([b, a, b])``): sort by (entry, group),
        # stable, so positions stay ascending inside a member; most models skip this
        order = torch.argsort(key, stable=True)
        keys, sizes = torch.unique_consecutive(key.index_select(0, order), return_counts=True)
        units, pos = units.index_select(0, order), pos.index_select(0, order)
    chans = channel_of.index_select(0, units)
    # members where some position j does not hold channel j (see Member.identity)
    mixed = torch.zeros(keys.shape[0], dtype=torch.bool)
    mixed[torch.searchsorted(torch.cumsum(sizes, 0), torch.nonzero(chans != pos).flatten(),
                             right=True)] = True
    sizes = sizes.tolist()
    for k, p, c, n, odd in zip(keys.tolist(), pos.split(sizes), chans.split(sizes), sizes,
                               mixed.tolist()):
        ei, gi = divmod(k, len(groups) + 1)
        if gi:  # 0: positions in no group
            name, kind, dim, _ = entries[ei]
            g = groups[gi - 1]
            same = not odd and n == lengths[ei] == g.size
            g.members.append(Member(name, kind, dim, lengths[ei], p, c, same))


def _align_head_dims(groups: List[Group]) -> None:
    """Dims inside heads: attention code keeps one ``head_dim`` for queries/keys and values,
    so when one head-dim group of an attention block cannot lose dims (rotary embeddings),
    the others of that block keep theirs too."""
    by_scope: Dict[str, List[Group]] = {}
    for g in groups:
        if g.kind == "head_dims":
            scope = min((m.name for m in g.members if m.kind == "out"), default="")
            by_scope.setdefault(scope.rpartition(".")[0], []).append(g)
    for block in by_scope.values():
        pinned = [g for g in block if bool(g.protected.all())]
        if not pinned:
            continue
        why = f"the head_dim it shares is pinned ({next(iter(pinned[0].reasons), 'protected')})"
        for g in block:
            if not bool(g.protected.all()):
                g.reasons[why] = int((~g.protected).sum())
                g.protected[:] = True
                g.outputs = None  # pinned by its block, model output or not


def release_outputs(groups: List[Group], chosen: Callable[[Group], bool]) -> List[Group]:
    """Let the model-output channels of the ``chosen`` groups be pruned: the explicit opt-in
    of ``StructuredPruner(prune_outputs=...)`` for a backbone whose head will be retrained or
    replaced. Channels protected for any other reason stay protected. Returns the groups
    freed."""
    freed = []
    for g in groups:
        if g.outputs is None or not bool((g.outputs & g.protected).any()) or not chosen(g):
            continue
        n = int((g.outputs & g.protected).sum())
        g.protected = g.protected & ~g.outputs
        left = g.reasons.get("model output", 0) - n
        if left > 0:
            g.reasons["model output"] = left
        else:
            g.reasons.pop("model output", None)
        freed.append(g)
    return freed

