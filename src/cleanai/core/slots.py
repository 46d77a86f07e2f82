"""Channel slots: integer ids for channels, tied together with a union-find.

Every channel the tracer meets gets an id. Ops that say "channel i here is channel i there" tie
two ids together; the connected sets are the removable units. A tensor is described by a
:class:`Slots` value: the one dim that carries channel ids, and the id of each position on it.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import torch

Shape = Tuple[int, ...]


_ONE = array("q", [1])


def _roots_of(parent: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The root of each id (pointer jumping); compresses the paths it walked."""
    r = parent[ids]
    while True:
        nxt = parent[r]
        if torch.equal(nxt, r):
            break
        r = nxt
    parent[ids] = r
    return r


class UnionFind:
    """Union-find over integer ids, with path halving and union by size."""

    def __init__(self) -> None:
        # machine integers, so that roots() reads them as a tensor without a per-id conversion
        self.parent = array("q")
        self.size = array("q")

    def new(self, n: int) -> torch.Tensor:
        """Create ``n`` fresh ids and return them as a 1-D LongTensor."""
        start = len(self.parent)
        ids = torch.arange(start, start + n, dtype=torch.long)
        if n > 0:  # written through a tensor view: an int-by-int extend costs ten times more
            self.parent.frombytes(bytes(8 * n))
            view = torch.frombuffer(self.parent, dtype=torch.int64, offset=8 * start, count=n)
            view.copy_(ids)
            del view  # the array cannot grow while a view of it is alive
            self.size.extend(_ONE * n)
        return ids

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def union_all(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Union ``a[i]`` with ``b[i]`` for every i (tensors of equal length).

        Vectorised when no root takes part in two of the unions (a residual add of two
        tensors of distinct channels: every pair links two separate sets); id by id
        otherwise."""
        if a is b or torch.equal(a, b):
            return
        n = len(self.parent)
        parent = torch.frombuffer(self.parent, dtype=torch.int64, count=n)
        size = torch.frombuffer(self.size, dtype=torch.int64, count=n)
        ra, rb = _roots_of(parent, a.reshape(-1)), _roots_of(parent, b.reshape(-1))
        apart = ra != rb
        ra, rb = ra[apart], rb[apart]
        both = torch.cat([ra, rb])
        if len(both) and torch.unique(both).numel() == len(both):
            swap = size[ra] < size[rb]
            keep, link = torch.where(swap, rb, ra), torch.where(swap, ra, rb)
            parent[link] = keep
            size[keep] += size[link]
            ra = rb = ra[:0]
        del parent, size  # the arrays cannot grow while a view of them is alive
        for x, y in zip(ra.tolist(), rb.tolist()):
            self.union(x, y)

    def roots(self) -> torch.Tensor:
        """The representative of every id, as one LongTensor (pointer jumping, vectorised)."""
        if not self.parent:
            return torch.zeros(0, dtype=torch.long)
        parent = torch.frombuffer(self.parent, dtype=torch.int64).clone()
        while True:
            nxt = parent[parent]
            if torch.equal(nxt, parent):
                return parent
            parent = nxt

    def canonical(self, ids: torch.Tensor) -> torch.Tensor:
        """Replace every id by its representative."""
        return torch.tensor([self.find(i) for i in ids.reshape(-1).tolist()],
                            dtype=torch.long).reshape(ids.shape)


@dataclass(frozen=True)
class Slots:
    """The channel ids a tensor carries: ``ids[j]`` is the id of position j along ``dim``.

    ``dim`` is non-negative and ``len(ids) == shape[dim]`` of the tensor it describes.
    A tensor that carries no channel ids is described by ``None`` instead.
    ``weight`` is True when the tensor is computed from parameters alone (a layer scale,
    ``pos.view(1, C, 1, 1)``, ``layer.weight.t()``): the tracer sets it from the data flow,
    so it survives any op, whatever ids tensor a handler builds.
    """

    dim: int
    ids: torch.Tensor
    weight: bool = field(default=False, compare=False)

    def moved(self, dim: int) -> "Slots":
        return Slots(dim, self.ids)


def reshape_blocks(a: Shape, b: Shape) -> List[Tuple[int, int, int, int]]:
    """Split a reshape from shape ``a`` to shape ``b`` into blocks of equal element count.

    Returns ``(i0, i1, j0, j1)``: input dims ``a[i0:i1]`` hold the same elements as output dims
    ``b[j0:j1]``. Returns an empty list when the shapes do not reshape into one another.
    """
    if _prod(a) != _prod(b) or _prod(a) == 0:
        return []
    blocks = []
    i = j = 0
    while i < len(a) or j < len(b):
        i0, j0 = i, j
        pa = pb = 1
        if i < len(a):
            pa *= a[i]
            i += 1
        if j < len(b):
            pb *= b[j]
            j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                pb *= b[j]
                j += 1
            else:
                return []
        blocks.append((i0, i, j0, j))
    return blocks


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out
