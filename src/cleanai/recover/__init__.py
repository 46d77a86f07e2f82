"""Recovery: a pruned model that works before anyone retrains it.

Closed-form compensation happens inside a pruning step (``StructuredPruner(compensate=...)``);
after it, :func:`reconstruct` refits each layer or block to the dense model's outputs on a few
calibration batches, and :func:`distill` trains the whole model against the dense one. Both
change values only: the pruning history still replays and :func:`cleanai.save_pruned` holds.
"""
from ..pruner.compensate import CompensationReport
from ..utils.fidelity import fidelity
from .common import RecoveryError, check_pair, kept_indices
from .distillation import DistillationReport, distill
from .reconstruction import ReconstructionReport, reconstruct

__all__ = ["reconstruct", "distill", "fidelity", "ReconstructionReport", "DistillationReport",
           "CompensationReport", "RecoveryError", "check_pair", "kept_indices"]
