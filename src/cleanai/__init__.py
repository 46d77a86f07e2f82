"""CleanAI: structured pruning for PyTorch."""
from . import importance, utils
from .core import DependencyGraph, Group, Member, TraceError
from .pruner import (LayerPruner, PruningError, PruningPlan, StructuredPruner,
                     register_layer_pruner, replay)

__version__ = "0.1.0"

__all__ = ["DependencyGraph", "Group", "Member", "TraceError", "LayerPruner", "PruningError",
           "PruningPlan", "StructuredPruner", "register_layer_pruner", "replay", "importance", "utils",
           "__version__"]
