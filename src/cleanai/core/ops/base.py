"""The op-handler registry and what a handler receives (see :mod:`cleanai.core.ops`)."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

from ..runtime import LeanRecordingError
from ..slots import Shape, Slots

Handler = Callable[..., List[Optional[Slots]]]
OP_HANDLERS: Dict[str, Handler] = {}


def register(*names: str):
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
        """A value the op saved for backward (``default`` for an activation a lean
        recording dropped: see :func:`cleanai.core.record.record_forward`)."""
        try:
            return getattr(self.node, "_saved_" + name, default)
        except LeanRecordingError:
            return default

    def name(self) -> str:
        return self.node.name()


def ndim_dim(dim: int, ndim: int) -> int:
    """A saved dim as a non-negative index (autograd stores ``-1`` as ``2**64 - 1``)."""
    dim = int(dim)
    if dim >= 2 ** 63:
        dim -= 2 ** 64
    return dim + ndim if dim < 0 else dim


def none(call: OpCall) -> List[Optional[Slots]]:
    return [None] * len(call.out_shapes)


def protect_all(ctx, op: str, ins) -> None:
    for x in ins:
        ctx.protect(x, f"{op} cannot be followed")
    return None
