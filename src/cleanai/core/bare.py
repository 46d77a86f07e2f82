"""Bare parameters used as matrices: ``x @ W``, ``F.linear(x, W)``, ``torch.bmm(x, W)``.

A parameter no layer owns gets channel ids on one dim (its last of size > 1) when the walk
meets it. A matrix product that reads it as it is, or through transposes, casts and copies
only, makes it a Linear: the dim the product contracts is tied to the input's channels, the
other dim produces channels of its own (a producer, like a layer's output). Anything else
that reads the same parameter (``W.flip(0)``, a product the other way round) leaves the
second dim protected, since its channels would be pruned under that reader's feet.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from .slots import Shape, Slots, UnionFind

#: ops a bare parameter may pass through on its way into a product and stay itself
_AS_IS = frozenset({"TBackward0", "TransposeBackward0", "TransposeBackward1",
                    "ToCopyBackward0", "AliasBackward0", "CloneBackward0"})


class BareParams:
    """What the walk learns about bare parameters; :class:`~cleanai.core.trace_result.TraceResult`
    keeps ``dims``, ``made`` and ``read``."""

    def __init__(self, uf: UnionFind) -> None:
        self._uf = uf
        # first id of a parameter's slots -> (its name, shape, the dim those ids are on)
        self._entries: Dict[int, Tuple[str, Tuple[int, ...], int]] = {}
        # id() of each parameter's AccumulateGrad node -> the parameter's name
        self._nodes: Dict[int, str] = {}
        # name -> id() of its own node and of the nodes between it and a product or op that
        # followed it (``W.t()``, ``-exp(A_log)``); id() of such a node -> the readers of it
        # that were followed; id() of every node (or module call) -> all its readers: a chain
        # node read by anything not followed is another use of the parameter
        self._chains: Dict[str, set] = {}
        self._chain_readers: Dict[int, set] = {}
        self._node_readers: Dict[int, set] = {}
        #: (name, dim) -> ids of a dim besides the one the walk gave it
        self.dims: Dict[Tuple[str, int], torch.Tensor] = {}
        #: ``"name[dim]"`` -> ids a parameter produces (the columns of ``x @ W``)
        self.made: Dict[str, torch.Tensor] = {}
        #: ``"name[dim]"`` of the dims a product contracts, as a layer's input
        self.read: set = set()

    def register(self, name: str, var: torch.Tensor, node, slots: Slots) -> None:
        """``node`` is the AccumulateGrad of parameter ``name``, whose ids are ``slots``."""
        self._entries[int(slots.ids[0])] = (name, tuple(var.shape), slots.dim)
        self._nodes[id(node)] = name

    def note_readers(self, reader: int, nodes) -> None:
        """``reader`` (an ``id()``) takes the outputs of ``nodes`` as its inputs."""
        for node in nodes:
            self._node_readers.setdefault(id(node), set()).add(reader)

    def operand(self, x: Slots, shape) -> Optional[Tuple[str, List[int]]]:
        """For ``x``, a bare parameter used as it is or with its last two dims swapped
        (``W.t()``): its name and, per dim of ``x``, the parameter's dim. None for anything
        else (a reshape, a layer's weight, an activation)."""
        entry = self._entries.get(int(x.ids[0])) if x.weight and len(x.ids) else None
        if entry is None or shape is None:
            return None
        name, pshape, pdim = entry
        shape, n = tuple(shape), len(pshape)
        order = list(range(n))
        if shape == pshape and x.dim == pdim:
            return name, order
        if n >= 2:
            order[-2:] = [n - 1, n - 2]
            if shape == tuple(pshape[d] for d in order) and order[x.dim] == pdim:
                return name, order
        return None

    def used_as_is(self, name: str, product, node) -> bool:
        """True when ``node`` (an operand of ``product``) is parameter ``name`` itself,
        reached through transposes, casts and copies only; that use is noted as followed."""
        return self._follow(name, product, node, _AS_IS)

    def _follow(self, name: str, reader, node, through: frozenset) -> bool:
        """Walk from ``node`` (read by ``reader``) to parameter ``name`` through ops in
        ``through`` with one input each; True when it gets there, and the way is noted as
        followed (:meth:`protect_other_uses` checks that nothing else reads it)."""
        chain = []
        for _ in range(16):
            if node is None:
                return False
            found = self._nodes.get(id(node))
            if found is not None:
                if found != name:
                    return False
                for n, r in chain + [(node, reader)]:
                    self._chains.setdefault(name, set()).add(id(n))
                    self._chain_readers.setdefault(id(n), set()).add(id(r))
                return True
            fns = [f for f, _ in node.next_functions if f is not None]
            if node.name() not in through or len(fns) != 1:
                return False
            chain.append((node, reader))
            reader, node = node, fns[0]
        return False

    def product(self, a: Optional[Slots], b: Slots, sb: Shape, no: int, name: str,
                order: List[int]) -> Slots:
        """``a @ b`` with ``b`` parameter ``name`` (``order``: its dim per dim of ``b``) and
        ``no`` output dims: the contracted dim joins ``a``'s channels, the other makes the
        output's."""
        nb = len(sb)
        kb, nd = nb - 2, nb - 1
        if b.dim == nd:  # the ids the parameter was given are its output dim's
            k_ids = self._dim_ids(name, order[kb], sb[kb]) if a is not None else None
            out_ids = b.ids
            self.made.setdefault(f"{name}[{order[nd]}]", out_ids)
        else:  # they are its contracted dim's
            k_ids = b.ids
            out_ids = self._dim_ids(name, order[nd], sb[nd])
            self.made.setdefault(f"{name}[{order[nd]}]", out_ids)
        if a is not None:
            self._uf.union_all(a.ids, k_ids)
            self.read.add(f"{name}[{order[kb]}]")
        return Slots(no - 1, out_ids)

    def bind(self, x: Slots, shape: Shape, k: int, ids: torch.Tensor, reader, node,
             through: frozenset) -> bool:
        """Tie dim ``k`` of ``x`` (of shape ``shape``), a bare parameter's value, to channels
        ``ids`` of the op ``reader`` it meets there (Mamba's ``A[None, :, None, :] * dt[..., None]``
        ties ``A_log``'s first dim to ``dt``'s channels); True when done.

        ``node`` is the operand's autograd node: the parameter must be reached from it through
        ops in ``through`` only (element by element, size-1 dims added or dropped), so the
        operand's dims of size > 1 are the parameter's, in order. The parameter is then sliced
        along that dim with the channels; another reader keeps the dim whole
        (:meth:`protect_other_uses`)."""
        entry = self._entries.get(int(x.ids[0])) if x.weight and len(x.ids) else None
        if entry is None or shape is None:
            return False
        name, pshape, pdim = entry
        xs = [d for d, n in enumerate(shape) if n != 1]
        ps = [d for d, n in enumerate(pshape) if n != 1]
        if [shape[d] for d in xs] != [pshape[d] for d in ps] or k not in xs or x.dim not in xs:
            return False
        dim = ps[xs.index(k)]
        if ps[xs.index(x.dim)] != pdim or dim == pdim or pshape[dim] != len(ids):
            return False
        if not self._follow(name, reader, node, through):
            return False
        self._uf.union_all(ids, self._dim_ids(name, dim, len(ids)))
        return True

    def _dim_ids(self, name: str, dim: int, n: int) -> torch.Tensor:
        ids = self.dims.get((name, dim))
        if ids is None:
            ids = self.dims[(name, dim)] = self._uf.new(n)
        return ids

    def protect_other_uses(self, protect: Callable[[torch.Tensor, str], None]) -> None:
        """A parameter whose second dim a product made prunable but that something else also
        reads keeps that dim (and the dims it produces)."""
        for name, chain in self._chains.items():
            if not any(self._node_readers.get(n, set()) - self._chain_readers[n]
                       for n in chain):
                continue
            why = f"a dim of {name}, which is also read outside a matrix product"
            for (pname, _), ids in self.dims.items():
                if pname == name:
                    protect(ids, why)
            for key, ids in self.made.items():
                if key.startswith(name + "["):
                    protect(ids, why)
