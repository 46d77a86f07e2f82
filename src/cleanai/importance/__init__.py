"""Channel importance: how much each channel of a group matters."""
from .base import Importance, member_weights, normalize
from .weight import RandomImportance, WeightImportance

__all__ = ["Importance", "WeightImportance", "RandomImportance", "member_weights", "normalize"]
