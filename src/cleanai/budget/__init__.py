"""Budgets: what pruning costs (:class:`CostModel`, :class:`LatencyTable`), how sensitive each part of a model is to
it (:func:`sensitivity`), and per-layer ratios that meet a budget (:func:`search_ratios`)."""
from .cost import Cost, CostModel
from .latency import LatencyTable
from .search import SearchResult, search_ratios
from .sensitivity import SensitivityTable, Unit, prunable_units, sensitivity

__all__ = ["Cost", "CostModel", "LatencyTable", "SensitivityTable", "Unit", "sensitivity", "prunable_units",
           "SearchResult", "search_ratios"]
