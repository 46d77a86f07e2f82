"""What a trace finds (:class:`TraceResult`: the channel ids of every layer dim, bare
parameters, protections, splits and slices), and its layer-to-layer edges resolved on demand."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .slots import Slots, UnionFind


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
    # (norm module, its int attribute): a grouped norm over heads whose group size follows
    norm_groups: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
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
    #: an id of each element-wise op that joined two activations' separate channels, by a
    #: product (``multiplied``) or otherwise (``added``): a width joined by products alone
    #: (a gate, Mamba's inner width) is no residual stream
    multiplied: List[int] = dataclasses.field(default_factory=list)
    added: List[int] = dataclasses.field(default_factory=list)


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
