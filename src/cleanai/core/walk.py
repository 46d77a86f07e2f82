"""The walk over a recorded forward's autograd graph: channel ids pushed from the inputs to
the outputs, known layers jumped over (their calls were recorded), everything else followed
op by op through ``grad_fn.next_functions`` with an explicit stack and the handlers of
:mod:`cleanai.core.ops`. :func:`cleanai.core.trace.trace` records the forward and calls
:func:`walk`.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .bare import BareParams
from .buffers import BufferTables
from .functional import functional_param, protect_unfollowed
from .known_calls import module_call
from .layer_io import layer_extras
from .ops import OP_HANDLERS, OpCall
from .ops.base import ndim_dim
from .record import ModelScan, ModuleCall, tensor_key
from .runtime import iter_tensors
from .slots import Slots, UnionFind

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TraceResult:
    """What the trace found: the channel ids of every layer dim and of bare parameters."""

    uf: UnionFind
    protected: Dict[int, str]
    module_in: Dict[str, torch.Tensor]
    module_out: Dict[str, torch.Tensor]
    producers: List[str]
    params: Dict[str, Slots]
    output_ids: List[torch.Tensor]
    notes: List[Tuple[int, str]]
    edges: List[Tuple[Any, str]]  # (layer, parameter or junction index, layer): see resolve_edges
    modules: Dict[str, nn.Module]
    #: per layer, the ids of each internal dim's positions (None for a switched-off dim)
    internal: Dict[str, List[Optional[torch.Tensor]]] = dataclasses.field(default_factory=dict)
    kinds: List[Tuple[int, str]] = dataclasses.field(default_factory=list)
    junctions: List[frozenset] = dataclasses.field(default_factory=list)
    #: unknown op name -> the modules it ran in (empty names where not located)
    unknown: Dict[str, List[str]] = dataclasses.field(default_factory=dict)
    #: (ids, module that ran the split) of splits into equal parts of sizes fixed in the code
    fixed_splits: List[Tuple[torch.Tensor, str]] = dataclasses.field(default_factory=list)
    #: producer -> the sizes a split with a list of sizes cuts its output into
    #: (``torch.split(self.in_proj(x), [mlp, d, d, d])``): each part is a group of its own
    cuts: Dict[str, List[int]] = dataclasses.field(default_factory=dict)
    #: why a pruned forward may fail on a width the graph cannot see (the first such call
    #: outside the known layers, a hook...), or None: see core/widths.py
    check_reason: Optional[str] = "not checked"
    #: the first autograd node outside the known layers that no watched call made
    unwatched: Optional[str] = None
    #: the hooks and instance forwards at trace time (core/widths.py ``code_fingerprint``)
    code: tuple = ()
    #: parts that must keep equal counts, each with what ties them (``x.chunk(2)``, a split
    #: by ``self.key_dim``): build_groups checks that each part is a whole group, and ties
    #: them position by position where it is not
    count_ties: List[Tuple[List[torch.Tensor], str, int]] = dataclasses.field(
        default_factory=list)  # (parts, what ties them, where its note goes in ``notes``)
    #: splits by sizes the running module stores as integer attributes: (producer, module,
    #: the attribute each part's size is, None for a part that keeps its size, those sizes)
    attr_splits: List[Tuple[str, str, List[Optional[str]], List[int]]] = dataclasses.field(
        default_factory=list)
    #: a split's sizes may be attributes of the module that ran it: walk again with module
    #: ranges (see core/trace.py)
    wants_location: bool = False
    #: (parameter, dim) -> ids of a bare parameter's dims besides the one ``params`` holds
    #: (a matrix used as ``x @ W`` has an input and an output dim: see ops/products.py)
    param_dims: Dict[Tuple[str, int], torch.Tensor] = dataclasses.field(default_factory=dict)
    #: ``"name[dim]"`` -> ids a bare parameter produces, as a layer's output does (the
    #: columns of ``x @ W``)
    param_made: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    #: ``"name[dim]"`` of bare parameter dims a product contracts, as a layer's input
    param_read: set = dataclasses.field(default_factory=set)
    #: ``(layer, dim, start, end)`` of each slice taken of a layer's whole output
    #: (``qkv[..., :q_size]``): the part is channels of its own (see ops/shape.py)
    slices: List[Tuple[str, int, int, int]] = dataclasses.field(default_factory=list)


class _Tracer:
    """Holds the union-find and the protected ids while channel ids are propagated."""

    def __init__(self, model: nn.Module, attention: str = "heads",
                 scan: Optional["ModelScan"] = None) -> None:
        self.attention = attention
        self.kinds: List[Tuple[int, str]] = []  # (id, "heads" | "head_dims"): attention units
        # first input id of a known layer's weight used functionally -> (its input ids, its
        # output ids, its name): a product that contracts the weight's input channels yields
        # its outputs
        self.partners: Dict[int, Tuple[torch.Tensor, torch.Tensor, str]] = {}
        self.partners_used: set = set()
        # name of a known layer whose weight the walk met carrying input ids -> its output ids
        self.weights_read: Dict[str, torch.Tensor] = {}
        self._scan = scan or ModelScan(model)
        self._storages: Optional[set] = None  # filled on first use: most models never ask
        self.uf = UnionFind()
        self.protected: Dict[int, str] = {}
        self.notes: List[Tuple[int, str]] = []
        self.unknown: Dict[str, List[str]] = {}
        self.operand_shapes: Dict[Any, list] = {}
        # (ids, grad_fn) of splits into equal parts whose sizes the model's code wrote down
        self.fixed_splits: List[Tuple[torch.Tensor, Any]] = []
        # layer -> where splits by a list its parent module stores cut its output (see cut())
        self.cut_bounds: Dict[str, set] = {}
        self.module_out: Dict[str, torch.Tensor] = {}  # the walk's, once it starts
        self.producers: List[str] = []  # likewise
        self.intervals: list = []  # module autograd ranges, when the recording located them
        self.bare = BareParams(self.uf)  # bare parameters used as matrices
        # (module, attribute) or a split's own key -> the parts that must keep equal counts
        self.count_ties: Dict[Any, Tuple[List[torch.Tensor], str, int]] = {}
        self.attr_splits: List[Tuple[str, str, List[Optional[str]], List[int]]] = []
        self.slices: List[Tuple[str, int, int, int]] = []
        # buffers an element-wise op applies along the channels
        self.buffers = BufferTables(self.uf, self._scan.free_buffers, self.fresh)
        # autograd key of each output of a known layer's call -> the layer (the walk's)
        self.output_of: Dict[Tuple[Any, int], str] = {}
        # autograd node -> the nodes that read its outputs (filled by walk())
        self.readers: Dict[Any, List[Any]] = {}
        self.wants_location = False

    def producer_of(self, ids: torch.Tensor) -> Optional[str]:
        """The layer whose whole output ``ids`` are (through element-wise ops), or None."""
        if len(ids) == 0:
            return None
        name = next((n for n in self.producers if self.module_out[n] is ids), None)
        if name is None:  # the same ids through an element-wise op: compare representatives
            canon = self.uf.canonical(ids)
            name = next((n for n in self.producers if len(self.module_out[n]) == len(ids)
                         and torch.equal(self.uf.canonical(self.module_out[n]), canon)), None)
        return name

    def picked_dims(self, node, ndim: int) -> set:
        """The dims of ``node``'s output (of ``ndim`` dims) that every op reading it takes
        single positions or equal parts of (``select``, ``unbind``, a split into equal
        parts): q, k and v of a fused projection viewed as ``[..., heads, 3, head_dim]``.
        Empty when any reader does something else."""
        dims = set()
        for r in self.readers.get(node, ()):
            if r.name() not in ("SelectBackward0", "UnbindBackward0", "SplitBackward0"):
                return set()
            try:
                dims.add(ndim_dim(getattr(r, "_saved_dim"), ndim))
            except (AttributeError, RuntimeError, TypeError):
                return set()
        return dims

    def tie_counts(self, key: Any, parts: List[torch.Tensor], what: str) -> None:
        """``parts`` (channel ids of equal length) must lose as many channels each; parts
        under one ``key`` (the attribute that sizes them) are tied across calls."""
        held = self.count_ties.setdefault(key, ([], what, len(self.notes)))[0]
        held.extend(parts)

    def cut_at(self, name: str, sizes: List[int]) -> None:
        """Let the parts of ``sizes`` of layer ``name``'s output be groups of their own."""
        ends = torch.tensor(sizes).cumsum(0).tolist()
        self.cut_bounds.setdefault(name, {0}).update(ends)

    def split_attributes(self, node, sizes: List[int]) -> Optional[Tuple[str, List[Optional[str]]]]:
        """The module that ran split ``node`` (or its parent) and, per part, the integer
        attribute of it that equals the part's size (None where none or several do, or the
        part is one channel): ``qkv.split([self.key_dim, self.key_dim, self.d])``; of several
        equal ones, the one the split's code names (``embed_dim``, not ``split_size``). None when
        no part's size is such an attribute, or the recording did not locate modules."""
        if not self.intervals:
            self.wants_location = True
            return None
        where = _innermost(self.intervals, node._sequence_nr())  # "" for the model itself
        modules = dict(self._scan.named)
        for owner in ((where, where.rpartition(".")[0]) if where else ("",)):
            module = modules.get(owner)
            if module is None:
                continue
            ints = [(a, v) for a, v in module.__dict__.items()
                    if type(v) is int and v > 1 and not a.startswith("_")]
            # where several attributes hold a size, the one the split's own code names
            line = self.operand_shapes.get(("split line", node)) or ""
            names: List[Optional[str]] = []
            for s in sizes:
                hits = [a for a, v in ints if v == s]
                if len(hits) > 1:
                    hits = [a for a in hits if re.search(rf"\.{a}\b", line)]
                names.append(hits[0] if len(hits) == 1 else None)
            if any(n is not None for n in names):
                return owner, names
        return None

    def cut(self, ids: torch.Tensor, sizes: List[int]) -> bool:
        """A split of ``ids`` into parts of ``sizes`` (a list): when ``ids`` are a producing
        layer's whole output and the layer's parent module stores ``sizes`` as a list or tuple
        (``torch.split(self.in_proj(x), self.in_split)``), each part becomes a group of its own
        (build_groups reads the cuts; pruner/attributes.py updates the list): True. False for
        sizes no such module stores, which would not follow a slice."""
        name = self.producer_of(ids)
        if name is None:
            return False
        owner = name.rpartition(".")[0]
        parent = next((m for n, m in self._scan.named if n == owner), None)
        if parent is None or not any(type(v) in (list, tuple) and list(v) == list(sizes)
                                     for v in parent.__dict__.values()):
            return False
        self.cut_at(name, sizes)
        ends = torch.tensor(sizes).cumsum(0).tolist()
        for a in [0] + ends[:-1]:
            self.note(ids[a:a + 1], f"split by {list(sizes)} (stored beside {name}): each part "
                                    f"loses channels of its own")
        return True

    def fresh(self, n: int, fixed_reason: Optional[str] = None) -> torch.Tensor:
        ids = self.uf.new(n)
        if fixed_reason:
            for i in ids.tolist():
                self.protected.setdefault(i, fixed_reason)
        return ids

    def is_model_state(self, t) -> bool:
        """True when ``t`` (a tensor, or its storage's ``data_ptr()``) shares memory with one
        of the model's parameters or buffers."""
        if self._storages is None:
            self._storages = {x.untyped_storage().data_ptr()
                              for x in self._scan.params + self._scan.buffers}
        ptr = t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else t
        return ptr in self._storages

    def protect(self, x, reason: str) -> None:
        if x is None:
            return
        ids = x.ids if isinstance(x, Slots) else x
        for i in ids.tolist():
            self.protected.setdefault(i, reason)

    def note(self, ids: torch.Tensor, text: str) -> None:
        """Describe a tie for the group that will hold ``ids`` (shown by ``print(graph)``)."""
        if len(ids):
            self.notes.append((int(ids.reshape(-1)[0]), text))

    def tie_blocks(self, ids: torch.Tensor, blocks: int, what: str) -> None:
        """Tie position j of every block to position j of the first (equal-size blocks)."""
        if blocks <= 1 or len(ids) % blocks:
            return
        rows = ids.reshape(blocks, -1)
        for r in rows[1:]:
            self.uf.union_all(rows[0], r)
        self.notes.append((int(ids[0]), f"{what}: {blocks} blocks keep the same positions"))


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
    ctx = _Tracer(model, attention, scan)
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
                where = _innermost(intervals, p._sequence_nr())
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
                       [(ids, _innermost(intervals, fn._sequence_nr()))
                        for ids, fn in ctx.fixed_splits],
                       cuts={n: torch.diff(torch.tensor(sorted(b))).tolist()
                             for n, b in ctx.cut_bounds.items()},
                       unwatched=unwatched,
                       count_ties=[t for t in ctx.count_ties.values() if len(t[0]) > 1],
                       attr_splits=ctx.attr_splits, wants_location=ctx.wants_location,
                       param_dims=ctx.bare.dims, param_made=ctx.bare.made,
                       param_read=ctx.bare.read, slices=ctx.slices)


def _reached_inside(call: ModuleCall, visited: set) -> bool:
    """True when the walk met the ops that made ``call``'s outputs although not the outputs
    themselves: an in-place op on an output that is a view (``InstanceNorm`` then
    ``ReLU(inplace=True)``) gives that view a new autograd node."""
    inputs = {k[0] for k in [call.input_key] + [k for k, _ in call.extras] if k is not None}
    for (fn, _), _ in call.outputs:
        if any(f in visited for f, _ in fn.next_functions if f is not None and f not in inputs):
            return True
    return False


def resolve_edges(edges: List[Tuple[Any, str]], junctions: List[frozenset]) -> List[Tuple[str, str]]:
    """Layer-to-layer edges, sorted: every junction (an int) replaced by the layers and
    parameters that reach it. Quadratic in depth for a residual stream, so only on demand."""
    reach: List[frozenset] = []
    for members in junctions:  # a junction's members are names or earlier junctions
        names = set()
        for x in members:
            names.update(reach[x] if isinstance(x, int) else (x,))
        reach.append(frozenset(names))
    out = set()
    for src, dst in edges:
        for name in (reach[src] if isinstance(src, int) else (src,)):
            out.add((name, dst))
    return sorted(out)


def _shape(key, by_out) -> Optional[Tuple[int, ...]]:
    c = by_out.get(key)
    if c is not None:
        return next(s for k, s in c.outputs if k == key)
    fn, nr = key
    try:
        return tuple(fn._input_metadata[nr].shape)
    except (IndexError, RuntimeError):
        return None


def _innermost(intervals, s: int) -> str:
    best = None
    for start, end, name in intervals:
        if start <= s <= end and (best is None or end - start < best[1] - best[0]):
            best = (start, end, name)
    return best[2] if best else ""
