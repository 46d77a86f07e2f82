"""Can a pruned model fail on a channel count the dependency graph cannot see?

Slicing keeps every known layer consistent (its pruner updates its tensors and attributes).
What can still break is code outside them that holds a width of its own: ``x.view(b, 64, -1)``,
``torch.zeros(self.dim)``, ``assert x.shape[1] == self.channels``, a forward hook. Autograd
shows none of those, so after each step the pruner runs the model once to find out.

That check is needed only where such code can exist. The trace's function mode sees every
torch call made outside the known layers; :func:`width_free` says whether one call can hold a
width. A call is width-free when the function is one whose non-tensor arguments are never a
channel count (an activation, arithmetic, ``cat``, pooling, ``flatten``: dims, kernel sizes,
probabilities) and each tensor argument is part of the graph or a scalar. Anything else,
reading ``x.shape`` included, is not. :func:`opaque_code` finds the code the function mode
cannot see: forward hooks, scripted modules, layers whose forward is not PyTorch's own.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

import torch
from torch import nn

# functions whose non-tensor arguments (dims, kernel sizes, output sizes of spatial pools,
# probabilities, exponents) never hold a channel count; matched by name, torch.* and
# Tensor.* alike, in-place and operator forms included. ``squeeze`` is not one: a width
# pruned down to 1 would be squeezed away.
_WIDTH_FREE = frozenset(
    [f"{p}{op}{s}" for op in ("add", "sub", "mul", "div", "true_divide", "rsub", "matmul",
                              "truediv", "neg", "pow")
     for p, s in (("", ""), ("", "_"), ("__", "__"), ("__r", "__"), ("__i", "__"))]
    + [f"{op}{s}" for op in ("relu", "relu6", "hardtanh", "hardswish", "hardsigmoid", "silu",
                             "gelu", "sigmoid", "tanh", "leaky_relu", "elu", "selu", "celu",
                             "mish", "softplus", "exp", "log", "sqrt", "rsqrt", "abs", "clamp",
                             "clip", "dropout", "alpha_dropout")
       for s in ("", "_")]
    + ["dropout1d", "dropout2d", "dropout3d", "feature_alpha_dropout", "threshold",
       "softmax", "log_softmax", "cat", "concat", "concatenate", "stack", "flatten",
       "permute", "transpose", "unsqueeze", "contiguous", "clone", "dim",
       "sum", "mean", "amax", "amin", "bmm", "mm", "where", "maximum", "minimum",
       "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
       "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
       "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
       "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
       "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices"])

# tensor attributes whose value is never a width (``shape`` is one, so it is not here)
_ATTRIBUTES = frozenset({"dtype", "device", "requires_grad", "is_cuda", "ndim", "layout",
                         "grad_fn", "is_leaf", "is_sparse", "is_quantized", "is_meta"})


def width_free(func: Any, args: tuple, kwargs: Optional[Dict[str, Any]]) -> bool:
    """True when this torch call cannot carry a channel count of its own (see module doc)."""
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a tensor attribute read
        return getattr(getattr(func, "__self__", None), "__name__", "") in _ATTRIBUTES
    if name not in _WIDTH_FREE:
        return False
    for a in _tensor_args(args, kwargs):
        if not a.requires_grad and a.numel() > 1:
            return False  # a constant the graph does not follow (a mask kept in a plain attribute)
    return True


def _tensor_args(args: tuple, kwargs: Optional[Dict[str, Any]]) -> Iterable[torch.Tensor]:
    for a in (*args, *(kwargs or {}).values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


def opaque_code(known: Dict[nn.Module, Any], modules: Iterable[nn.Module]) -> Optional[str]:
    """Code whose torch calls the trace's function mode does not see, or ``None``: a forward
    hook (it runs after the mode steps aside for a known layer), a scripted or compiled module,
    a known layer whose forward is not PyTorch's own (a user layer with a registered pruner)."""
    from torch.nn.modules import module as torch_module
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return "a global forward hook"
    for m in modules:
        if isinstance(m, torch.jit.ScriptModule) or type(m).__name__ == "OptimizedModule":
            return f"the compiled module {type(m).__name__}"
    for m, (name, pruner) in known.items():
        if m._forward_hooks or m._forward_pre_hooks:
            return f"a forward hook on {name}"
        if not type(m).forward.__module__.startswith("torch.nn.") or \
                not type(pruner).__module__.startswith("cleanai."):
            return f"the layer {name} ({type(m).__name__})"
    return None
