"""Ops that move channels around: reshapes, permutes, concat, split, slicing, indexing and
pixel shuffles."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..slots import Shape, Slots, reshape_blocks
from .base import OpCall, ndim_dim, protect_all, register
from .elementwise import broadcast
from .parts import _taken


# --- shape ops -----------------------------------------------------------------------------

@register("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "SqueezeBackward0",
           "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward3", "SqueezeBackward4",
           "UnsqueezeBackward0", "UnsqueezeBackward1")
def _reshape_op(ctx, call: OpCall):
    x = call.ins[0]
    if x is None:
        return [None]
    in_shape = call.in_shapes[0]
    if in_shape is None:
        ctx.protect(x, f"{call.name()} of unknown input shape")
        return [None]
    out = call.out_shapes[0]
    copied = _copies(ctx, call, x, in_shape, out)
    if copied is not None:
        return [copied]
    picked, single = ctx.picked_dims(call.node, len(out))
    return [reshape(ctx, call.name(), x, in_shape, out, picked, call.node, single)]


def _copies(ctx, call: OpCall, x: Slots, a: Shape, b: Shape) -> Optional[Slots]:
    """``t.repeat_interleave(r, dim)`` of a split part that keeps its size (autograd's
    unsqueeze, expand and merge): Mamba-2's B and C, ``n_groups * state`` wide, repeated
    once per head. Each copy becomes a channel of its own, so the heads that read them
    prune as long as the repeat count follows them; with several groups (``x`` on the
    repeated dim), every group keeps as many copies. With one group the fixed channels on another dim are left
    behind (they never prune). None for anything else: grouped-query attention's key/value
    heads, which prune, tie their query heads to them whole."""
    fn = call.node.next_functions[0][0] if call.node.next_functions else None
    while fn is not None and fn.name() == "CloneBackward0":
        fn = fn.next_functions[0][0]
    if fn is None or fn.name() != "ExpandBackward0" or len(b) != len(a) - 1:
        return None
    sizes = OpCall(fn, [], [], []).saved("self_sym_sizes")
    if sizes is None or len(sizes) != len(a):
        return None
    # the one merge: dims d and d + 1 of ``a`` into dim d of ``b``, d + 1 expanded from 1
    d = next((i for i in range(len(b)) if b[i] != a[i]), None)
    if d is None or d + 1 >= len(a) or int(sizes[d + 1]) != 1 or a[d + 1] < 2 or \
            tuple(b) != tuple(a[:d]) + (a[d] * a[d + 1],) + tuple(a[d + 2:]) or \
            not (x.dim == d or a[d] == 1) or \
            not len(x.ids) or not ctx.fixed_parts.issuperset(x.ids.tolist()):
        return None
    r = a[d + 1]
    sources = len(x.ids) if x.dim == d else 1
    ids = ctx.fresh(sources * r)
    if sources > 1:
        ctx.tie_counts(("copies", call.node), list(ids.reshape(-1, r)),
                       f"{call.name()}: {r} copies of each of {sources} fixed channels "
                       f"(repeat_interleave); each keeps as many")
    ctx.note(ids, f"{r} copies of each of {sources} fixed channel(s) (repeat_interleave): "
                  f"each copy prunes, every channel keeps as many copies")
    return Slots(d, ids)


def reshape(ctx, op: str, x: Slots, a: Shape, b: Shape, picked=frozenset(),
            node=None, single: bool = False) -> Optional[Slots]:
    """Follow channel ids through a reshape from shape ``a`` to shape ``b``.

    Merging dims repeats ids (flatten: channel c covers features ``[c*s, (c+1)*s)``); splitting
    the channel dim into a grid (heads x head_dim, groups x per_group) ties each position of the
    innermost dim across the outer ones, so every block loses the same positions and the sizes
    the code bakes in (num_heads, groups) stay valid.
    """
    a, b = tuple(a), tuple(b)
    for i0, i1, j0, j1 in reshape_blocks(a, b):
        if i0 <= x.dim < i1:
            break
    else:
        ctx.protect(x, f"{op} cannot be followed")
        return None
    sub_in = a[i0:i1]
    view = [1] * len(sub_in)
    view[x.dim - i0] = len(x.ids)
    grid = x.ids.reshape(view).expand(sub_in).reshape(b[j0:j1])
    varying = [d for d in range(grid.dim()) if grid.size(d) > 1 and
               not bool((grid == grid.narrow(d, 0, 1)).all())]
    if not varying:
        ctx.protect(x, f"{op} collapsed the channel dim")
        return None
    # a grouped norm's view (one group too: its size must follow all the same)
    norm = ctx.attention == "heads" and x.dim == len(a) - 1 and j1 - j0 > i1 - i0 and \
        _norm_groups(ctx, node, a[x.dim], grid.size(-1), x.ids)
    # every outer block read on its own, one position at a time (one per decoder layer):
    # positions, not heads, unless the module viewing it counts that many heads (attention
    # computed head by head)
    alone = single and bool(picked) and len(varying) > 1 and node is not None and \
        all(j0 + d in picked for d in varying[:-1]) and \
        ctx.counts_heads(node, grid.size(varying[-2])) is False
    if len(varying) > 1:
        inner = varying[-1]
        if ctx.attention == "heads" and x.dim == len(a) - 1 and not norm and not alone:
            # the heads are the innermost dim above head_dim that the readers do not pick
            # from: ``[..., heads, 3, head_dim]`` read as q, k, v by ``select`` on the 3
            outer = [d for d in varying[:-1] if j0 + d not in picked] or varying[:-1]
            varying = [_whole_heads(ctx, op, grid, outer[-1], inner)]
        else:
            moved = grid.movedim(inner, -1).reshape(-1, grid.size(inner))
            for row in moved[1:]:
                ctx.uf.union_all(moved[0], row)
            ctx.note(moved[0], f"{op} into {list(grid.shape)}: every block keeps the same "
                               f"positions of its last dim")
            if not norm and not alone:  # a norm's groups hold whatever its input's channels are
                ctx.kinds.append((int(moved[0][0]), "head_dims"))
            varying = [inner]
        grid = ctx.uf.canonical(grid)
    d = varying[0]
    ids = grid.movedim(d, 0).reshape(grid.size(d), -1)[:, 0].clone()
    return Slots(j0 + d, ids)


_REDUCTIONS = ("MeanBackward1", "SumBackward1", "VarBackward0", "StdBackward0",
               "LinalgVectorNormBackward0")


def _norm_groups(ctx, node, width: int, group: int, ids: torch.Tensor) -> bool:
    """True for a view of the channel dim (``width`` wide, channels ``ids``) into groups
    that a normalisation module's own forward reduces over, with a weight as wide as the
    channel dim, where the channels are heads already (a grouped RMSNorm written by hand
    over Mamba-2's heads: ``view(..., -1, self.group_size)``, then ``pow(2).mean(-1)``,
    the group size ``group`` one int attribute of the module): its groups are not heads,
    each keeps the same positions, the heads stay whole, and the attribute is recorded to
    follow the positions kept (pruner/attributes.py). A norm per head (a query/key norm,
    its weight ``head_dim`` wide) is not one; nor is a grouped norm over plain channels,
    whose groups go whole as heads. Asks for module locations (a second recording) the
    first time it needs them."""
    if node is None:
        return False
    near = list(ctx.readers.get(node, ()))
    near += [r2 for r in near if r.name() in ("PowBackward0", "ToCopyBackward0")
             for r2 in ctx.readers.get(r, ())]
    if not any(r.name() in _REDUCTIONS for r in near) or width not in ctx.norm_widths() or \
            not ctx.heads_in(ids):
        return False
    if not ctx.intervals:
        ctx.wants_location = True
        return False
    name, module = ctx.module_at(node)
    if module is None or "norm" not in type(module).__name__.lower() or \
            not any(p.numel() == width for p in module.parameters(recurse=False)):
        return False
    sizes = [a for a, v in vars(module).items() if type(v) is int and v == group]
    if len(sizes) != 1:
        return False  # the group size is not one stored attribute: nothing could follow
    ctx.norm_groups.append((name, sizes[0]))
    return True


def _whole_heads(ctx, op: str, grid: torch.Tensor, head: int, inner: int) -> int:
    """Heads as units: the last dim of a split feature dim (``[..., heads, head_dim]``) goes
    whole, and outer blocks (q|k|v of a fused projection) keep the same heads. Returns the
    dim that carries the head ids."""
    cells = grid.movedim((head, inner), (-2, -1))
    cells = cells.reshape(-1, cells.size(-2), cells.size(-1))  # [blocks, heads, head_dim]
    for block in cells:
        for row in block:
            ctx.uf.union_all(row[:1].expand(len(row)), row)
    for block in cells[1:]:
        ctx.uf.union_all(cells[0][:, 0], block[:, 0])
    ctx.note(cells[0][:, 0], f"{op} into {list(grid.shape)}: whole heads of "
                             f"{grid.size(inner)} positions")
    ctx.kinds.append((int(cells[0][0, 0]), "heads"))
    return head


@register("ExpandBackward0")
def _expand(ctx, call: OpCall):
    x = call.ins[0]
    if x is None:
        return [None]
    a, b = call.in_shapes[0], call.out_shapes[0]
    od = x.dim + len(b) - len(a)
    if b[od] == len(x.ids):
        return [Slots(od, x.ids)]
    ctx.protect(x, "expand of a single channel")
    return [None]


@register("ViewAsComplexBackward0", "ViewAsRealBackward0")
def _view_as_complex(ctx, call: OpCall):
    """``torch.view_as_complex(x)`` reads the last dim (of 2) as the real and imaginary
    parts of one number (rotary embeddings as complex products); ``view_as_real`` undoes it.
    Channels on the other dims keep their place; a channel dim of the 2 parts is protected."""
    x = call.ins[0]
    if x is None:
        return [None]
    if call.in_shapes[0] is None:
        ctx.protect(x, f"{call.name()} of unknown input shape")
        return [None]
    if call.name() == "ViewAsComplexBackward0" and x.dim == len(call.in_shapes[0]) - 1:
        ctx.protect(x, "view_as_complex over the channel dim")
        return [None]
    return [x]


@register("PermuteBackward0")
def _permute(ctx, call: OpCall):
    x = call.ins[0]
    if x is None:
        return [None]
    ndim = len(call.out_shapes[0])
    dims = [ndim_dim(int(d), ndim) for d in call.saved("dims")]
    return [x.moved(dims.index(x.dim))]


@register("TransposeBackward0", "TransposeBackward1", "TBackward0")
def _transpose(ctx, call: OpCall):
    x = call.ins[0]
    if x is None:
        return [None]
    ndim = len(call.out_shapes[0])
    if call.name() == "TBackward0":
        d0, d1 = 0, ndim - 1
    else:
        d0 = ndim_dim(int(call.saved("dim0")), ndim)
        d1 = ndim_dim(int(call.saved("dim1")), ndim)
    swap = {d0: d1, d1: d0}
    return [x.moved(swap.get(x.dim, x.dim))]


@register("CatBackward0")
def _cat(ctx, call: OpCall):
    out = call.out_shapes[0]
    dim = ndim_dim(int(call.saved("dim")), len(out))
    return [concat(ctx, call.name(), call.ins, call.in_shapes, out, dim)]


def concat(ctx, op: str, ins, shapes, out: Shape, dim: int,
           made_at_run_time: Optional[Sequence[bool]] = None) -> Optional[Slots]:
    """Concatenation on ``dim``: ranges of the result are the inputs' channels in order
    (``made_at_run_time``: as for :func:`broadcast`, inputs without ids that pin nothing)."""
    if all(x is None for x in ins):
        return None
    on_dim = [x is not None and x.dim == dim for x in ins]
    if not any(on_dim):
        # channels sit on another dim: the inputs are tied there, as in an element-wise op
        flat = [s if s is None else s[:dim] + (1,) + s[dim + 1:] for s in shapes]
        return broadcast(ctx, op, ins, flat, out[:dim] + (1,) + out[dim + 1:], made_at_run_time)
    if any(x is not None and not d for x, d in zip(ins, on_dim)):
        return protect_all(ctx, f"{op} mixes channel dims", ins)
    sizes = [s[dim] if s is not None else None for s in shapes]
    if sizes.count(None) > 1:
        return protect_all(ctx, op, ins)
    if None in sizes:
        sizes[sizes.index(None)] = out[dim] - sum(s for s in sizes if s is not None)
    parts = []
    for x, n in zip(ins, sizes):
        if x is not None:
            parts.append(x.ids)
        else:
            parts.append(ctx.fresh(n, f"concatenated by {op} with a tensor that has no channel ids"))
    return Slots(dim, torch.cat(parts))


@register("StackBackward0")
def _stack(ctx, call: OpCall):
    out = call.out_shapes[0]
    dim = ndim_dim(int(call.saved("dim")), len(out))
    shapes = [s if s is None else s[:dim] + (1,) + s[dim:] for s in call.in_shapes]
    ins = [x if x is None else x.moved(x.dim + (x.dim >= dim)) for x in call.ins]
    return [broadcast(ctx, call.name(), ins, shapes, out)]


@register("SelectBackward0")
def _select(ctx, call: OpCall):
    x = call.ins[0]
    if x is None:
        return [None]
    dim = ndim_dim(int(call.saved("dim")), len(call.in_shapes[0]))
    if x.dim == dim:
        ctx.protect(x, "select of one channel")
        return [None]
    return [x.moved(x.dim - (x.dim > dim))]


@register("GatherBackward0")
def _gather(ctx, call: OpCall):
    """``torch.gather(x, dim, index)``: along ``dim`` the values come from positions the index
    holds (data, often a ``topk``'s): channels there are protected. Along any other dim,
    position i reads position i, so channels pass where the output keeps their count."""
    x = call.ins[0]
    if x is None:
        return [None]
    in_shape, out = call.in_shapes[0], call.out_shapes[0]
    dim = ndim_dim(int(call.saved("dim")), len(out))
    if in_shape is None or x.dim == dim or out[x.dim] != len(x.ids):
        ctx.protect(x, "gather along the channel dim")
        return [None]
    return [x]


@register("IndexBackward0")
def _index(ctx, call: OpCall):
    """Advanced indexing on dims other than the channel dim moves the channel dim."""
    x = call.ins[0]
    if x is None:
        return [None]
    indices = list(call.saved("indices", ()) or ())
    used = [i for i, t in enumerate(indices) if t is not None]
    in_shape, out = call.in_shapes[0], call.out_shapes[0]
    if not used or x.dim in used or in_shape is None:
        ctx.protect(x, "indexing of the channel dim")  # the indices may come from the data
        index = indices[x.dim] if used == [x.dim] and in_shape is not None else None
        if index is None or index.dim() != 1 or index.is_floating_point() or \
                index.dtype == torch.bool:
            return [None]
        return [_taken(x, torch.arange(in_shape[x.dim])[index.cpu()], out[x.dim])]
    idx_nd = len(torch.broadcast_shapes(*(tuple(indices[i].shape) for i in used)))
    if used == list(range(used[0], used[-1] + 1)):
        d = x.dim if x.dim < used[0] else x.dim - len(used) + idx_nd
    else:
        d = idx_nd + sum(1 for i in range(x.dim) if i not in used)
    if d < len(out) and out[d] == len(x.ids):
        return [Slots(d, x.ids)]
    ctx.protect(x, "indexing of the channel dim")
    return [None]


@register("EmbeddingBackward0")
def _embedding(ctx, call: OpCall):
    """``F.embedding(ids, weight)``: rows picked by token ids; the weight's dim 1 becomes the
    output's last dim."""
    w = call.ins[0]
    if w is None:
        return [None]
    if w.dim == 1:
        return [Slots(len(call.out_shapes[0]) - 1, w.ids)]
    ctx.protect(w, "embedding lookup over the channel dim")
    return [None]


@register("PixelShuffleBackward0")
def _pixel_shuffle(ctx, call: OpCall):
    x = call.ins[0]
    if x is None:
        return [None]
    ndim = len(call.out_shapes[0])
    if x.dim != ndim - 3:
        ctx.protect(x, "pixel_shuffle on a spatial dim")
        return [None]
    r2 = int(call.saved("upscale_factor")) ** 2
    blocks = x.ids.reshape(-1, r2)
    for j in range(1, r2):
        ctx.uf.union_all(blocks[:, 0], blocks[:, j])
    return [Slots(x.dim, blocks[:, 0].clone())]


@register("PixelUnshuffleBackward0")
def _pixel_unshuffle(ctx, call: OpCall):
    x = call.ins[0]
    if x is None:
        return [None]
    ndim = len(call.out_shapes[0])
    if x.dim != ndim - 3:
        ctx.protect(x, "pixel_unshuffle on a spatial dim")
        return [None]
    r2 = int(call.saved("downscale_factor")) ** 2
    return [Slots(x.dim, x.ids.repeat_interleave(r2))]


@register("UnfoldBackward0")
def _tensor_unfold(ctx, call: OpCall):
    """``x.unfold(dim, size, step)``: windows along ``dim`` on a new last dim; other dims keep
    their place, so channels pass unless ``dim`` is theirs."""
    x = call.ins[0]
    if x is None:
        return [None]
    in_shape = call.in_shapes[0]
    if in_shape is None or ndim_dim(int(call.saved("dimension")), len(in_shape)) == x.dim:
        ctx.protect(x, "unfold of the channel dim into windows")
        return [None]
    return [x]


@register("Im2ColBackward0")
def _im2col(ctx, call: OpCall):
    """``F.unfold(x, k)``: ``[N, C, H, W] -> [N, C * kh * kw, L]``, each channel's window
    values together (channel-major), so channel c becomes ``kh * kw`` consecutive features."""
    x = call.ins[0]
    if x is None:
        return [None]
    in_shape, out = call.in_shapes[0], call.out_shapes[0]
    if in_shape is None or x.dim != len(in_shape) - 3:
        ctx.protect(x, "F.unfold over the channel dim")
        return [None]
    kh, kw = (int(k) for k in call.saved("kernel_size"))
    return [Slots(len(out) - 2, x.ids.repeat_interleave(kh * kw))]


@register("IndexPutBackward0")
def _index_put(ctx, call: OpCall):
    """``out[idx] = values`` with the indices on leading dims before the channels
    (torchvision's MultiScaleRoIAlign gathers each level's boxes into one tensor): the
    channels of ``out`` and of ``values`` are the same."""
    base, values = (list(call.ins) + [None, None])[:2]
    if base is None and values is None:
        return [None]
    out = call.out_shapes[0]
    indices = list(call.saved("indices", ()) or ())
    used = [i for i, t in enumerate(indices) if t is not None]
    v_shape = call.in_shapes[1] if len(call.in_shapes) > 1 else None
    c = None
    if used == list(range(len(used))) and v_shape is not None:
        idx_nd = len(torch.broadcast_shapes(*(tuple(indices[i].shape) for i in used)))
        if len(v_shape) == idx_nd + len(out) - len(used):
            c = (values.dim - idx_nd + len(used)) if values is not None else base.dim
    if c is None or c < len(used) or values is None or (base is not None and base.dim != c):
        protect_all(ctx, "index_put that writes into the channel dim", [base, values])
        return [None]
    if base is not None:
        ctx.uf.union_all(base.ids, values.ids)
    return [Slots(c, values.ids)]
