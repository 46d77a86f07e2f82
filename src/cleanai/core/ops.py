"""Channel semantics of autograd ops.

Each handler receives the :class:`Slots` of an op's inputs (``None`` where an input carries no
channel ids) and the shapes of its inputs and outputs, and returns the slots of each output.
A handler ties ids together through ``ctx.uf`` and calls ``ctx.protect`` for channels whose
positions the op bakes in. Ops missing from :data:`OP_HANDLERS` are unknown: the tracer protects
every channel they touch and warns once.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

from .slots import Shape, Slots, reshape_blocks

Handler = Callable[..., List[Optional[Slots]]]
OP_HANDLERS: Dict[str, Handler] = {}


def _register(*names: str):
    def wrap(fn: Handler) -> Handler:
        for name in names:
            OP_HANDLERS[name] = fn
        return fn
    return wrap


class OpCall:
    """One op as the handlers see it: input slots and shapes, output shapes, the grad_fn."""

    __slots__ = ("node", "ins", "in_shapes", "out_shapes")

    def __init__(self, node, ins, in_shapes, out_shapes):
        self.node = node
        self.ins: List[Optional[Slots]] = ins
        self.in_shapes: List[Optional[Shape]] = in_shapes
        self.out_shapes: List[Shape] = out_shapes

    def saved(self, name: str, default=None):
        return getattr(self.node, "_saved_" + name, default)

    def name(self) -> str:
        return self.node.name()


def _ndim_dim(dim: int, ndim: int) -> int:
    """A saved dim as a non-negative index (autograd stores ``-1`` as ``2**64 - 1``)."""
    dim = int(dim)
    if dim >= 2 ** 63:
        dim -= 2 ** 64
    return dim + ndim if dim < 0 else dim


def _none(call: OpCall) -> List[Optional[Slots]]:
    return [None] * len(call.out_shapes)


# --- ops that keep every dim's meaning -----------------------------------------------------

_UNARY = (
    "ReluBackward0 GeluBackward0 SiluBackward0 SigmoidBackward0 TanhBackward0 HardswishBackward0 "
    "HardsigmoidBackward0 LeakyReluBackward0 EluBackward0 HardtanhBackward0 SoftplusBackward0 "
    "MishBackward0 NegBackward0 ExpBackward0 LogBackward0 SqrtBackward0 RsqrtBackward0 PowBackward0 "
    "AbsBackward0 CloneBackward0 ToCopyBackward0 NativeDropoutBackward0 MulBackward1 DivBackward1 "
    "DivBackward2 AddBackward1 SubBackward1 RsubBackward1 ClampBackward1 ClampMinBackward0 "
    "ClampMaxBackward0 ErfBackward0 CosBackward0 SinBackward0 ReciprocalBackward0 AliasBackward0 "
    "SoftmaxBackward0 LogSoftmaxBackward0 LogSigmoidBackward0 SgnBackward0 SignBackward0 "
    "Relu6Backward0 CeluBackward0 SeluBackward0 SquareBackward0 Expm1Backward0 Log1pBackward0 "
    "RreluWithNoiseBackward0 ThresholdBackward0 HardshrinkBackward0 SoftshrinkBackward0 "
    "TanhshrinkBackward0 LogitBackward0 FloorBackward0 CeilBackward0 "
    "RoundBackward0 TruncBackward0 FracBackward0 ClampBackward0 "
    "NanToNumBackward0 LiftFreshBackward0"
).split()


@_register(*_UNARY)
def _unary(ctx, call: OpCall):
    x = call.ins[0] if call.ins else None
    for other in call.ins[1:]:
        ctx.protect(other, f"extra operand of {call.name()}")
    if x is None:
        return _none(call)
    out = call.out_shapes[0]
    if len(out) > x.dim and out[x.dim] == len(x.ids):
        return [x]
    ctx.protect(x, f"{call.name()} changed the channel dim")
    return [None]


def _spatial(last: int) -> Handler:
    """Ops that work on the last ``last`` dims (pooling, upsampling, padding): channels pass."""
    def handler(ctx, call: OpCall):
        x = call.ins[0] if call.ins else None
        for other in call.ins[1:]:
            ctx.protect(other, f"extra operand of {call.name()}")
        if x is None:
            return _none(call)
        in_shape = call.in_shapes[0]
        out = call.out_shapes[0]
        ndim = len(in_shape) if in_shape is not None else len(out)
        if x.dim < ndim - last and len(out) == ndim and out[x.dim] == len(x.ids):
            return [x] + [None] * (len(call.out_shapes) - 1)
        ctx.protect(x, f"{call.name()} works on the channel dim")
        return _none(call)
    return handler


for _name, _last in (
    ("MaxPool1DWithIndicesBackward0", 1), ("MaxPool2DWithIndicesBackward0", 2),
    ("MaxPool3DWithIndicesBackward0", 3), ("AvgPool1DBackward0", 1), ("AvgPool2DBackward0", 2),
    ("AvgPool3DBackward0", 3), ("AdaptiveAvgPool1DBackward0", 1), ("AdaptiveAvgPool2DBackward0", 2),
    ("AdaptiveAvgPool3DBackward0", 3), ("AdaptiveMaxPool1DBackward0", 1),
    ("AdaptiveMaxPool2DBackward0", 2), ("AdaptiveMaxPool3DBackward0", 3),
    ("UpsampleNearest1DBackward0", 1), ("UpsampleNearest2DBackward0", 2),
    ("UpsampleNearest3DBackward0", 3), ("UpsampleNearestExact1DBackward0", 1),
    ("UpsampleNearestExact2DBackward0", 2), ("UpsampleNearestExact3DBackward0", 3),
    ("UpsampleLinear1DBackward0", 1), ("UpsampleBilinear2DBackward0", 2),
    ("UpsampleBicubic2DBackward0", 2), ("UpsampleTrilinear3DBackward0", 3),
    ("ReflectionPad1DBackward0", 1), ("ReflectionPad2DBackward0", 2),
    ("ReflectionPad3DBackward0", 3), ("ReplicationPad1DBackward0", 1),
    ("ReplicationPad2DBackward0", 2), ("ReplicationPad3DBackward0", 3),
):
    OP_HANDLERS[_name] = _spatial(_last)


@_register("ConstantPadNdBackward0")
def _constant_pad(ctx, call: OpCall):
    x = call.ins[0]
    if x is None:
        return [None]
    pad = list(call.saved("pad", ()) or ())
    ndim = len(call.out_shapes[0])
    k = ndim - 1 - x.dim  # pad[2k], pad[2k+1] pad the channel dim
    if 2 * k + 1 < len(pad) and (pad[2 * k] or pad[2 * k + 1]):
        ctx.protect(x, "padding of the channel dim")
        return [None]
    return [x]


@_register("AsStridedBackward0", "AsStridedBackward1")
def _as_strided(ctx, call: OpCall):
    x = call.ins[0]
    if x is None:
        return [None]
    if call.in_shapes[0] is not None and tuple(call.in_shapes[0]) == tuple(call.out_shapes[0]):
        return [x]  # a change of strides only (channels-last layouts)
    ctx.protect(x, "as_strided view")
    return [None]


@_register("FlipBackward0", "RollBackward0", "CumsumBackward0", "CumprodBackward0")
def _dims_scrambling(ctx, call: OpCall):
    x = call.ins[0]
    if x is None:
        return _none(call)
    ndim = len(call.out_shapes[0])
    dims = call.saved("dims", None)
    if dims is None:
        dims = [call.saved("dim", 0)]
    if x.dim in {_ndim_dim(int(d), ndim) for d in dims}:
        ctx.protect(x, f"{call.name()} reorders channels")
        return [None]
    return [x]


# --- element-wise ops with broadcasting ----------------------------------------------------

_SAVED_OPERANDS = ("self", "other")


@_register("AddBackward0", "SubBackward0", "MulBackward0", "DivBackward0", "MaximumBackward0",
           "MinimumBackward0", "WhereBackward0", "PowBackward1", "Atan2Backward0",
           "LerpBackward0", "LerpBackward1", "AddcmulBackward0", "AddcdivBackward0",
           "FmaxBackward0", "FminBackward0", "HypotBackward0", "RemainderBackward0",
           "XlogyBackward0")
def _elementwise(ctx, call: OpCall):
    shapes = list(call.in_shapes)
    made_at_run_time = [False] * len(shapes)
    for i, s in enumerate(shapes):
        if s is None and i < len(_SAVED_OPERANDS):
            try:
                t = call.saved(_SAVED_OPERANDS[i])
            except RuntimeError:  # not saved for backward
                t = None
            if isinstance(t, torch.Tensor):
                shapes[i] = tuple(t.shape)
                made_at_run_time[i] = not ctx.is_model_state(t)
    return [broadcast(ctx, call.name(), call.ins, shapes, call.out_shapes[0], made_at_run_time)]


def broadcast(ctx, op: str, ins: Sequence[Optional[Slots]], shapes: Sequence[Optional[Shape]],
              out: Shape, made_at_run_time: Optional[Sequence[bool]] = None) -> Optional[Slots]:
    """Slots of an element-wise result: operands tracked on the same output dim are tied.

    An operand without channel ids that spans the channel dim pins those channels, unless it
    was made during the forward (a dropout mask): such a tensor follows the input's shape.
    """
    out_nd = len(out)
    tracked = []
    for x, s in zip(ins, shapes):
        if x is None:
            continue
        nd = len(s) if s is not None else out_nd
        od = x.dim + out_nd - nd
        if len(x.ids) == out[od]:
            tracked.append((od, x))
        # a size-1 channel dim broadcast over a larger one (a gate) ties nothing
    if not tracked:
        return None
    dims = {od for od, _ in tracked}
    if len(dims) > 1:
        for _, x in tracked:
            ctx.protect(x, f"{op} mixes channel dims")
        return None
    od = tracked[0][0]
    first = tracked[0][1]
    for _, x in tracked[1:]:
        ctx.uf.union_all(first.ids, x.ids)
    for i, (x, s) in enumerate(zip(ins, shapes)):
        if x is not None or (made_at_run_time and made_at_run_time[i]):
            continue
        if s is None:
            if len(ins) > 1:
                ctx.protect(first, f"{op} with an operand of unknown shape")
            continue
        k = od - (out_nd - len(s))
        if 0 <= k < len(s) and s[k] != 1:
            ctx.protect(first, f"{op} with a tensor that has no channel ids")
    return Slots(od, first.ids)


# --- shape ops -----------------------------------------------------------------------------

@_register("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "SqueezeBackward0",
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
    return [reshape(ctx, call.name(), x, in_shape, call.out_shapes[0])]


def reshape(ctx, op: str, x: Slots, a: Shape, b: Shape) -> Optional[Slots]:
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
    if len(varying) > 1:
        inner = varying[-1]
        moved = grid.movedim(inner, -1).reshape(-1, grid.size(inner))
        for row in moved[1:]:
            ctx.uf.union_all(moved[0], row)
        grid = ctx.uf.canonical(grid)
        varying = [inner]
    d = varying[0]
    ids = grid.movedim(d, 0).reshape(grid.size(d), -1)[:, 0].clone()
    return Slots(j0 + d, ids)


@_register("ExpandBackward0")
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


@_register("PermuteBackward0")
def _permute(ctx, call: OpCall):
    x = call.ins[0]
    if x is None:
        return [None]
    ndim = len(call.out_shapes[0])
    dims = [_ndim_dim(int(d), ndim) for d in call.saved("dims")]
    return [x.moved(dims.index(x.dim))]


@_register("TransposeBackward0", "TransposeBackward1", "TBackward0")
def _transpose(ctx, call: OpCall):
    x = call.ins[0]
    if x is None:
        return [None]
    ndim = len(call.out_shapes[0])
    if call.name() == "TBackward0":
        d0, d1 = 0, ndim - 1
    else:
        d0 = _ndim_dim(int(call.saved("dim0")), ndim)
        d1 = _ndim_dim(int(call.saved("dim1")), ndim)
    swap = {d0: d1, d1: d0}
    return [x.moved(swap.get(x.dim, x.dim))]


@_register("CatBackward0")
def _cat(ctx, call: OpCall):
    out = call.out_shapes[0]
    dim = _ndim_dim(int(call.saved("dim")), len(out))
    return [concat(ctx, call.name(), call.ins, call.in_shapes, out, dim)]


def concat(ctx, op: str, ins, shapes, out: Shape, dim: int) -> Optional[Slots]:
    """Concatenation on ``dim``: ranges of the result are the inputs' channels in order."""
    if all(x is None for x in ins):
        return None
    on_dim = [x is not None and x.dim == dim for x in ins]
    if not any(on_dim):
        # channels sit on another dim: the inputs are tied there, as in an element-wise op
        flat = [s if s is None else s[:dim] + (1,) + s[dim + 1:] for s in shapes]
        return broadcast(ctx, op, ins, flat, out[:dim] + (1,) + out[dim + 1:])
    if any(x is not None and not d for x, d in zip(ins, on_dim)):
        return _protect_all(ctx, f"{op} mixes channel dims", ins)
    sizes = [s[dim] if s is not None else None for s in shapes]
    if sizes.count(None) > 1:
        return _protect_all(ctx, op, ins)
    if None in sizes:
        sizes[sizes.index(None)] = out[dim] - sum(s for s in sizes if s is not None)
    parts = []
    for x, n in zip(ins, sizes):
        if x is not None:
            parts.append(x.ids)
        else:
            parts.append(ctx.fresh(n, f"concatenated by {op} with a tensor that has no channel ids"))
    return Slots(dim, torch.cat(parts))


def _protect_all(ctx, op: str, ins) -> None:
    for x in ins:
        ctx.protect(x, f"{op} cannot be followed")
    return None


@_register("StackBackward0")
def _stack(ctx, call: OpCall):
    out = call.out_shapes[0]
    dim = _ndim_dim(int(call.saved("dim")), len(out))
    shapes = [s if s is None else s[:dim] + (1,) + s[dim:] for s in call.in_shapes]
    ins = [x if x is None else x.moved(x.dim + (x.dim >= dim)) for x in call.ins]
    return [broadcast(ctx, call.name(), ins, shapes, out)]


@_register("SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0")
def _split(ctx, call: OpCall):
    x = call.ins[0]
    if x is None:
        return _none(call)
    in_shape = call.in_shapes[0]
    dim = _ndim_dim(int(call.saved("dim")), len(in_shape))
    if call.name() == "UnbindBackward0":
        if x.dim == dim:
            ctx.protect(x, "unbind on the channel dim")
            return _none(call)
        return [x.moved(x.dim - (x.dim > dim)) for _ in call.out_shapes]
    if x.dim != dim:
        return [x for _ in call.out_shapes]
    sizes = [s[dim] for s in call.out_shapes]
    if len(set(sizes)) != 1:
        ctx.protect(x, f"{call.name()} into unequal sizes {sizes}")
        return _none(call)
    pieces = list(x.ids.split(sizes[0]))
    for piece in pieces[1:]:
        ctx.uf.union_all(pieces[0], piece)
    return [Slots(dim, p) for p in pieces]


@_register("SliceBackward0")
def _slice(ctx, call: OpCall):
    x = call.ins[0]
    if x is None:
        return [None]
    in_shape = call.in_shapes[0]
    dim = _ndim_dim(int(call.saved("dim")), len(in_shape))
    if x.dim != dim:
        return [x]
    if call.out_shapes[0][dim] == in_shape[dim]:
        return [x]
    ctx.protect(x, "slice of the channel dim")
    return [None]


@_register("SelectBackward0")
def _select(ctx, call: OpCall):
    x = call.ins[0]
    if x is None:
        return [None]
    dim = _ndim_dim(int(call.saved("dim")), len(call.in_shapes[0]))
    if x.dim == dim:
        ctx.protect(x, "select of one channel")
        return [None]
    return [x.moved(x.dim - (x.dim > dim))]


@_register("IndexBackward0")
def _index(ctx, call: OpCall):
    """Advanced indexing on dims other than the channel dim moves the channel dim."""
    x = call.ins[0]
    if x is None:
        return [None]
    indices = list(call.saved("indices", ()) or ())
    used = [i for i, t in enumerate(indices) if t is not None]
    in_shape, out = call.in_shapes[0], call.out_shapes[0]
    if not used or x.dim in used or in_shape is None:
        ctx.protect(x, "indexing of the channel dim")
        return [None]
    idx_nd = len(torch.broadcast_shapes(*(tuple(indices[i].shape) for i in used)))
    if used == list(range(used[0], used[-1] + 1)):
        d = x.dim if x.dim < used[0] else x.dim - len(used) + idx_nd
    else:
        d = idx_nd + sum(1 for i in range(x.dim) if i not in used)
    if d < len(out) and out[d] == len(x.ids):
        return [Slots(d, x.ids)]
    ctx.protect(x, "indexing of the channel dim")
    return [None]


@_register("PixelShuffleBackward0")
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


@_register("PixelUnshuffleBackward0")
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


# --- reductions ----------------------------------------------------------------------------

@_register("MeanBackward1", "SumBackward1", "AmaxBackward0", "AminBackward0", "VarBackward0",
           "StdBackward0", "NormBackward1", "LogsumexpBackward0", "MaxBackward0", "MinBackward0",
           "MeanBackward0", "SumBackward0", "VarMeanBackward0", "StdMeanBackward0",
           "LinalgVectorNormBackward0", "NormBackward0", "ProdBackward1")
def _reduce(ctx, call: OpCall):
    x = call.ins[0]
    if x is None:
        return _none(call)
    in_shape = call.in_shapes[0]
    out = call.out_shapes[0]
    if in_shape is None:
        ctx.protect(x, f"{call.name()} of unknown input shape")
        return _none(call)
    nd = len(in_shape)
    dims = call.saved("dim", None)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        reduced = set(range(nd))
    else:
        dims = [dims] if isinstance(dims, int) else dims
        reduced = {_ndim_dim(int(d), nd) for d in dims}
    if x.dim in reduced:
        return _none(call)  # the channel dim is summed away: values change, shapes do not
    if len(out) == nd:
        keep = x.dim
    else:
        keep = x.dim - sum(1 for d in reduced if d < x.dim)
    return [Slots(keep, x.ids)] * len(call.out_shapes)


# --- products ------------------------------------------------------------------------------

@_register("MmBackward0", "BmmBackward0")
def _mm(ctx, call: OpCall):
    return [matmul(ctx, call.name(), call.ins[0], call.ins[1], call.in_shapes[0],
                   call.in_shapes[1], call.out_shapes[0])]


@_register("AddmmBackward0", "BaddbmmBackward0")
def _addmm(ctx, call: OpCall):
    out = call.out_shapes[0]
    prod = matmul(ctx, call.name(), call.ins[1], call.ins[2], call.in_shapes[1],
                  call.in_shapes[2], out)
    bias_shape = call.in_shapes[0]
    return [broadcast(ctx, call.name(), [call.ins[0], prod], [bias_shape, out], out)]


def matmul(ctx, op: str, a: Optional[Slots], b: Optional[Slots], sa: Optional[Shape],
           sb: Optional[Shape], out: Shape) -> Optional[Slots]:
    """``a @ b`` with ``a: [..., n, k]`` and ``b: [..., k, m]``: the k channels of both are tied."""
    if sa is None or sb is None:
        return _protect_all(ctx, f"{op} with an operand of unknown shape", [a, b])
    na, nb, no = len(sa), len(sb), len(out)
    ka, kb = na - 1, nb - 2
    a_k = a is not None and a.dim == ka
    b_k = b is not None and b.dim == kb
    if a_k and b_k:
        ctx.uf.union_all(a.ids, b.ids)
    elif a_k and sa[ka] > 1:
        ctx.protect(a, f"{op} contracts channels against a tensor without channel ids")
    elif b_k and sb[kb] > 1:
        ctx.protect(b, f"{op} contracts channels against a tensor without channel ids")
    result = []
    if a is not None and not a_k:
        result.append((a.dim + no - na, a))
    if b is not None and not b_k:
        result.append((b.dim + no - nb, b))
    if not result:
        return None
    if len(result) == 2:
        (da, xa), (db, xb) = result
        if da == db and da < no - 2:
            ctx.uf.union_all(xa.ids, xb.ids)
            return Slots(da, xa.ids)
        return _protect_all(ctx, f"{op} mixes channel dims", [a, b])
    od, x = result[0]
    if od < no - 2:  # a batch dim: the other operand must broadcast over it
        other, so = (sb, nb) if x is a else (sa, na)
        k = od - (no - so)
        if 0 <= k < so - 2 and other[k] != 1:
            ctx.protect(x, f"{op} with a batch dim that has no channel ids")
    return Slots(od, x.ids)


@_register("ScaledDotProductFlashAttentionForCpuBackward0",
           "ScaledDotProductEfficientAttentionBackward0",
           "ScaledDotProductFlashAttentionBackward0", "ScaledDotProductCudnnAttentionBackward0")
def _sdpa(ctx, call: OpCall):
    q, k, v = call.ins[:3]
    sq, sk, sv = call.in_shapes[:3]
    for extra in call.ins[3:]:
        ctx.protect(extra, "attention mask")
    if sq is None or sk is None or sv is None:
        _protect_all(ctx, f"{call.name()} with inputs of unknown shape", [q, k, v])
        return _none(call)
    kt = None if k is None else Slots(_swap_last(k.dim, len(sk)), k.ids)
    skt = tuple(sk[:-2]) + (sk[-1], sk[-2])
    score_shape = tuple(torch.broadcast_shapes(tuple(sq[:-2]), tuple(sk[:-2]))) + (sq[-2], sk[-2])
    scores = matmul(ctx, call.name(), q, kt, sq, skt, score_shape)
    out = matmul(ctx, call.name(), scores, v, score_shape, sv, call.out_shapes[0])
    return [out] + [None] * (len(call.out_shapes) - 1)


def _swap_last(d: int, nd: int) -> int:
    return {nd - 1: nd - 2, nd - 2: nd - 1}.get(d, d)


# --- functional norms over bare parameters -------------------------------------------------

@_register("NativeLayerNormBackward0")
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
        _protect_all(ctx, "layer_norm over several dims", [x] + params)
        return _none(call)
    for p in params:
        ctx.protect(p, "layer_norm weight")
    return [x] + [None] * (len(call.out_shapes) - 1)
