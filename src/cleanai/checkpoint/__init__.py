"""Models larger than memory: trace on the meta device, prune a checkpoint on disk
(:func:`prune_checkpoint`)."""
from .files import CheckpointError, CheckpointReader
from .meta import build_on_meta
from .prune import CheckpointWeightImportance, prune_checkpoint

__all__ = ["prune_checkpoint", "build_on_meta", "CheckpointError", "CheckpointReader",
           "CheckpointWeightImportance"]
