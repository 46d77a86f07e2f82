"""CleanAI: structured pruning for PyTorch."""
from . import importance, recover, utils
from .core import DependencyGraph, Group, Member, TraceError
from .pruner import (LayerPruner, PruningError, PruningPlan, StructuredPruner,
                     register_layer_pruner, replay)
from .utils.save import LoadError, load_pruned, save_pruned
from .checkpoint import CheckpointError, prune_checkpoint
from . import deploy, distributed, train

__version__ = "0.1.0"

__all__ = ["DependencyGraph", "Group", "Member", "TraceError", "LayerPruner", "PruningError",
           "PruningPlan", "StructuredPruner", "register_layer_pruner", "replay", "save_pruned", "load_pruned", "LoadError",
           "prune_checkpoint", "CheckpointError",
           "deploy", "distributed", "importance", "recover", "train", "utils",
           "__version__"]
