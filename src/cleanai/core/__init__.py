"""Tracing and channel dependencies."""
from .graph import DependencyGraph
from .groups import Group, Member
from .layers import InternalDim
from .layers_attention import MultiheadAttentionPruner, PrunedMultiheadAttention
from .layers_recurrent import RNNCellPruner, RNNPruner
from .trace import TraceError

__all__ = ["DependencyGraph", "Group", "Member", "TraceError", "InternalDim",
           "MultiheadAttentionPruner", "PrunedMultiheadAttention", "RNNPruner", "RNNCellPruner"]
