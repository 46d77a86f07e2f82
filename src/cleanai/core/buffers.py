"""Model buffers an element-wise op applies along the channels: a sinusoidal position table
added to the hidden states (``x + self.pe[:n]``), a fixed per-channel gain.

The trace's recorder (:class:`~cleanai.core.operands.OperandRecorder`) notes each such use of
a buffer outside the known layers, and every other read of it. When the walk meets a use,
the buffer's dim that runs whole along the channels (same size and stride) joins them, and
is sliced with them as a bare parameter's is. After the walk, a buffer stays only when every
recorded use of it was followed so, on one dim, and nothing else read it; otherwise the
channels it met are protected and it is never sliced.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import torch

from .slots import Slots, UnionFind


class BufferTables:
    """What the walk learns about buffers applied along the channels."""

    def __init__(self, uf: UnionFind, buffers: Dict[str, torch.Tensor],
                 fresh: Callable[[int], torch.Tensor]) -> None:
        self._uf, self._buffers, self._fresh = uf, buffers, fresh
        #: ``grad_fn`` -> ``{operand index: (buffer name, the operand)}``, from the recorder
        self.operands: Dict[Any, Dict[int, Tuple[str, torch.Tensor]]] = {}
        self._reads: set = set()  # buffers some other call read
        self._slots: Dict[str, Slots] = {}
        self._hits: Dict[str, int] = {}  # uses member() followed, per buffer

    def recorded(self, watched) -> None:
        """Take the uses the recorder saw."""
        self.operands = getattr(watched, "buffer_operands", {})
        self._reads = getattr(watched, "buffer_reads", set())

    def member(self, name: str, view: torch.Tensor, k: int, ids: torch.Tensor) -> bool:
        """Buffer ``name``, through ``view`` whose dim ``k`` runs along the channels ``ids``,
        joins them (see module doc). False (the caller protects) when no single dim of it
        matches, it is read anywhere else, or another use tied another of its dims."""
        buf = self._buffers.get(name)
        if buf is None or name in self._reads or k >= view.dim() or view.shape[k] != len(ids):
            return False
        hits = [j for j in range(buf.dim()) if buf.shape[j] == view.shape[k] > 1
                and buf.stride(j) == view.stride(k)]
        if len(hits) != 1:
            return False
        held = self._slots.get(name)
        if held is None:
            held = self._slots[name] = Slots(hits[0], self._fresh(buf.shape[hits[0]]), True)
        elif held.dim != hits[0]:
            return False
        self._uf.union_all(held.ids, ids)
        self._hits[name] = self._hits.get(name, 0) + 1
        return True

    def settle(self, protect: Callable[[torch.Tensor, str], None]) -> Dict[str, Slots]:
        """The buffers that join the groups, by name; ``protect`` the channels of the others."""
        uses: Dict[str, int] = {}
        for operands in self.operands.values():
            for name, _ in operands.values():
                uses[name] = uses.get(name, 0) + 1
        kept = {}
        for name, held in self._slots.items():
            if name in self._reads or self._hits.get(name) != uses.get(name):
                protect(held.ids, f"buffer {name}, also used where it cannot be sliced with "
                                  f"these channels")
            else:
                kept[name] = held
        return kept
