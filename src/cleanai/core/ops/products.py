"""Matrix products, attention and functional layer norms."""
from __future__ import annotations

from typing import Optional

import torch

from ..slots import Shape, Slots
from .base import OpCall, none, protect_all, register
from .elementwise import broadcast


# --- products ------------------------------------------------------------------------------

def _partner(ctx, b: Slots) -> Optional[torch.Tensor]:
    """The output ids of a known layer whose weight ``b`` is (however reshaped or transposed
    on the way), when ``b`` carries that weight's input ids."""
    if not b.weight or not len(b.ids):
        return None
    key = int(b.ids[0])
    entry = ctx.partners.get(key)
    if entry is None or not torch.equal(entry[0], b.ids):
        return None
    ctx.partners_used.add(key)
    return entry[1]


def _operand(call: OpCall, i: int):
    """The autograd node that made input ``i`` of ``call`` (None for a constant)."""
    fns = call.node.next_functions
    return fns[i][0] if i < len(fns) else None


@register("MmBackward0", "BmmBackward0")
def _mm(ctx, call: OpCall):
    shapes = [s if s is not None or x is not None else _constant_shape(ctx, call, i)
              for i, (x, s) in enumerate(zip(call.ins, call.in_shapes))]
    return [matmul(ctx, call.name(), call.ins[0], call.ins[1], shapes[0], shapes[1],
                   call.out_shapes[0], (call.node, _operand(call, 1)))]


def _constant_shape(ctx, call: OpCall, i: int) -> Optional[Shape]:
    """The shape of operand ``i`` of a product when it is a constant made during the
    forward (autograd has no node for it: the zero initial state of a recurrence), read from
    the tensor the op saved. A batch dim its values do not vary along counts as 1: any number
    of channels there reads the same values (a state made from the input's shape follows a
    pruned head count; the forward check after slicing catches one that does not)."""
    t = call.saved(("self", "mat2")[i]) if i < 2 else None
    if not isinstance(t, torch.Tensor):
        return None
    shape = list(t.shape)
    if t.is_meta or ctx.is_model_state(t):
        return tuple(shape)
    for d in range(t.dim() - 2):
        if shape[d] > 1 and bool((t == t.narrow(d, 0, 1)).all()):
            shape[d] = 1
    return tuple(shape)


@register("AddmmBackward0", "BaddbmmBackward0")
def _addmm(ctx, call: OpCall):
    out = call.out_shapes[0]
    prod = matmul(ctx, call.name(), call.ins[1], call.ins[2], call.in_shapes[1],
                  call.in_shapes[2], out, (call.node, _operand(call, 2)))
    bias_shape = call.in_shapes[0]
    return [broadcast(ctx, call.name(), [call.ins[0], prod], [bias_shape, out], out)]


def matmul(ctx, op: str, a: Optional[Slots], b: Optional[Slots], sa: Optional[Shape],
           sb: Optional[Shape], out: Shape, nodes=None) -> Optional[Slots]:
    """``a @ b`` with ``a: [..., n, k]`` and ``b: [..., k, m]``: the k channels of both are tied.
    ``nodes``: the product's autograd node and ``b``'s, when ``b`` may be a bare parameter."""
    if sa is None or sb is None:
        return protect_all(ctx, f"{op} with an operand of unknown shape", [a, b])
    na, nb, no = len(sa), len(sb), len(out)
    ka, kb = na - 1, nb - 2
    bare = ctx.bare.operand(b, sb) if b is not None and nb >= 2 and nodes else None
    if bare is not None and (a is None or a.dim == ka) and b.dim in (kb, nb - 1) and \
            ctx.bare.used_as_is(bare[0], *nodes):  # ``x @ W``: see core/bare.py
        return ctx.bare.product(a, b, sb, no, *bare)
    a_k = a is not None and a.dim == ka
    b_k = b is not None and b.dim == kb
    partner = None
    if a_k and b_k:
        ctx.uf.union_all(a.ids, b.ids)
        partner = _partner(ctx, b)  # F.linear with a layer's weight
    elif a_k and sa[ka] > 1:
        ctx.protect(a, f"{op} contracts channels against a tensor without channel ids")
    elif b_k and sb[kb] > 1:
        ctx.protect(b, f"{op} contracts channels against a tensor without channel ids")
    result = []
    if a is not None and not a_k:
        result.append((a.dim + no - na, a))
    if b is not None and not b_k:
        result.append((b.dim + no - nb, b))
    if partner is not None and len(partner) == out[-1]:
        return Slots(no - 1, partner)
    if not result:
        return None
    if len(result) == 2:
        (da, xa), (db, xb) = result
        if da == db and da < no - 2:
            if len(xa.ids) != len(xb.ids) and 1 in (len(xa.ids), len(xb.ids)):
                # one key/value head broadcast over the query heads (multi-query attention):
                # the single channel stays, the other operand's channels go on
                one, many = (xa, xb) if len(xa.ids) == 1 else (xb, xa)
                ctx.protect(one, f"{op} broadcasts one channel over the other operand's")
                return Slots(da, many.ids)
            ctx.uf.union_all(xa.ids, xb.ids)
            return Slots(da, xa.ids)
        batch = [(d, x) for d, x in result if d < no - 2]
        other = next((x for d, x in result if d >= no - 2), None)
        so = sb if other is b else sa
        k = batch[0][0] - (no - len(so)) if len(batch) == 1 else -1
        if len(batch) != 1 or (0 <= k < len(so) and so[k] != 1):
            return protect_all(ctx, f"{op} mixes channel dims", [a, b])
        # one operand's channels on a batch dim (the query heads), the other's on the
        # product's own dim and broadcast over that batch dim (the single key/value head's
        # dims in multi-query attention): the heads go on, the other's channels stay
        ctx.protect(other, f"{op} gives channels on a dim of their own beside the other "
                           f"operand's on a batch dim")
        result = batch
    od, x = result[0]
    if od < no - 2:  # a batch dim: the other operand must broadcast over it
        other, so = (sb, nb) if x is a else (sa, na)
        k = od - (no - so)
        if 0 <= k < so - 2 and other[k] != 1:
            ctx.protect(x, f"{op} with a batch dim that has no channel ids")
    return Slots(od, x.ids)


@register("LinalgSolveTriangularBackward0")
def _solve_triangular(ctx, call: OpCall):
    """``torch.linalg.solve_triangular(A, B)``: X solves ``A X = B`` (``X A = B`` with
    ``left=False``) over the last two dims (the chunked delta rule of Gated DeltaNet solves over
    positions in a chunk). Each column of B (row, with ``left=False``) is solved on its own, so
    channels there go on; channels on a dim the system mixes stay; the other dims are batch
    dims, element-wise."""
    a, b = call.ins[0], call.ins[1]
    sa, sb = call.in_shapes[0], call.in_shapes[1]
    if sa is None:  # a constant matrix (the solve saved it)
        saved = call.saved("self")
        sa = tuple(saved.shape) if isinstance(saved, torch.Tensor) else None
    if sb is None:  # a constant right-hand side: the solution has its shape
        sb = call.out_shapes[0]
    if sa is None or len(sa) < 2 or len(sb) < 2:
        protect_all(ctx, f"{call.name()} with an operand of unknown shape", [a, b])
        return none(call)
    free = len(sb) - 1 if call.saved("left", True) else len(sb) - 2
    if a is not None and a.dim >= len(sa) - 2:
        ctx.protect(a, f"{call.name()} mixes the channels of its matrix")
        a = None
    if b is not None and b.dim >= len(sb) - 2 and b.dim != free:
        ctx.protect(b, f"{call.name()} mixes the channels it solves along")
        b = None
    # the matrix is the same for every column (row) of the solution: size 1 there
    return [broadcast(ctx, call.name(), [a, b], [tuple(sa[:-2]) + (1, 1), sb],
                      call.out_shapes[0])]


@register("ConvolutionBackward0")
def _conv(ctx, call: OpCall):
    """``F.conv1d/2d/3d`` outside a conv layer's forward (Mamba's and linear attention's causal
    depthwise conv on ``conv1d.weight``): one filter per channel keeps the channel (input,
    weight rows and bias tied); ``groups=1`` contracts the input channels against the
    weight's columns and yields the weight's rows, like ``F.linear``."""
    x, w = call.ins[0], call.ins[1]
    b = call.ins[2] if len(call.ins) > 2 else None
    sx, sw = call.in_shapes[0], call.in_shapes[1]
    rest = [None] * (len(call.out_shapes) - 1)
    groups = int(call.saved("groups", 1) or 1)
    if sx is None or sw is None or bool(call.saved("transposed", False)) or len(sx) < 3:
        protect_all(ctx, f"{call.name()} that CleanAI cannot follow", [x, w, b])
        return none(call)
    if x is not None and x.dim != 1:
        ctx.protect(x, f"{call.name()} slides along channels")
        x = None
    if groups == sx[1] == sw[0] and sw[1] == 1:  # depthwise: channel c stays channel c
        parts = [x] + [t for t in (w, b) if t is not None]
        if x is None or any(t.dim != 0 or len(t.ids) != sw[0] for t in parts[1:]):
            protect_all(ctx, f"depthwise {call.name()} on weights CleanAI does not follow",
                        parts)
            return none(call)
        for t in parts[1:]:
            ctx.uf.union_all(x.ids, t.ids)
        return [Slots(1, x.ids)] + rest
    if groups != 1:
        protect_all(ctx, f"grouped {call.name()} outside a conv layer", [x, w, b])
        return none(call)
    partner = None
    if w is not None and w.dim == 1 and len(w.ids) == sx[1]:
        if x is not None:
            ctx.uf.union_all(x.ids, w.ids)
        else:  # the model's input: its channels stay
            ctx.protect(w, f"{call.name()} reads a tensor without channel ids")
        partner = _partner(ctx, w)
    else:
        ctx.protect(x, f"{call.name()} contracts channels against a weight without channel ids")
    if partner is not None and len(partner) == sw[0]:
        if b is not None and b.dim == 0 and len(b.ids) == len(partner):
            ctx.uf.union_all(partner, b.ids)
        return [Slots(1, partner)] + rest
    ctx.protect(b, f"bias of a {call.name()} whose output channels are not followed")
    return none(call)


@register("ScaledDotProductFlashAttentionForCpuBackward0",
           "ScaledDotProductEfficientAttentionBackward0",
           "ScaledDotProductFlashAttentionBackward0", "ScaledDotProductCudnnAttentionBackward0")
def _sdpa(ctx, call: OpCall):
    q, k, v = call.ins[:3]
    sq, sk, sv = call.in_shapes[:3]
    for extra in call.ins[3:]:
        ctx.protect(extra, "attention mask")
    if sq is None or sk is None or sv is None:
        protect_all(ctx, f"{call.name()} with inputs of unknown shape", [q, k, v])
        return none(call)
    k, sk = _gqa_heads(ctx, k, sk, sq)
    v, sv = _gqa_heads(ctx, v, sv, sq)
    kt = None if k is None else Slots(_swap_last(k.dim, len(sk)), k.ids)
    skt = tuple(sk[:-2]) + (sk[-1], sk[-2])
    score_shape = tuple(torch.broadcast_shapes(tuple(sq[:-2]), tuple(sk[:-2]))) + (sq[-2], sk[-2])
    scores = matmul(ctx, call.name(), q, kt, sq, skt, score_shape)
    out = matmul(ctx, call.name(), scores, v, score_shape, sv, call.out_shapes[0])
    return [out] + [None] * (len(call.out_shapes) - 1)


def _gqa_heads(ctx, x: Optional[Slots], sx: Shape, sq: Shape):
    """Grouped-query attention (``enable_gqa=True``): key/value heads serve ``H_q / H_kv``
    consecutive query heads, as if each were repeated in place on the head dim (``-3``)."""
    if len(sx) < 3 or len(sq) < 3 or sx[-3] == sq[-3] or sx[-3] == 1 or sq[-3] % sx[-3]:
        return x, sx
    rep = sq[-3] // sx[-3]
    shape = tuple(sx[:-3]) + (sq[-3],) + tuple(sx[-2:])
    if x is None:
        return None, shape
    if x.dim == len(sx) - 3:
        ctx.note(x.ids, f"grouped-query attention: each key/value head serves {rep} query heads")
        return Slots(x.dim, x.ids.repeat_interleave(rep)), shape
    return x, shape


def _swap_last(d: int, nd: int) -> int:
    return {nd - 1: nd - 2, nd - 2: nd - 1}.get(d, d)


# --- functional norms over bare parameters -------------------------------------------------

@register("NativeLayerNormBackward0")
def _layer_norm(ctx, call: OpCall):
    x = call.ins[0]
    in_shape = call.in_shapes[0]
    normalized = tuple(call.saved("normalized_shape", ()))
    params = [p for p in call.ins[1:] if p is not None]
    if x is None or in_shape is None:
        for p in params:
            ctx.protect(p, "layer_norm weight")
        return [x] + [None] * (len(call.out_shapes) - 1)
    nd = len(in_shape)
    if len(normalized) == 1 and x.dim == nd - 1:
        for p in params:
            if p.dim == 0 and len(p.ids) == len(x.ids):
                ctx.uf.union_all(x.ids, p.ids)
            else:
                ctx.protect(p, "layer_norm weight")
        return [x] + [None] * (len(call.out_shapes) - 1)
    if x.dim >= nd - len(normalized):
        protect_all(ctx, "layer_norm over several dims", [x] + params)
        return none(call)
    for p in params:
        ctx.protect(p, "layer_norm weight")
    return [x] + [None] * (len(call.out_shapes) - 1)


@register("NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0")
def _batch_norm(ctx, call: OpCall):
    """``F.batch_norm`` (a BatchNorm subclass with its own forward, e.g. a norm + activation
    layer): channel c on dim 1 stays channel c, and weight/bias belong to it."""
    return [_channelwise_norm(ctx, call, "batch_norm", groups=1)] + \
        [None] * (len(call.out_shapes) - 1)


@register("NativeGroupNormBackward0")
def _group_norm(ctx, call: OpCall):
    """``F.group_norm``: like batch_norm, and every group keeps the same channel positions so
    the groups stay equal in size."""
    return [_channelwise_norm(ctx, call, "group_norm", groups=int(call.saved("group", 0)))] + \
        [None] * (len(call.out_shapes) - 1)


def _channelwise_norm(ctx, call: OpCall, op: str, groups: int) -> Optional[Slots]:
    x = call.ins[0]
    params = [p for p in call.ins[1:3] if p is not None]
    in_shape = call.in_shapes[0]
    if x is None or in_shape is None or len(in_shape) < 2 or x.dim != 1 or groups < 1:
        for p in params:  # its weights run over dim 1, which carries no tracked channels
            ctx.protect(p, f"{op} weight over channels CleanAI does not track")
        if x is not None and x.dim == 1:
            ctx.protect(x, f"{op} cannot be followed")
        return x
    if groups > 1:
        ctx.tie_blocks(x.ids, groups, op)
    for p in params:
        if p.dim == 0 and len(p.ids) == len(x.ids):
            ctx.uf.union_all(x.ids, p.ids)
        else:
            ctx.protect(p, f"{op} weight")
    return x
