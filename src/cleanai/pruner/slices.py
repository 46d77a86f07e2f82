"""Checking, in a pruned forward, the slices the trace took of a layer's whole output.

Phi-3 reads one fused projection as q, k and v: ``qkv[..., :q_pos]``, ``qkv[..., q_pos:q_pos +
kv_size]`` and ``qkv[..., q_pos + kv_size:]``, with bounds the attention computes from its head
counts. The trace makes each part channels of its own (ops/shape.py); whether the bounds then
follow the counts each part keeps, no trace can tell: ``qkv[..., :16]`` written in the code
would not, and would read the wrong channels without failing. So every forward of a pruned
model that has such slices watches them (:class:`watched_slices`): a view of the layer's
output narrowed along the sliced dim must begin and end where some part begins and ends
after the step, and every part must be read. Otherwise the forward fails with
:class:`SliceMoved`, raised where the slice was taken (the line of code is in the warning),
the step is rolled back, and the fallback protects the groups whose removal moved the
bounds (pruner/fallback.py).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.graph import DependencyGraph

Key = Tuple[str, str, int]


class SliceMoved(RuntimeError):
    """A slice of a layer's output no longer takes the positions of the part it took."""


def new_bounds(graph: DependencyGraph, keeps: Dict[Key, torch.Tensor]
               ) -> Dict[str, Tuple[int, List[Tuple[int, int]]]]:
    """Per layer whose output was sliced: the dim and each slice's ``(start, end)`` once
    ``keeps`` (from ``layer_keeps``) are sliced in; only layers whose output loses positions."""
    out: Dict[str, Tuple[int, List[Tuple[int, int]]]] = {}
    for layer, dim, start, end in graph.slices:
        keep = next((k for (n, kind, _), k in keeps.items() if n == layer and kind == "out"),
                    None)
        if keep is None:
            continue
        below = lambda b: int((keep < b).sum())  # noqa: E731 kept positions before b
        out.setdefault(layer, (dim, []))[1].append((below(start), below(end)))
    return out


def renumber_slices(graph: DependencyGraph, keeps: Dict[Key, torch.Tensor]) -> None:
    """Move the graph's slice bounds to the pruned widths (after a step is applied)."""
    moved = {layer: iter(b) for layer, (_, b) in new_bounds(graph, keeps).items()}
    for s in graph.slices:
        if s[0] in moved:
            s[2], s[3] = next(moved[s[0]])


class watched_slices(TorchFunctionMode):
    """``with watched_slices(model, graph, keeps): model(x)`` raises :class:`SliceMoved` when
    a slice of a watched layer's output is taken at bounds no part of it has after the step
    (see module doc), or, on leaving, when a part was never read. Does nothing for a graph
    without such slices."""

    _NARROWING = {"__getitem__", "narrow"}

    def __init__(self, model: nn.Module, graph: DependencyGraph,
                 keeps: Dict[Key, torch.Tensor]) -> None:
        super().__init__()
        self.bounds = new_bounds(graph, keeps)
        self.layers = {n: model.get_submodule(n) for n in self.bounds}
        # per watched layer, the tensors of every call (a slice may read an earlier one)
        self.outputs: Dict[str, List[torch.Tensor]] = {}
        self.seen: set = set()
        self.handles: List[Any] = []

    def __enter__(self):
        if not self.bounds:
            return self
        for name, layer in self.layers.items():
            self.handles.append(layer.register_forward_hook(self._hook(name)))
        return super().__enter__()

    def __exit__(self, exc_type, exc, tb):
        if not self.bounds:
            return False
        for h in self.handles:
            h.remove()
        super().__exit__(exc_type, exc, tb)
        if exc_type is None:
            missing = [(n, b) for n, (_, bs) in self.bounds.items() for b in bs
                       if (n, b) not in self.seen]
            if missing:
                name, (a, b) = missing[0]
                raise SliceMoved(f"no slice read positions [{a}:{b}] of {name}'s output, "
                                 f"the part a slice took before the step: the bounds the code "
                                 f"computes did not follow the counts each part kept")
        return False

    def _hook(self, name: str):
        def record(module, args, output):
            tensors = (output,) if isinstance(output, torch.Tensor) else \
                output if isinstance(output, (tuple, list)) else ()
            # a recurrent layer's (output, state)
            self.outputs.setdefault(name, []).extend(
                t for t in tensors if isinstance(t, torch.Tensor))
        return record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if self.outputs and isinstance(result, torch.Tensor) and result._base is not None:
            self._check(func, result)
        return result

    def _check(self, func, view: torch.Tensor) -> None:
        for name, out in ((n, t) for n, ts in self.outputs.items() for t in ts):
            if view._base is not out and (out._base is None or view._base is not out._base):
                continue
            dim, parts = self.bounds[name]
            at = _narrowed(out, view, dim)
            if at is None:
                continue
            if at in parts:
                self.seen.add((name, at))
            elif getattr(func, "__name__", "") in self._NARROWING:
                raise SliceMoved(
                    f"the slice [{at[0]}:{at[1]}] of {name}'s output does not take a part it "
                    f"took before the step (now at {', '.join(f'[{a}:{b}]' for a, b in parts)}): "
                    f"its bounds do not follow the counts each part kept")


def _narrowed(out: torch.Tensor, view: torch.Tensor, dim: int) -> Optional[Tuple[int, int]]:
    """``(start, end)`` when ``view`` is ``out`` narrowed along ``dim`` to a strict part."""
    if view.dim() != out.dim() or view.stride() != out.stride() or dim >= out.dim():
        return None
    if any(a != b for i, (a, b) in enumerate(zip(view.shape, out.shape)) if i != dim):
        return None
    if view.shape[dim] == out.shape[dim] or out.stride(dim) == 0:
        return None
    offset = view.storage_offset() - out.storage_offset()
    start, rest = divmod(offset, out.stride(dim))
    if rest or start < 0:
        return None
    return start, start + view.shape[dim]
