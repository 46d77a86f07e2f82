"""Channel importance: how much each channel of a group matters.

Data-free: :class:`WeightImportance`, :class:`RandomImportance`. Data-dependent (call
``pruner.calibrate(data)`` first): :class:`ActivationImportance`,
:class:`WeightActivationImportance` (the hybrid), :class:`TaylorImportance`,
:class:`OBSImportance` (the error left after ``compensate="lstsq"``),
:class:`OutputSensitivity` (the output's change, one unit across layers: an allocation).
"""
from .activation import ActivationImportance, WeightActivationImportance
from .base import Importance, member_weights, normalize
from .obs import OBSImportance
from .sensitivity import OutputSensitivity
from .stats import ActivationStats
from .taylor import TaylorImportance
from .weight import RandomImportance, WeightImportance

__all__ = ["Importance", "WeightImportance", "RandomImportance", "ActivationImportance",
           "WeightActivationImportance", "TaylorImportance", "OBSImportance", "OutputSensitivity",
           "ActivationStats", "member_weights", "normalize"]
