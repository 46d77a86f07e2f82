"""Channel semantics of autograd ops.

Each handler receives the :class:`~cleanai.core.slots.Slots` of an op's inputs (``None`` where an
input carries no channel ids) and the shapes of its inputs and outputs, and returns the slots of
each output. A handler ties ids together through ``ctx.uf`` and calls ``ctx.protect`` for
channels whose positions the op bakes in. Ops missing from :data:`OP_HANDLERS` are unknown: the
tracer protects every channel they touch and warns once.
"""
from . import elementwise, parts, products, shape, writes
from .base import OP_HANDLERS, OpCall

_HANDLER_MODULES = (elementwise, parts, products, shape, writes)  # importing them fills the registry

__all__ = ["OP_HANDLERS", "OpCall"]
