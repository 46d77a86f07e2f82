"""Model outputs pruned on request: ``StructuredPruner(prune_outputs=...)``.

A model's outputs are protected by default: their width is the model's contract with its
callers. A backbone whose outputs feed a head the user will retrain or replace (a timm
``features_only`` model, a detector's FPN inputs, a classifier whose last Linear is to be
replaced) may opt in, for every output or for the outputs of named layers.
"""
from __future__ import annotations

from typing import Any, Iterable, List, Mapping, Set, Union

from torch import nn

from ..core.graph import DependencyGraph, Group
from ..core.groups import release_outputs
from .references import LayerNames

#: the members through which a layer produces a group's channels
PRODUCING = ("out", "same", "internal")


def free_outputs(model: nn.Module, graph: DependencyGraph,
                 prune_outputs: Union[bool, Iterable[Any]],
                 layer_ratios: Mapping[str, float]) -> List[Group]:
    """Free the model-output channels the user asked to prune: every output for
    ``prune_outputs=True``; for a list of layers (modules or names, a container meaning every
    layer inside it), the outputs those layers produce; and the outputs of a layer named
    exactly in ``layer_pruning_ratios`` (``layer_ratios``, by name). Returns the groups
    freed."""
    if isinstance(prune_outputs, bool):
        everything, scopes = prune_outputs, set()
    else:
        if isinstance(prune_outputs, (str, nn.Module)):
            prune_outputs = [prune_outputs]
        try:
            refs = list(prune_outputs)
        except TypeError:
            raise TypeError(f"prune_outputs must be True, False or a list of layers (modules "
                            f"or qualified names), got {prune_outputs!r}") from None
        names = LayerNames(model)
        everything, scopes = False, {names.resolve(r, "prune_outputs") for r in refs}
    exact: Set[str] = {k for k in layer_ratios if k}
    if not everything and not scopes and not exact:
        return []

    def chosen(g: Group) -> bool:
        if everything:
            return True
        producers = [m.name for m in g.members if m.kind in PRODUCING]
        return any(p in exact or _inside(p, scopes) for p in producers)

    return release_outputs(graph.groups, chosen)


def _inside(layer: str, scopes: Set[str]) -> bool:
    if not scopes:
        return False
    if "" in scopes or layer in scopes:
        return True
    parts = layer.split(".")
    return any(".".join(parts[:i]) in scopes for i in range(1, len(parts)))
