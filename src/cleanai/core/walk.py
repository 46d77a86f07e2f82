"""The walk over a recorded forward's autograd graph: channel ids pushed from the inputs to
the outputs, known layers jumped over (their calls were recorded), everything else followed
op by op through ``grad_fn.next_functions`` with an explicit stack and the handlers of
:mod:`cleanai.core.ops`. :func:`cleanai.core.trace.trace` records the forward and calls
:func:`walk`.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch

from .functional import functional_param, protect_unfollowed
from .known_calls import module_call
from .layer_io import layer_extras
from .ops import OP_HANDLERS, OpCall
from .record import ModuleCall, tensor_key
from .runtime import iter_tensors
from .slots import Slots
from .trace_result import TraceResult
from .walk_context import WalkContext, innermost

logger = logging.getLogger(__name__)


def with_inputs(watched, inputs):
    """``watched`` with the autograd nodes that made the traced inputs (a clone of each, the
    doubled batch) counted as seen."""
    stack = [t.grad_fn for t in iter_tensors(inputs) if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn not in watched.made:
            watched.made.add(fn)
            stack.extend(f for f, _ in fn.next_functions if f is not None)
    return watched


def walk(model, calls, output, known, names_of_params, owned, intervals,
               watched, attention="heads", scan=None) -> TraceResult:
    ctx = WalkContext(model, attention, scan)
    ctx.intervals = intervals
    ctx.operand_shapes.update(watched.shapes)
    ctx.buffers.recorded(watched)
    made, unwatched = watched.made, None
    by_out: Dict[Tuple[Any, int], ModuleCall] = {}
    for c in calls:
        for k, _ in c.outputs:
            by_out[k] = c
            ctx.output_of[k] = c.name

    def producer(key):
        return by_out.get(key, key[0])

    def children(p):
        if isinstance(p, ModuleCall):
            keys = [p.input_key] + [k for k, _ in p.extras]
            return [producer(k) for k in keys if k is not None]
        return [producer((fn, nr)) for fn, nr in p.next_functions if fn is not None]

    roots = [producer(k) for k in (tensor_key(t) for t in iter_tensors(output)) if k is not None]
    order = []
    visited = set()

    def visit(roots) -> None:
        stack = [(r, False) for r in reversed(roots)]
        while stack:
            p, done = stack.pop()
            if done:
                order.append(p)
                continue
            if p in visited:
                continue
            visited.add(p)
            stack.append((p, True))
            for c in children(p):
                if c not in visited:
                    stack.append((c, False))

    visit(roots)
    # layers that ran but reach no output through autograd (a pooler whose result the task
    # head drops, a detector's proposals detached before use) are walked too, after what
    # they read: their inputs keep the channels of the layers that feed them
    # (an output the trace cannot look into gives no roots: then nothing is walked this way)
    dead = [c for c in calls if c not in visited and not _reached_inside(c, visited)] \
        if roots else []
    visit(dead)

    for p in order:
        if not isinstance(p, ModuleCall):
            for fn, _ in p.next_functions:
                if fn is not None:
                    ctx.readers.setdefault(fn, []).append(p)
    slots: Dict[Tuple[Any, int], Optional[Slots]] = {}
    sources: Dict[Tuple[Any, int], frozenset] = {}
    module_in: Dict[str, torch.Tensor] = {}
    module_out: Dict[str, torch.Tensor] = {}
    producers: List[str] = []
    ctx.module_out, ctx.producers = module_out, producers
    params: Dict[str, Slots] = {}
    internal: Dict[str, List[Optional[torch.Tensor]]] = {}
    edges = set()
    # an op that merges several sources (a residual add) becomes a junction: the walk stays
    # linear in depth; resolve_edges() expands junctions into layer-to-layer edges on demand
    junctions: List[frozenset] = []
    empty = frozenset()
    weights = set()  # keys of the tensors computed from parameters alone

    for p in order:
        if isinstance(p, ModuleCall):
            x = slots.get(p.input_key) if p.input_key is not None else None
            keys = [p.input_key] + [k for k, _ in p.extras]
            for k in keys:
                for src in sources.get(k, empty):
                    edges.add((src, p.name))
            ctx.bare.note_readers(id(p), (k[0] for k in keys if k is not None))
            outs = module_call(ctx, p, x, module_in, module_out, producers)
            outs = layer_extras(ctx, p, outs, [slots.get(k) if k is not None else None
                                               for k, _ in p.extras], module_in, module_out, internal)
            for (k, _), s in zip(p.outputs, outs):
                slots[k] = s
                sources[k] = frozenset((p.name,))
            continue
        name = p.name()
        if name.endswith("AccumulateGrad"):
            var = p.variable
            s = None
            layer = owned.get(id(var))
            if layer is not None:  # the walk never enters a layer: a use outside its forward
                s = functional_param(ctx, var, layer, known[layer], module_in, module_out,
                                     producers)
                sources[(p, 0)] = frozenset((known[layer][0],))
            elif id(var) in names_of_params and layer is None:
                pname = names_of_params[id(var)]
                if pname not in params:
                    dims = [d for d in range(var.dim()) if var.shape[d] > 1]
                    if dims:
                        params[pname] = Slots(dims[-1], ctx.fresh(var.shape[dims[-1]]), True)
                s = params.get(pname)
                if s is not None:
                    ctx.bare.register(pname, var, p, s)
                sources[(p, 0)] = frozenset((pname,))
            if id(var) in names_of_params:
                weights.add((p, 0))
            slots[(p, 0)] = s if s is None or s.weight else Slots(s.dim, s.ids, True)
            continue
        if unwatched is None and p not in made:
            unwatched = name
        in_keys = [(fn, nr) if fn is not None else None for fn, nr in p.next_functions]
        ctx.bare.note_readers(id(p), (fn for fn, _ in p.next_functions if fn is not None))
        ins = [slots.get(k) if k is not None else None for k in in_keys]
        in_shapes = [_shape(k, by_out) if k is not None else None for k in in_keys]
        out_shapes = [tuple(m.shape) for m in p._input_metadata]
        handler = OP_HANDLERS.get(name)
        if handler is None:
            if any(x is not None for x in ins):
                where = innermost(intervals, p._sequence_nr())
                ctx.unknown.setdefault(name, []).append(where)
                for x in ins:
                    ctx.protect(x, f"unknown op {name} in {where or 'the model'}")
            outs = [None] * len(out_shapes)
        else:
            outs = handler(ctx, OpCall(p, ins, in_shapes, out_shapes))
        for nr, s in enumerate(outs):
            if s is not None and (s.dim >= len(out_shapes[nr]) or
                                  out_shapes[nr][s.dim] != len(s.ids)):
                # a handler's answer does not fit the tensor: never guess, protect
                logger.warning("channel ids of %s do not match its output %s; protecting them",
                               name, out_shapes[nr])
                ctx.protect(s, f"{name} could not be followed")
                for x in ins:
                    ctx.protect(x, f"{name} could not be followed")
                outs[nr] = None
        srcs = {sources.get(k, empty) for k in in_keys if k is not None} - {empty}
        if len(srcs) > 1:
            junctions.append(frozenset().union(*srcs))
            src = frozenset((len(junctions) - 1,))
        else:
            src = srcs.pop() if srcs else empty
        # computed from parameters alone (``gamma[:, None, None]``, ``w.t()``): still a weight
        from_weights = all(k is None or k in weights for k in in_keys) and any(in_keys)
        for nr, s in enumerate(outs):
            if from_weights:
                weights.add((p, nr))
                if s is not None and not s.weight:
                    s = Slots(s.dim, s.ids, True)
            slots[(p, nr)] = s
            sources[(p, nr)] = src

    protect_unfollowed(ctx)
    ctx.bare.protect_other_uses(ctx.protect)
    params.update(ctx.buffers.settle(ctx.protect))  # sliced as bare parameters are
    for c in dead:
        for k, _ in c.outputs:
            # a result read after its layer, outside autograd (``proposals.detach()``), or
            # still held once the forward is over (stored on a module), keeps its width; one
            # nobody reads and nobody holds (a pooler output the head drops) is free
            if id(k[0]) in watched.read or watched.results[(id(k[0]), k[1])]() is not None:
                ctx.protect(slots.get(k), f"output of {c.name}, which reaches no output "
                                          f"through autograd but is read or kept (a detached "
                                          f"branch)")
    output_ids = []
    for t in iter_tensors(output):
        s = slots.get(tensor_key(t)) if tensor_key(t) is not None else None
        if s is not None:
            output_ids.append(s.ids)
    return TraceResult(ctx.uf, ctx.protected, module_in, module_out, producers, params,
                       output_ids, ctx.notes, list(edges), {n: m for m, (n, _) in known.items()},
                       internal, ctx.kinds, junctions, ctx.unknown,
                       [(ids, innermost(intervals, fn._sequence_nr()))
                        for ids, fn in ctx.fixed_splits],
                       cuts={n: torch.diff(torch.tensor(sorted(b))).tolist()
                             for n, b in ctx.cut_bounds.items()},
                       unwatched=unwatched,
                       count_ties=[t for t in ctx.count_ties.values() if len(t[0]) > 1],
                       attr_splits=ctx.attr_splits, norm_groups=ctx.norm_groups,
                       wants_location=ctx.wants_location,
                       param_dims=ctx.bare.dims, param_made=ctx.bare.made,
                       param_read=ctx.bare.read, slices=ctx.slices,
                       multiplied=ctx.multiplied, added=ctx.added)


def _reached_inside(call: ModuleCall, visited: set) -> bool:
    """True when the walk met the ops that made ``call``'s outputs although not the outputs
    themselves: an in-place op on an output that is a view (``InstanceNorm`` then
    ``ReLU(inplace=True)``) gives that view a new autograd node."""
    inputs = {k[0] for k in [call.input_key] + [k for k, _ in call.extras] if k is not None}
    for (fn, _), _ in call.outputs:
        if any(f in visited for f, _ in fn.next_functions if f is not None and f not in inputs):
            return True
    return False


def _shape(key, by_out) -> Optional[Tuple[int, ...]]:
    c = by_out.get(key)
    if c is not None:
        return next(s for k, s in c.outputs if k == key)
    fn, nr = key
    try:
        return tuple(fn._input_metadata[nr].shape)
    except (IndexError, RuntimeError):
        return None
