"""Ops that keep every dim's meaning: activations, pooling, element-wise arithmetic with
broadcasting, and reductions."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..slots import Shape, Slots
from .base import OP_HANDLERS, Handler, OpCall, ndim_dim, none, protect_all, register


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
    "NanToNumBackward0 LiftFreshBackward0 SafeSoftmaxBackward0 "
    # in-place activations (``nn.LeakyReLU(inplace=True)``, ``F.elu_``) have their own nodes
    "LeakyReluBackward1 EluBackward1 CeluBackward1 RreluWithNoiseBackward1 ThresholdBackward1 "
    # element-wise functions written as torch.autograd.Function, known by name: BLOOM's GeLU,
    # timm's memory-efficient activations, RecurrentGemma's square root with a clipped
    # gradient (any other custom Function stays an unknown op)
    "GeLUFunctionBackward SwishAutoFnBackward MishAutoFnBackward HardSigmoidAutoFnBackward "
    "HardSwishAutoFnBackward HardMishAutoFnBackward SqrtBoundDerivativeBackward"
).split()


def _main_operand(ctx, call: OpCall):
    """The op's first input; any further tracked input is protected (its role is unknown)."""
    for other in call.ins[1:]:
        ctx.protect(other, f"extra operand of {call.name()}")
    return call.ins[0] if call.ins else None


@register(*_UNARY)
def _unary(ctx, call: OpCall):
    x = _main_operand(ctx, call)
    if x is None:
        return none(call)
    out = call.out_shapes[0]
    if len(out) > x.dim and out[x.dim] == len(x.ids):
        return [x]
    ctx.protect(x, f"{call.name()} changed the channel dim")
    return [None]


@register("BackwardHookFunctionBackward")
def _identity_per_operand(ctx, call: OpCall):
    """Full backward hooks (``register_full_backward_hook``) wrap a module's tensors in one
    identity op: output i is input i."""
    if len(call.ins) != len(call.out_shapes):
        protect_all(ctx, call.name(), call.ins)
        return none(call)
    return list(call.ins)


def _spatial(last: int) -> Handler:
    """Ops that work on the last ``last`` dims (pooling, upsampling, padding): channels pass."""
    def handler(ctx, call: OpCall):
        x = _main_operand(ctx, call)
        if x is None:
            return none(call)
        in_shape = call.in_shapes[0]
        out = call.out_shapes[0]
        ndim = len(in_shape) if in_shape is not None else len(out)
        if x.dim < ndim - last and len(out) == ndim and out[x.dim] == len(x.ids):
            return [x] + [None] * (len(call.out_shapes) - 1)
        ctx.protect(x, f"{call.name()} works on the channel dim")
        return none(call)
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
    # torchvision's RoI pooling: one output per box, each channel pooled on its own
    ("GeneratedBackwardFor_torchvision_roi_align_defaultBackward", 2),
    ("GeneratedBackwardFor_torchvision_roi_pool_defaultBackward", 2),
):
    OP_HANDLERS[_name] = _spatial(_last)


@register("ConstantPadNdBackward0")
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


@register("AsStridedBackward0", "AsStridedBackward1")
def _as_strided(ctx, call: OpCall):
    """A restride (channels-last layouts) passes channels; a contiguous view of the whole
    tensor is a reshape (what an in-place op on a flattened view leaves behind)."""
    x = call.ins[0]
    if x is None:
        return [None]
    a, b = call.in_shapes[0], tuple(call.out_shapes[0])
    if a is not None and tuple(a) == b:
        return [x]
    size, stride = call.saved("size"), call.saved("stride")
    offset = call.saved("storage_offset") or 0
    if a is not None and size is not None and offset == 0 and _contiguous(size, stride):
        from .shape import reshape
        return [reshape(ctx, call.name(), x, tuple(a), b)]
    ctx.protect(x, "as_strided view")
    return [None]


def _contiguous(size, stride) -> bool:
    expected = 1
    for n, st in zip(reversed(list(size)), reversed(list(stride))):
        if n != 1 and st != expected:
            return False
        expected *= n
    return True


@register("MaskedFillBackward0", "MaskedScatterBackward0")
def _masked(ctx, call: OpCall):
    """``x.masked_fill(mask, v)``: channels pass unless the mask is baked to the channel count."""
    x = call.ins[0]
    if x is None:
        return [None]
    mask = call.saved("mask")
    if isinstance(mask, torch.Tensor):
        k = x.dim - (len(call.out_shapes[0]) - mask.dim())
        if 0 <= k < mask.dim() and mask.shape[k] != 1 and ctx.is_model_state(mask):
            ctx.protect(x, f"{call.name()} with a stored mask")
            return [None]
    return [x]


@register("RepeatBackward0")
def _repeat(ctx, call: OpCall):
    x = call.ins[0]
    if x is None:
        return [None]
    repeats = list(call.saved("repeats", ()))
    out = call.out_shapes[0]
    od = x.dim + len(out) - len(call.in_shapes[0] or out)
    if 0 <= od < len(repeats) and repeats[od] == 1:
        return [Slots(od, x.ids)]
    ctx.protect(x, "repeat along the channel dim")
    return [None]


@register("TrilBackward0", "TriuBackward0")
def _triangle(ctx, call: OpCall):
    """``tril`` / ``triu``: zeroes by position over the last two dims (a causal mask over
    positions); channels on another dim go on, channels on those two keep theirs."""
    x = call.ins[0]
    if x is None:
        return [None]
    if x.dim >= len(call.out_shapes[0]) - 2:
        ctx.protect(x, f"{call.name()} zeroes by position along the channel dim")
        return [None]
    return [x]


@register("FlipBackward0", "RollBackward0", "CumsumBackward0", "CumprodBackward0",
          "TopkBackward0", "SortBackward0")
def _dims_scrambling(ctx, call: OpCall):
    """Ops that move values along some dims (a router's ``topk`` over its experts): channels
    on another dim stay where they are."""
    x = call.ins[0]
    if x is None:
        return none(call)
    rest = [None] * (len(call.out_shapes) - 1)
    ndim = len(call.out_shapes[0])
    dims = call.saved("dims", None)
    if dims is None:
        dims = [call.saved("dim", 0)]
    if x.dim in {ndim_dim(int(d), ndim) for d in dims}:
        ctx.protect(x, f"{call.name()} reorders channels")
        return [None] + rest
    return [x] + rest


# --- element-wise ops with broadcasting ----------------------------------------------------

_SAVED_OPERANDS = ("self", "other")


@register("AddBackward0", "SubBackward0", "MulBackward0", "DivBackward0", "MaximumBackward0",
           "MinimumBackward0", "WhereBackward0", "PowBackward1", "Atan2Backward0",
           "LerpBackward0", "LerpBackward1", "AddcmulBackward0", "AddcdivBackward0",
           "FmaxBackward0", "FminBackward0", "HypotBackward0", "RemainderBackward0",
           "XlogyBackward0")
def _elementwise(ctx, call: OpCall):
    shapes = list(call.in_shapes)
    made_at_run_time = [False] * len(shapes)
    recorded = ctx.operand_shapes.get(call.node)
    if recorded is not None and len(recorded) == len(shapes):
        shapes = [s if s is not None else r for s, r in zip(shapes, recorded)]
    for i, s in enumerate(shapes):
        if s is None and i < len(_SAVED_OPERANDS):
            try:
                t = call.saved(_SAVED_OPERANDS[i])
            except RuntimeError:  # not saved for backward
                t = None
            if isinstance(t, torch.Tensor):
                shapes[i] = tuple(t.shape)
                made_at_run_time[i] = not ctx.is_model_state(t)
    return [broadcast(ctx, call.name(), call.ins, shapes, call.out_shapes[0], made_at_run_time,
                      ctx.buffers.operands.get(call.node), call.node)]


#: single-input ops through which a bare parameter keeps its dims in order, element by
#: element (softmax-like ops mix a dim's positions, so a slice would change the kept values)
_IN_ORDER = frozenset(set(_UNARY) - {"SoftmaxBackward0", "LogSoftmaxBackward0",
                                     "SafeSoftmaxBackward0"}
                      | {"UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1",
                         "SqueezeBackward2"})


#: ops that join their operands by a product: a width joined by these alone is a gate
#: (squeeze-and-excitation, Mamba's inner width), not a residual stream
_PRODUCTS = frozenset({"MulBackward0", "DivBackward0"})


def _operand_node(node, i: int):
    """The autograd node that made input ``i`` of ``node`` (None where unknown)."""
    fns = node.next_functions if node is not None else ()
    return fns[i][0] if i < len(fns) else None


def _all_protected(ctx, ids: torch.Tensor) -> bool:
    """True when ``ids`` hold channels and every one is protected."""
    return len(ids) > 0 and all(i in ctx.protected for i in ids.tolist())


def broadcast(ctx, op: str, ins: Sequence[Optional[Slots]], shapes: Sequence[Optional[Shape]],
              out: Shape, made_at_run_time: Optional[Sequence[bool]] = None,
              buffers: Optional[dict] = None, node=None) -> Optional[Slots]:
    """Slots of an element-wise result: operands tracked on the same output dim are tied.

    An operand without channel ids that spans the channel dim pins those channels, unless it
    was made during the forward (a dropout mask): such a tensor follows the input's shape; or
    it is a model buffer read nowhere else (``buffers``: operand index -> (name, the view
    used)), which is sliced with the channels (core/buffers.py).

    Operands tracked on different dims (an outer product by broadcasting, Mamba's
    ``dt[..., None] * B[:, None]``) keep the dim with the most channels; the others are
    protected. A bare parameter's value that spans the kept dim (``A[None, :, None, :]``)
    is sliced along it too where ``node``, the op's autograd node, shows how it was read.
    """
    out_nd = len(out)
    tracked = []
    spans = {}  # id(slots) -> the operand's shape
    position = {}  # id(slots) -> the operand's index (its autograd node: node.next_functions)
    for i, (x, s) in enumerate(zip(ins, shapes)):
        if x is None:
            continue
        nd = len(s) if s is not None else out_nd
        od = x.dim + out_nd - nd
        if len(x.ids) == out[od] > 0:  # an empty dim (no boxes found) ties nothing
            tracked.append((od, x))
            spans[id(x)] = s
            position[id(x)] = i
        # a size-1 channel dim broadcast over a larger one (a gate) ties nothing
    if not tracked:
        return None
    # an activation's ids describe the result
    tracked.sort(key=lambda t: t[1].weight)
    dims = {od for od, _ in tracked}
    if len(dims) > 1:
        acts = [(od, x) for od, x in tracked if not x.weight]
        # the dim kept: the activations' where they agree (a parameter over a dim that carries
        # no channel ids here, e.g. a norm weight over head_dim when whole heads are the
        # units, is kept whole), else the one with the most channels (an outer product)
        pick = acts or tracked
        # channels already protected (Mamba-2's state, a fixed part) gain nothing by keeping
        pick = [t for t in pick if not _all_protected(ctx, t[1].ids)] or pick
        od = max(pick, key=lambda t: (len(t[1].ids), -t[0]))[0]
        kept = [(d, x) for d, x in pick if d == od]
        for d, x in tracked:
            if d == od:
                continue
            s = spans[id(x)]
            k = od - (out_nd - len(s)) if s is not None else -1
            if x.weight:
                ctx.protect(x, f"a weight that {op} applies along a dim without channel "
                               f"ids (e.g. a norm over head_dim when heads are the units)")
            else:
                ctx.protect(x, f"{op} multiplies it by channels on another dim (an outer "
                               f"product); those keep theirs")
            spans_kept = (s is not None and 0 <= k < len(s) and s[k] != 1) or \
                (s is None and not x.weight)
            if spans_kept and not (x.weight and ctx.bare.bind(
                    x, s, k, kept[0][1].ids, node, _operand_node(node, position[id(x)]),
                    _IN_ORDER)):
                # it also spans the kept dim without ids there (a [1, C, H, W] position
                # embedding whose ids went to W): those channels cannot be sliced out of it
                for _, a in kept:
                    ctx.protect(a, f"{op} with an operand that spans the channel dim")
        tracked = kept
    od = tracked[0][0]
    first = tracked[0][1]
    for _, x in tracked[1:]:
        if not first.weight and not x.weight and \
                ctx.uf.find(int(first.ids[0])) != ctx.uf.find(int(x.ids[0])):
            # two activations' separate channels meet: by a product (a gate) or otherwise
            (ctx.multiplied if op in _PRODUCTS else ctx.added).append(int(first.ids[0]))
        ctx.uf.union_all(first.ids, x.ids)
    for i, (x, s) in enumerate(zip(ins, shapes)):
        if x is not None or (made_at_run_time and made_at_run_time[i]):
            continue
        if s is None:
            # Autograd kept no shape and Python never saw the call: the operand was made inside
            # a composite op (alpha_dropout's offset) from the input's own shape. Should that
            # guess ever be wrong, the forward check after slicing catches it and rolls back.
            continue
        k = od - (out_nd - len(s))
        if 0 <= k < len(s) and s[k] != 1:
            held = (buffers or {}).get(i)
            if held is not None and ctx.buffers.member(held[0], held[1], k, first.ids):
                continue  # a model buffer along the channels: sliced with them
            ctx.protect(first, f"{op} with a tensor that has no channel ids")
    return Slots(od, first.ids)


# --- reductions ----------------------------------------------------------------------------

@register("MeanBackward1", "SumBackward1", "AmaxBackward0", "AminBackward0", "VarBackward0",
           "StdBackward0", "NormBackward1", "LogsumexpBackward0", "MaxBackward0", "MinBackward0",
           "MeanBackward0", "SumBackward0", "VarMeanBackward0", "StdMeanBackward0",
           "LinalgVectorNormBackward0", "NormBackward0", "ProdBackward1")
def _reduce(ctx, call: OpCall):
    x = call.ins[0]
    if x is None:
        return none(call)
    in_shape = call.in_shapes[0]
    out = call.out_shapes[0]
    if in_shape is None:
        ctx.protect(x, f"{call.name()} of unknown input shape")
        return none(call)
    nd = len(in_shape)
    dims = call.saved("dim", None)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        reduced = set(range(nd))
    else:
        dims = [dims] if isinstance(dims, int) else dims
        reduced = {ndim_dim(int(d), nd) for d in dims}
    if x.dim in reduced:
        return none(call)  # the channel dim is summed away: values change, shapes do not
    if len(out) == nd:
        keep = x.dim
    else:
        keep = x.dim - sum(1 for d in reduced if d < x.dim)
    return [Slots(keep, x.ids)] * len(call.out_shapes)
