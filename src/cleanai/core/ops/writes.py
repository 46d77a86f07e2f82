"""Writes into part of a tensor (autograd's ``CopySlices``): ``x[..., a:b] = y``,
``out[:, i] = v``, ``attn[..., i, :i] = row``, in-place calls on a view. Where the write
landed, and whether the tensor written into was a fresh one a factory made in the forward,
core/operands.py records while the model runs."""
from __future__ import annotations

from typing import Optional

from ..slots import Shape, Slots
from .base import OpCall, protect_all, register
from .elementwise import broadcast
from .shape import concat


@register("torch::autograd::CopySlices")
def _copy_slices(ctx, call: OpCall):
    """A write into part of a tensor: an in-place op on a view (``x[:, :2].relu_()``),
    ``x[..., a:b] = y``, ``view.copy_(y)``. Operands of the base's full shape were written over
    a view of all of it (GhostNet's ``out[:, :n] += shortcut`` with ``n`` all the channels):
    an element-wise op on the base. A range of one dim (core/operands.py notes which) is
    followed where that dim holds no channel ids; any other write keeps the channels it
    touches."""
    base = call.ins[0]
    written = [x for x in call.ins[1:] if x is not None]
    out = tuple(call.out_shapes[0])
    op = ctx.operand_shapes.get(("write op", call.node))
    if op is not None and op not in _FOLLOWED_WRITES:  # ``index_add_``, ``scatter_``...
        protect_all(ctx, f"{op} on part of a tensor", [base] + written)
        return [None]
    if written and all(s is not None and tuple(s) == out
                       for x, s in zip(call.ins[1:], call.in_shapes[1:]) if x is not None):
        return [broadcast(ctx, call.name(), call.ins, call.in_shapes, out)]
    where = ctx.operand_shapes.get(("write", call.node))
    if isinstance(where, tuple) and where[0] == "block" and len(call.ins) <= 2:
        return [_write_into_block(ctx, call, where)]
    whole = _whole_write(call, out) if where is None else None
    if whole is not None:
        # a base a factory made in the forward (``zeros_like``) takes the new width
        fresh = base is None and ctx.operand_shapes.get(("write fresh", call.node), False)
        return [broadcast(ctx, call.name(), [base, whole], [out, out], out, [fresh, False])]
    if isinstance(where, tuple) and len(call.ins) <= 2:
        return [_write_into_range(ctx, call, where)]
    if written or (where is not None and base is not None):
        protect_all(ctx, "a tensor written into part of another", [base] + written)
        return [None]
    return [base]


#: in-place calls on a view that act element by element (the rest move values: ``index_add_``)
_FOLLOWED_WRITES = frozenset(
    "__setitem__ copy_ add_ sub_ mul_ div_ true_divide_ multiply_ subtract_ addcmul_ addcdiv_ "
    "lerp_ clamp_ clip_ clamp_min_ clamp_max_ relu_ sigmoid_ tanh_ exp_ exp2_ expm1_ log_ "
    "log1p_ log2_ log10_ neg_ abs_ sqrt_ rsqrt_ reciprocal_ square_ pow_ sign_ sgn_ erf_ "
    "erfc_ erfinv_ sin_ cos_ tan_ sinh_ cosh_ asin_ acos_ atan_ atan2_ hypot_ logit_ "
    "frac_ fmod_ remainder_ copysign_ zero_ fill_ masked_fill_ uniform_ normal_ bernoulli_ "
    "dropout_ hardtanh_ leaky_relu_ elu_ celu_ selu_ gelu_ silu_ mish_ rrelu_ hardswish_ "
    "hardsigmoid_ threshold_ nan_to_num_ floor_ ceil_ round_ trunc_ __iadd__ __isub__ "
    "__imul__ __itruediv__".split())


def _whole_write(call: OpCall, out: Shape) -> Optional[Slots]:
    """The written tensor's slots on the base's dims when the view it fills is all of the
    base but for size-1 dims (``out[:, :, i] = v`` where that dim has one index: a chunked
    scan over one chunk), else None."""
    if len(call.ins) != 2 or call.ins[1] is None or call.in_shapes[1] is None:
        return None
    src, shape = call.ins[1], tuple(call.in_shapes[1])
    sizes = [n for n in shape if n != 1]
    if shape == out or sizes != [n for n in out if n != 1] or shape[src.dim] == 1:
        return None
    rank = sum(1 for n in shape[:src.dim] if n != 1)
    return src.moved([d for d, n in enumerate(out) if n != 1][rank])


def _write_into_block(ctx, call: OpCall, where) -> Optional[Slots]:
    """A write into a block of several dims (``attn[..., i, :i] = row``: the forward
    substitution of a chunked linear attention), recorded by core/operands.py as
    ``("block", dims, whole, storage, replaced)``: channels on a dim the block covers whole
    go through it as through an element-wise op; any on another dim keep theirs."""
    _, dims, whole, _, _ = where
    base, src = (list(call.ins) + [None])[:2]
    out = tuple(call.out_shapes[0])
    if src is None and len(call.ins) > 1:  # a tensor without channel ids: values unknown
        return protect_all(ctx, "a tensor without channel ids written into part of another",
                           [base])
    shape = None
    if src is not None:
        src_shape = call.in_shapes[1]
        lead = len(dims) - len(src_shape) if src_shape is not None else -1
        d = dims[src.dim + lead] if src_shape is not None and src.dim + lead >= 0 else -1
        if d not in whole:
            return protect_all(ctx, "a write of channels into part of a tensor", [base, src])
        shape = [1] * len(out)
        for v, bd in enumerate(dims):
            if bd in whole and v - lead >= 0:
                shape[bd] = src_shape[v - lead]
        src = src.moved(d)
    if base is not None and base.dim not in whole:
        return protect_all(ctx, "a write into part of a tensor's channels", [base, src])
    fresh = base is None and ctx.operand_shapes.get(("write fresh", call.node), False)
    return broadcast(ctx, call.name(), [base, src], [out, tuple(shape) if shape else None],
                     out, [fresh, False])


def _write_into_range(ctx, call: OpCall, where) -> Optional[Slots]:
    """``out[..., a:b] = src`` or an in-place op on that view, recorded by core/operands.py as
    ``(dim, a, b - a, selected, storage, replaced)`` (``selected``: ``out[:, i] = src``, one
    index of ``dim``, which ``src`` lacks). The range is fixed by the code (as a slice's
    bounds are), so channel ids on ``dim`` keep their channels, and pass on so that their
    readers stay connected. Channels on other dims go through the write as through an element-wise op:
    MLA attention builds its keys by writing per-head parts and a rotary part shared by all
    heads into a fresh tensor, so its heads prune. A fresh base (``new_empty``) pins no
    channels; one the model holds does."""
    base, src = (list(call.ins) + [None])[:2]
    out = tuple(call.out_shapes[0])
    dim, start, length, selected, storage, replaced = where
    if src is not None:
        src_shape = call.in_shapes[1]
        if src_shape is None:
            return protect_all(ctx, "a write of unknown shape into part of a tensor",
                               [base, src])
        if selected:  # the written tensor as the view it fills: size 1 at ``dim``
            k = dim - (len(out) - 1 - len(src_shape))
            if k < 0:
                return protect_all(ctx, "a write into one index of a dim it broadcasts over",
                                   [base, src])
            src_shape = tuple(src_shape[:k]) + (1,) + tuple(src_shape[k:])
            src = src.moved(src.dim + (src.dim >= k))
        src = src.moved(src.dim + len(out) - len(src_shape))
    if src is None and not replaced and base is not None and base.weight:
        # an in-place op with no other tensor on part of a tensor computed from parameters
        # alone: torchvision's Swin V2 zeroes the key part of its qkv bias
        # (``b[n // 3:2 * n // 3].zero_()``, bounds from the size): followed as before
        return base
    fixed = [x for x in (base, src) if x is not None and x.dim == dim]
    if fixed:
        for x in fixed:
            ctx.protect(x, "a write into a fixed range of the channel dim")
        if base is not None and base.dim != dim:
            return base  # the rotary part of MLA's keys: the heads go on
        if src is not None and src.dim != dim:
            ctx.protect(src, "a write into a fixed range of the channel dim")
        if src is not None and src.dim == dim and len(src.ids) != length:
            return None
        ids = base.ids.clone() if base is not None else ctx.fresh(
            out[dim], "a write into a fixed range of the channel dim")
        if src is not None and src.dim == dim and not replaced:  # ``y[:, :4] += b``
            ctx.uf.union_all(ids[start:start + length], src.ids)
        elif src is not None and src.dim == dim:
            ids[start:start + length] = src.ids
        elif len(call.ins) > 1 and replaced:  # values from a tensor without ids there (a constant)
            ids[start:start + length] = ctx.fresh(
                length, "a write into a fixed range of the channel dim")
        return Slots(dim, ids)
    if len(call.ins) < 2:
        return base  # an in-place op on the view (``x[:, :, :2].relu_()``): values only
    # a base a factory made in the forward (``zeros_like``, ``new_empty``): no values of its
    # own per channel, so the parts not written take the new width
    made = base is None and not ctx.is_model_state(storage) and \
        ctx.operand_shapes.get(("write fresh", call.node), False)
    ins, shapes, fresh = [], [], []
    for a, b, x in ((0, start, base), (start, start + length, src),
                    (start + length, out[dim], base)):
        if b > a:
            ins.append(x)
            shapes.append(out[:dim] + (b - a,) + out[dim + 1:])
            fresh.append(made and x is None)
    return concat(ctx, f"{call.name()} (a slice written)", ins, shapes, out, dim, fresh)
