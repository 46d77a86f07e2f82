"""Why a model cannot lose channels: the largest protected groups and their reasons, for the
warning a user gets when pruning would leave the model unchanged."""
from __future__ import annotations

from typing import List

from ..core.graph import Group


def describe_group(group: Group) -> str:
    """``3 (16 channels: stem and 3 more layers)``."""
    layers = list(dict.fromkeys(m.name for m in group.members))
    first = next((m.name for m in group.members if m.kind == "out"), layers[0] if layers else "")
    more = len(layers) - 1
    tail = f" and {more} more layer{'s' if more > 1 else ''}" if more > 0 else ""
    return f"{group.id} ({group.size} channels: {first}{tail})"


def protection_summary(groups: List[Group], top: int = 3) -> str:
    """The ``top`` largest protected groups with their main reasons, model outputs last (they
    are never pruned, so they explain nothing unless nothing else is protected)."""
    hit = [g for g in groups if bool(g.protected.any())]
    if not hit:
        return "no group is protected"
    only_output = lambda g: set(g.reasons) <= {"model output"}  # noqa: E731
    hit.sort(key=lambda g: (only_output(g), -int(g.protected.sum()), g.id))
    parts = []
    for g in hit[:top]:
        reasons = sorted(g.reasons.items(), key=lambda kv: -kv[1])
        said = "; ".join(f"{n} {why}" for why, n in reasons[:2])
        if len(reasons) > 2:
            said += f"; {len(reasons) - 2} more reasons"
        parts.append(f"group {describe_group(g)}: {said}")
    rest = len(hit) - top
    more = f"; and {rest} more protected group{'s' if rest > 1 else ''}" if rest > 0 else ""
    return " | ".join(parts) + more


def unchanged_message(model_name: str, groups: List[Group]) -> str:
    """The warning for a model that has no channel left to prune."""
    return (f"{model_name} has no channels CleanAI can prune (no group outside the model's "
            f"outputs and protected channels); pruning will leave it unchanged. The largest "
            f"protected groups: {protection_summary(groups)}. print(pruner.graph) lists every "
            f"group and why it is protected")
