"""PruningPlan: which channels leave each group, inspectable before anything changes."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List

import torch

from ..core.graph import DependencyGraph
from .apply import copy_model, layer_keeps, slice_model, validate_removals
from .attributes import attribute_updates, set_attributes


@dataclasses.dataclass
class PruningPlan:
    """For each group id, the (current) channel indices to remove.

    Build one with :meth:`StructuredPruner.plan` or by hand; apply it with
    :meth:`StructuredPruner.apply`. ``summary()`` prints it, ``impact()`` previews its effect.
    """

    graph: DependencyGraph
    removals: Dict[int, torch.Tensor]
    step: int = 1
    #: with a budget: the targets and what the plan reaches (a ``BudgetResult``)
    budget: Any = None
    #: each group's size when the plan was made (the summary stays right after apply)
    sizes: Dict[int, int] = dataclasses.field(default_factory=dict, init=False, repr=False)
    #: the model outputs the plan narrows (only with ``prune_outputs``): one
    #: ``{"layer", "before", "after"}`` per group, counting its output channels
    outputs: List[Dict[str, Any]] = dataclasses.field(default_factory=list, init=False,
                                                      repr=False)

    def __post_init__(self) -> None:
        self.removals = {int(g): torch.as_tensor(idx, dtype=torch.long).flatten().sort().values
                         for g, idx in self.removals.items()}
        by_id = {g.id: g for g in self.graph.groups}
        for gid, idx in self.removals.items():
            g = by_id.get(gid)
            if g is None:
                continue  # validate() says so
            self.sizes[gid] = g.size
            if g.outputs is None or not idx.numel():
                continue
            idx = idx[(idx >= 0) & (idx < g.size)]
            lost = int(g.outputs[idx].sum())
            if lost:
                n = int(g.outputs.sum())
                self.outputs.append({"layer": _first_layer(g), "before": n, "after": n - lost})

    @property
    def num_removed(self) -> int:
        """Channels removed over all groups."""
        return sum(len(idx) for idx in self.removals.values())

    def validate(self) -> None:
        """Raise :class:`PruningError` if the plan cannot be applied to its graph."""
        validate_removals(self.graph, self.removals)

    def layer_changes(self) -> List[Dict[str, Any]]:
        """Per layer dim: ``{"name", "kind", "before", "after"}`` channel counts."""
        keeps = layer_keeps(self.graph, self.removals)
        lengths = {}
        for g in self.graph.groups:
            for m in g.members:
                for kind in (("in", "out") if m.kind == "same" else (m.kind,)):
                    lengths[(m.name, kind, m.dim)] = m.length
        return [{"name": n, "kind": k if k != "param" else f"param dim {d}",
                 "before": lengths[(n, k, d)], "after": len(keep)}
                for (n, k, d), keep in keeps.items()]

    def summary(self) -> str:
        """A table: one row per group that loses channels."""
        by_id = {g.id: g for g in self.graph.groups}
        rows = [("group", "first layer", "channels", "removed")]
        for gid, idx in sorted(self.removals.items()):
            if not len(idx):
                continue
            g = by_id[gid]
            size = self.sizes.get(gid, g.size)
            rows.append((str(gid), _first_layer(g), f"{size} -> {size - len(idx)}",
                         str(len(idx))))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"PruningPlan(step {self.step}: {self.num_removed} channels from "
                 f"{len(rows) - 1} groups)"]
        if self.budget is not None:
            lines.append("  " + self.budget.summary())
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if self.outputs:
            lines.append("  model outputs narrowed on request: " + ", ".join(
                f"{o['layer']} {o['before']} -> {o['after']}" for o in self.outputs))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def impact(self, model: torch.nn.Module, example_inputs: Any = None) -> Dict[str, int]:
        """Params and MACs before and after the plan, measured on a copy of ``model``."""
        from ..utils.counting import count_macs, count_params

        self.validate()
        inputs = self.graph.example_inputs if example_inputs is None else example_inputs
        after = copy_model(model)
        keeps = layer_keeps(self.graph, self.removals)
        slice_model(after, keeps)
        set_attributes(after, attribute_updates(model, self.graph, self.removals, keeps))
        fn = self.graph.forward_fn
        return {"params_before": count_params(model), "params_after": count_params(after),
                "macs_before": count_macs(model, inputs, fn), "macs_after": count_macs(after, inputs, fn)}


def _first_layer(group: Any) -> str:
    """The group's first producing layer (its first member when none produces it)."""
    return next((m.name for m in group.members if m.kind == "out"),
                group.members[0].name if group.members else "?")
