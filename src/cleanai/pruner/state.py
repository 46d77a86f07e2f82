"""A pruner's progress and dense reference as plain data, and the checks that a state is
loaded into a pruner built as the one it was saved from (:meth:`StructuredPruner.state_dict`).

The model itself is saved with :func:`cleanai.save_pruned` and rebuilt at its pruned widths by
:func:`cleanai.load_pruned`. A :class:`~cleanai.StructuredPruner` built over the reloaded
model traces the same groups at the same widths, but it measures its reference (the widths
that ratios are fractions of, the MACs and parameters a budget is a fraction of) on the model
it is given: these are restored from the state, so the rest of the schedule is planned as in
an uninterrupted run.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Dict, List

from ..core.graph import DependencyGraph
from .history import get_history

if TYPE_CHECKING:  # pragma: no cover
    from .structured import StructuredPruner

__all__ = ["group_keys", "check_groups", "pruner_config", "pruner_state", "check_pruner_state",
           "load_pruner_state"]


def group_keys(graph: DependencyGraph) -> List[List[str]]:
    """Per group, in the graph's order: where its channels live (``"conv1:out:-1"``...).
    The same model traced at the same widths gives the same keys."""
    return [[f"{m.name}:{m.kind}:{m.dim}" for m in g.members] for g in graph.groups]


def check_groups(graph: DependencyGraph, saved: List[Dict[str, Any]], what: str) -> None:
    """Raise ``ValueError`` unless ``graph`` has the saved groups (members and current sizes)."""
    keys = group_keys(graph)
    if len(keys) != len(saved) or any(k != s["members"] for k, s in zip(keys, saved)):
        first = next((i for i, (k, s) in enumerate(zip(keys, saved)) if k != s["members"]),
                     min(len(keys), len(saved)))
        mine = ", ".join(keys[first]) if first < len(keys) else "nothing"
        theirs = ", ".join(saved[first]["members"]) if first < len(saved) else "nothing"
        raise ValueError(f"this {what} state was saved from another model: group {first} "
                         f"there holds {theirs}, here {mine} ({len(saved)} groups there, "
                         f"{len(keys)} here)")
    for i, (g, s) in enumerate(zip(graph.groups, saved)):
        if g.size != s["size"]:
            raise ValueError(f"this {what} state was saved when group {i} ({s['members'][0]}, "
                             f"...) had {s['size']} channels; the model here has {g.size}. "
                             f"Rebuild the model at its saved widths with "
                             f"cleanai.load_pruned(Model(), path) before building the pruner")


def pruner_config(pruner: "StructuredPruner") -> Dict[str, Any]:
    """The settings that decide what a pruner's steps reach: a state saved under other
    settings would continue another schedule."""
    return {
        "pruning_ratio": pruner.pruning_ratio,
        "layer_pruning_ratios": dict(sorted(pruner.layer_ratios.items())),
        "ignored_layers": sorted(pruner.ignored),
        "max_pruning_ratio": float(pruner.max_pruning_ratio),
        "round_to": pruner.round_to,
        "global_pruning": bool(pruner.global_pruning),
        "iterative_steps": pruner.iterative_steps,
        "allocation": None if pruner.allocation is None else type(pruner.allocation).__name__,
        "kinds": sorted(pruner.kinds),
        "targets": [[t.metric, t.fraction, t.absolute] for t in pruner.targets],
    }


def pruner_state(pruner: "StructuredPruner") -> Dict[str, Any]:
    """The pruner's progress and its dense reference, as plain data."""
    record = get_history(pruner.model)
    cm = pruner.cost_model
    return {
        "config": pruner_config(pruner),
        "current_step": pruner.current_step,
        "groups": [{"members": k, "size": g.size, "original_size": pruner.original_size[g.id]}
                   for k, g in zip(group_keys(pruner.graph), pruner.graph.groups)],
        "dense": None if cm is None else {"macs": cm.dense.macs, "params": cm.dense.params},
        "dense_latency": pruner._dense_latency,
        "history": len(pruner.history),
        "model_steps": len(record["steps"]) if record else 0,
    }


def check_pruner_state(pruner: "StructuredPruner", state: Dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``state`` was saved from a pruner with ``pruner``'s
    settings, over this model at its current widths and history."""
    config = pruner_config(pruner)
    for key, theirs in state["config"].items():
        mine = config.get(key)
        if _plain(mine) != _plain(theirs):
            raise ValueError(f"this state was saved for a pruner with {key}={theirs!r}; this "
                             f"one has {key}={mine!r}: build the StructuredPruner with the "
                             f"settings of the run you resume")
    check_groups(pruner.graph, state["groups"], "pruner")
    record = get_history(pruner.model)
    steps = record["steps"] if record else []
    if len(steps) != state["model_steps"]:
        raise ValueError(f"the model carries {len(steps)} pruning step(s) in its history; it "
                         f"had {state['model_steps']} when this state was saved: reload the "
                         f"model saved with it (cleanai.load_pruned)")


def load_pruner_state(pruner: "StructuredPruner", state: Dict[str, Any]) -> None:
    """Restore a pruner's progress and dense reference from a checked ``state``
    (:func:`check_pruner_state`)."""
    record = get_history(pruner.model)
    steps = record["steps"] if record else []
    pruner.original_size = {g.id: s["original_size"]
                            for g, s in zip(pruner.graph.groups, state["groups"])}
    if pruner.cost_model is not None:
        from ..budget.cost import Cost

        pruner.cost_model.dense = Cost(float(state["dense"]["macs"]),
                                       float(state["dense"]["params"]))
    pruner._dense_latency = state["dense_latency"]
    pruner.current_step = int(state["current_step"])
    n = int(state["history"])
    pruner.history = copy.deepcopy(steps[len(steps) - n:]) if n else []


def _plain(value: Any) -> Any:
    """Tuples as lists: values compare after a round trip through JSON."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
