"""The state the walk and the op handlers of :mod:`cleanai.core.ops` share while channel ids
are propagated: the union-find, protections, notes, splits and slices found so far, and the
helpers that record them."""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .bare import BareParams
from .buffers import BufferTables
from .ops.base import ndim_dim
from .ops.elementwise import _UNARY
from .record import ModelScan
from .slots import Slots, UnionFind


#: readers that take single positions or equal parts of a dim
_PICKS = ("SelectBackward0", "UnbindBackward0", "SplitBackward0")
#: element-wise ops through which :meth:`WalkContext.picked_dims` looks for such readers
_KEEP_DIMS = frozenset(_UNARY) | {"AddBackward0", "SubBackward0", "MulBackward0",
                                  "DivBackward0", "MeanBackward1", "SumBackward1"}
_MAX_LOOKAHEAD = 64  # nodes: the search stays local, the walk linear
#: attribute names of a head count (pruner/attributes.py updates them too)
HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads", "num_q_heads",
               "num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head", "kv_heads",
               "num_k_heads", "num_v_heads")  # the last two: Gated DeltaNet's


class WalkContext:
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
        self.fixed_parts: set = set()  # ids of split parts no attribute sizes (they keep all)
        self._norm_widths: Optional[set] = None
        self._modules: Optional[Dict[str, Any]] = None  # name -> module, on first use
        self.norm_groups: List[Tuple[str, str]] = []  # (norm module, attribute it groups by)
        self.notes: List[Tuple[int, str]] = []
        # an id of each element-wise op that joined two activations' separate channels: by
        # a product (``x * gate(x)``), or otherwise (``x + f(x)``, ``torch.where``...)
        self.multiplied: List[int] = []
        self.added: List[int] = []
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

    def range_of(self, ids: torch.Tensor) -> Optional[Tuple[str, int, int]]:
        """The layer whose output holds ``ids`` as one run of positions (an earlier split
        took them out of it), with the run's start and the output's length; None where none
        does."""
        if len(ids) == 0:
            return None
        canon = self.uf.canonical(ids)
        for n in reversed(self.producers):  # the owner is usually the latest layer
            if len(self.module_out[n]) <= len(ids):
                continue
            out = self.uf.canonical(self.module_out[n])
            for start in (out == canon[0]).nonzero().flatten().tolist():
                if torch.equal(out[start:start + len(ids)], canon):
                    return n, start, len(out)
        return None

    def picked_dims(self, node, ndim: int) -> Tuple[set, bool]:
        """The dims of ``node``'s output (of ``ndim`` dims) that every op reading it takes
        single positions or equal parts of (``select``, ``unbind``, a split into equal
        parts), directly (q, k and v of a fused projection viewed as ``[..., heads, 3,
        head_dim]``) or through element-wise ops that keep its dims (Gemma 4's per-layer
        inputs, ``[..., layers, width]``, normalised and summed, then one layer's taken by
        each decoder layer); and whether every reader takes single positions (a split into
        parts of several heads does not). Empty when any path ends in something else."""
        dims: set = set()
        single = True
        seen, todo = {node}, [node]
        while todo:
            for r in self.readers.get(todo.pop(), ()):
                name = r.name()
                if name in _PICKS:
                    single = single and (name != "SplitBackward0" or
                                         getattr(r, "_saved_split_size", None) == 1)
                    try:
                        dims.add(ndim_dim(getattr(r, "_saved_dim"), ndim))
                    except (AttributeError, RuntimeError, TypeError):
                        return set(), False
                    continue
                out = r._input_metadata
                if name not in _KEEP_DIMS or len(out) != 1 or len(out[0].shape) != ndim or \
                        len(seen) >= _MAX_LOOKAHEAD:
                    return set(), False
                if r not in seen:
                    seen.add(r)
                    todo.append(r)
        return dims, single

    def tie_counts(self, key: Any, parts: List[torch.Tensor], what: str) -> None:
        """``parts`` (channel ids of equal length) must lose as many channels each; parts
        under one ``key`` (the attribute that sizes them) are tied across calls."""
        held = self.count_ties.setdefault(key, ([], what, len(self.notes)))[0]
        held.extend(parts)

    def cut_at(self, name: str, sizes: List[int]) -> None:
        """Let the parts of ``sizes`` of layer ``name``'s output be groups of their own."""
        ends = torch.tensor(sizes).cumsum(0).tolist()
        self.cut_bounds.setdefault(name, {0}).update(ends)

    def norm_widths(self) -> set:
        """The sizes of the parameters that modules named like a norm hold themselves."""
        if self._norm_widths is None:
            self._norm_widths = {p.numel() for n, m in self._scan.named
                                 if "norm" in type(m).__name__.lower()
                                 for p in m.parameters(recurse=False)}
        return self._norm_widths

    def heads_in(self, ids: torch.Tensor) -> bool:
        """True when some of ``ids`` belong to channels a view made whole heads so far."""
        heads = {self.uf.find(i) for i, kind in self.kinds if kind == "heads"}
        return any(self.uf.find(int(i)) in heads for i in ids.tolist())

    def counts_heads(self, node, n: int) -> Optional[bool]:
        """Whether the module whose forward ran ``node`` holds ``n`` as its head count (an
        int attribute named like one): a view into ``n`` blocks there is into heads. None
        until the recording located modules (then asks for a second one)."""
        if not self.intervals:
            self.wants_location = True
            return None
        _, module = self.module_at(node)
        return module is not None and any(
            type(v) is int and v == n for a, v in vars(module).items() if a in HEAD_COUNTS)

    def module_at(self, node) -> Tuple[str, Any]:
        """The innermost module whose forward ran autograd node ``node`` (the model for none)
        and its name; ``("", None)`` when the recording did not locate modules."""
        if not self.intervals:
            return "", None
        name = innermost(self.intervals, node._sequence_nr())
        return name, self.modules().get(name)

    def modules(self) -> Dict[str, Any]:
        """The model's modules by name."""
        if self._modules is None:
            self._modules = dict(self._scan.named)
        return self._modules

    def split_attributes(self, node, sizes: List[int]
                         ) -> Optional[Tuple[str, List[Optional[str]], bool]]:
        """The module that ran split ``node`` (or its parent) and, per part, the integer
        attribute of it that equals the part's size (None where none or several do, or the
        part is one channel): ``qkv.split([self.key_dim, self.key_dim, self.d])``; of several
        equal ones, the one the split's code names (``embed_dim``, not ``split_size``); and
        whether the call names any of the module's attributes (then only a named one sizes a
        part). None when no part's size is such an attribute, or the recording did not locate
        modules."""
        if not self.intervals:
            self.wants_location = True
            return None
        where = innermost(self.intervals, node._sequence_nr())  # "" for the model itself
        modules = self.modules()
        for owner in ((where, where.rpartition(".")[0]) if where else ("",)):
            module = modules.get(owner)
            if module is None:
                continue
            ints = [(a, v) for a, v in module.__dict__.items()
                    if type(v) is int and v > 1 and not a.startswith("_")]
            # where several attributes hold a size, the one the split's own code names
            line = self.operand_shapes.get(("split line", node)) or ""
            # sizes written out in the call (``[self.d, self.g * self.n]``): only an
            # attribute it names sizes a part, not one that happens to hold the same value
            written = any(re.search(rf"\.{a}\b", line) for a, _ in ints)
            names: List[Optional[str]] = []
            for s in sizes:
                hits = [a for a, v in ints if v == s]
                if len(hits) > 1 or written:
                    hits = [a for a in hits if _named_alone(a, line)]
                names.append(hits[0] if len(hits) == 1 else None)
            if any(n is not None for n in names):
                return owner, names, written
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


def _named_alone(attr: str, line: str) -> bool:
    """True when ``line`` names attribute ``attr`` (``x.attr``) somewhere outside a product
    or quotient: ``self.n_groups * self.state`` sizes a part by both factors, and with one
    group its value is the state size by chance."""
    for m in re.finditer(rf"\b[\w.]*\.{attr}\b", line):
        before, after = line[:m.start()].rstrip(), line[m.end():].lstrip()
        if not before.endswith(("*", "/")) and not after.startswith(("*", "/")):
            return True
    return False


def innermost(intervals, s: int) -> str:
    """The innermost module whose autograd range ``(start, end, name)`` holds node number
    ``s``; "" for none (the model itself)."""
    best = None
    for start, end, name in intervals:
        if start <= s <= end and (best is None or end - start < best[1] - best[0]):
            best = (start, end, name)
    return best[2] if best else ""
