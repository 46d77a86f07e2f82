"""Layer pruners, plans and the pruner itself."""
from .apply import PruningError, replay
from ..core.layers import InternalDim, LayerPruner, get_layer_pruner, register_layer_pruner
from ..core.layers_attention import MultiheadAttentionPruner, PrunedMultiheadAttention
from ..core.layers_recurrent import RNNCellPruner, RNNPruner
from .plan import PruningPlan
from .structured import StructuredPruner, infer_example_inputs, linear_schedule

__all__ = ["LayerPruner", "get_layer_pruner", "register_layer_pruner", "PruningError",
           "PruningPlan", "StructuredPruner", "infer_example_inputs", "linear_schedule", "replay",
           "InternalDim", "MultiheadAttentionPruner", "PrunedMultiheadAttention", "RNNPruner",
           "RNNCellPruner"]
