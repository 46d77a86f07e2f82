"""Ops that take parts of the channel dim: splits into parts (``chunk``, ``split`` by sizes
the code or a module stores) and slices (of any tensor, or of a layer's own output, whose
parts prune with bounds checked in every pruned forward)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..slots import Slots
from .base import OpCall, ndim_dim, none, register


@register("SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0")
def _split(ctx, call: OpCall):
    x = call.ins[0]
    if x is None:
        return none(call)
    in_shape = call.in_shapes[0]
    dim = ndim_dim(int(call.saved("dim")), len(in_shape))
    if call.name() == "UnbindBackward0":
        if x.dim == dim:
            ctx.protect(x, "unbind on the channel dim")
            return none(call)
        return [x.moved(x.dim - (x.dim > dim)) for _ in call.out_shapes]
    if x.dim != dim:
        return [x for _ in call.out_shapes]
    sizes = [s[dim] for s in call.out_shapes]
    sized = ("split", call.node) in ctx.operand_shapes  # sizes given, not a number of parts
    if len(set(sizes)) != 1:
        if call.name() == "SplitWithSizesBackward0" and sized:
            # ``torch.split(self.in_proj(x), self.in_split)`` with ``in_split = [mlp, d, d, d]``:
            # each part is channels of its own (a fused projection read as an MLP and q, k, v)
            # and the stored list follows them; sizes written in the code would not
            parts = _parts(x.ids, sizes) if ctx.cut(x.ids, sizes) else \
                by_attributes(ctx, call, x.ids, sizes)
            if parts is not None:
                return [Slots(dim, p) for p in parts]
        ctx.protect(x, f"{call.name()} into unequal sizes {sizes}")
        return none(call)
    pieces = list(x.ids.split(sizes[0]))
    if len(pieces) > 1 and not sized and _distinct(ctx, x.ids):
        # ``a, b = x.chunk(2)``: each part needs only as many channels as the others (the
        # code splits whatever width comes in); where the parts' channels meet again
        # (``a * b.sigmoid()``), they are tied there, and build_groups ties them position by
        # position where a part is not a whole group
        name = ctx.producer_of(x.ids)
        if name is not None:
            ctx.cut_at(name, sizes)
        ctx.tie_counts(call.node, pieces, f"{call.name()} into {len(pieces)} equal parts")
        return [Slots(dim, p.clone()) for p in pieces]
    for piece in pieces[1:]:
        ctx.uf.union_all(pieces[0], piece)
    if len(pieces) > 1 and sized:
        ctx.fixed_splits.append((pieces[0], call.node))  # sizes written in the code
    if len(pieces) > 1:
        ctx.note(pieces[0], f"{call.name()} into {len(pieces)} equal parts: each keeps the same "
                            f"positions")
    return [Slots(dim, p) for p in pieces]


def _distinct(ctx, ids: torch.Tensor) -> bool:
    """True when no two positions of ``ids`` hold one unit (a flatten or a channel shuffle
    repeats them): only then can each part of a split be a whole group."""
    return torch.unique(ctx.uf.canonical(ids)).shape[0] == ids.shape[0]


def _parts(ids: torch.Tensor, sizes) -> list:
    bounds = [0] + torch.tensor(sizes).cumsum(0).tolist()
    return [ids[a:b].clone() for a, b in zip(bounds, bounds[1:])]


def by_attributes(ctx, call: OpCall, ids: torch.Tensor, sizes) -> Optional[list]:
    """A split of a layer's output into sizes the module running it stores as integer
    attributes (``qkv(x).split([self.key_dim, self.key_dim, self.d])``): each part becomes
    channels of its own, the parts one attribute sizes keep equal counts (across every split
    that reads it), a part the call writes without a single attribute keeps its channels
    (``[self.d, self.g * self.n]``), and pruner/attributes.py sets each attribute to its
    parts' new size. ``ids`` may be the layer's whole output or one run of it that an
    earlier split took (Mamba-2 splits its projection by ``[d, conv_dim, heads]``, then the
    convolved middle part by ``[d, g * n, g * n]``). None when ``ids`` are no layer's
    output, or no part matches an attribute, or the call names none and a part of more than
    one channel matches none (``split([k, C - k])``: its size may come from the input's
    shape). The layers' outputs concatenated (``cat([q(x), k(x), v(x)])``, through a
    depthwise conv in linear attention) split where they meet are parts of one layer each,
    and split alike."""
    name = ctx.producer_of(ids)
    parts = _parts(ids, sizes)
    run = ctx.range_of(ids) if name is None else None
    owners = [name] if name is not None else [run[0]] if run is not None else \
        [ctx.producer_of(p) for p in parts]
    if None in owners:
        return None
    found = ctx.split_attributes(call.node, sizes)
    if found is None:
        return None
    module, attrs, written = found
    if not written and any(a is None and n > 1 for a, n in zip(attrs, sizes)):
        return None  # matched by value alone: the rest may come from the input's shape
    layer = name or (run[0] if run else None)
    # the layer's whole output in parts; what lies before and after the run keeps its size
    before, after = (run[1], run[2] - run[1] - sum(sizes)) if run else (0, 0)
    whole = [(None, before)] * (before > 0) + list(zip(attrs, sizes)) + \
        [(None, after)] * (after > 0)
    if layer is not None:
        ctx.cut_at(layer, [n for _, n in whole])
    for part, attr, size in zip(parts, attrs, sizes):
        if attr is None:
            ctx.protect(part, f"a part of a split by {list(sizes)} in {module} that no "
                              f"attribute of it sizes: it keeps its size")
            ctx.fixed_parts.update(part.tolist())
        else:
            ctx.tie_counts((module, attr), [part], f"split by {module}.{attr}")
            ctx.note(part, f"split by {module}.{attr}: the parts it sizes keep equal counts "
                           f"and the attribute follows")
    if layer is not None:
        ctx.attr_splits.append((layer, module, [a for a, _ in whole], [n for _, n in whole]))
    else:
        ctx.attr_splits.extend((o, module, [a], [n]) for o, a, n in zip(owners, attrs, sizes))
    return parts


@register("SliceBackward0")
def _slice(ctx, call: OpCall):
    x = call.ins[0]
    if x is None:
        return [None]
    in_shape = call.in_shapes[0]
    dim = ndim_dim(int(call.saved("dim")), len(in_shape))
    if x.dim != dim:
        return [x]
    if call.out_shapes[0][dim] == in_shape[dim]:
        return [x]
    part = _layer_part(ctx, call, x, in_shape[dim])
    if part is not None:
        return [part]
    if 2 * call.out_shapes[0][dim] == in_shape[dim] and call.saved("step", 1) == 1:
        ctx.protect(x, "slice of the channel dim into halves (as rotary embeddings' "
                       "rotate_half does: it pairs dim d with d + n/2, each pair at a fixed "
                       "frequency)")
        return [None]
    # every channel stays: the bounds may be computed from the size (``x[:, C // 4:]``), and
    # any channel that went would move them. The part taken carries its ids on, so the
    # layers that read it stay connected to the rest of the graph (their own channels prune)
    ctx.protect(x, "slice of the channel dim")
    bounds = _bounds(call)
    if bounds is None:
        return [None]
    start, end, step = bounds
    return [_taken(x, torch.arange(in_shape[dim])[start:end:step], call.out_shapes[0][dim])]


def _bounds(call: OpCall) -> Optional[Tuple[int, int, int]]:
    """A slice's saved start, end and step, as Python would write them."""
    start, end, step = (call.saved(k) for k in ("start", "end", "step"))
    if not all(isinstance(v, int) for v in (start, end, step)):
        return None
    start, end = (v - 2 ** 64 if v >= 2 ** 63 else v for v in (start, end))  # saved unsigned
    return start, end, step


def _clamped(bounds: Tuple[int, int, int], size: int) -> Tuple[int, int]:
    """A slice's ``(start, end)`` within ``[0, size]``, as Python resolves them."""
    return tuple(min(max(v + size if v < 0 else v, 0), size) for v in bounds[:2])


def _sliced_at(ctx, fn, dim: int, ndim: int, size: int) -> set:
    """The ``(start, end)`` of every step-1 slice along ``dim`` (of ``ndim``) of node
    ``fn``'s output."""
    out = set()
    for r in ctx.readers.get(fn, ()):
        if r.name() != "SliceBackward0":
            continue
        call = OpCall(r, [], [], [])
        d, bounds = call.saved("dim"), _bounds(call)
        if d is not None and bounds is not None and bounds[2] == 1 and ndim_dim(d, ndim) == dim:
            out.add(_clamped(bounds, size))
    return out


def _layer_part(ctx, call: OpCall, x: Slots, size: int) -> Optional[Slots]:
    """A slice of a layer's whole output, taken from the output itself (Phi-3's
    ``qkv[..., :q_pos]``, ``qkv[..., q_pos:q_pos + kv_size]``, with bounds the attention
    computes from its head counts): the part becomes channels of its own, cut from the rest
    of the layer's output, and its bounds must follow the counts each part keeps. Nothing
    here can see whether they will (``x[:, :16]`` written in the code would not), so every
    pruned forward checks them (pruner/slices.py): a slice whose bounds stayed fails it, and
    the groups whose removal moved them are protected. None for any other slice."""
    bounds = _bounds(call)
    fn, nr = call.node.next_functions[0]
    name = ctx.output_of.get((fn, nr))
    out = ctx.module_out.get(name) if name is not None else None
    if bounds is None or bounds[2] != 1 or out is None or len(out) != len(x.ids) or not (
            out is x.ids or torch.equal(ctx.uf.canonical(out), ctx.uf.canonical(x.ids))):
        return None  # (the layer's whole output, its ids as the layer made them)
    start, end = _clamped(bounds, size)
    if end <= start:
        return None
    halves = {(0, size // 2), (size // 2, size)}
    if size % 2 == 0 and (start, end) in halves and \
            halves <= _sliced_at(ctx, fn, x.dim, len(call.in_shapes[0]), size):
        return None  # rotate_half on the output itself: each pair at a fixed frequency
    ctx.cut_bounds.setdefault(name, {0}).update((start, end, size))
    ctx.slices.append((name, x.dim, start, end))
    part = x.ids[start:end].clone()
    ctx.note(part, f"slice [{start}:{end}] of {name}'s output: channels of their own; each "
                   f"pruned forward checks that the slice's bounds follow the kept counts")
    return Slots(x.dim, part)


def _taken(x: Slots, positions: torch.Tensor, size: int) -> Optional[Slots]:
    """The ids of the positions an op at fixed positions of the channel dim took (all of
    them protected by the caller), or None where the count does not match."""
    if positions.numel() != size:
        return None
    return Slots(x.dim, x.ids[positions])
