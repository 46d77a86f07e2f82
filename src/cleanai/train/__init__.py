"""Pruning inside a training loop: group-sparsity regularisation, gradual pruning, and the
optimizer state that follows a pruning step.

- :class:`GroupSparsity` / :class:`BatchNormScaleSparsity`: penalties over coupled channels,
  added to the loss, so the channels a later step removes carry little;
- :class:`GradualPruner`: a pruner's steps spread over training iterations (cubic or linear);
- :class:`slice_optimizer_state`: slices an optimizer's state with a pruning step.

``GradualPruner`` and the penalties have ``state_dict()`` / ``load_state_dict()`` to resume an
interrupted run (the model itself is saved with :func:`cleanai.save_pruned`).
"""
from .gradual import GradualPruner
from .optimizer import slice_optimizer_state
from .sparsity import BatchNormScaleSparsity, GroupSparsity

__all__ = ["GradualPruner", "GroupSparsity", "BatchNormScaleSparsity", "slice_optimizer_state"]
