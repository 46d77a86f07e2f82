"""Models larger than memory: trace on the meta device, prune a checkpoint on disk
(:func:`prune_checkpoint`)."""
from .files import CheckpointError, CheckpointReader
from .prune import CheckpointWeightImportance, prune_checkpoint

__all__ = ["prune_checkpoint", "CheckpointError", "CheckpointReader",
           "CheckpointWeightImportance"]
