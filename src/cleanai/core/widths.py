"""Can a pruned model fail on a channel count the dependency graph cannot see?

Slicing keeps every known layer consistent (its pruner updates its tensors and attributes).
What can still break is code outside them that holds a width of its own: ``x.view(b, 64, -1)``,
``torch.zeros(self.dim)``, ``assert x.shape[1] == self.channels``, a forward hook. Autograd
shows none of those, so after each step the pruner runs the model once to find out.

The check is skipped only where the trace found no such code. Its function mode sees every
torch call made outside the known layers; :func:`width_free` says whether one call can hold a
width. A call is width-free when the function is one whose non-tensor arguments are never a
channel count (an activation, arithmetic, ``cat``, pooling, ``flatten``: dims, kernel sizes,
probabilities) and each tensor argument is part of the graph or a scalar. Anything else,
reading ``x.shape`` included, is not. The walk adds that every autograd node outside the known
layers came from a call the mode saw (a TorchScript function, code under
``DisableTorchFunction`` or a tensor computed before the forward does not). :func:`opaque_code`
finds the code the mode cannot see inside or around the known layers: forward hooks, forward
methods set on an instance, scripted or compiled modules, and layers whose class is not
PyTorch's own (a subclass overriding a helper, a parametrized layer, a user layer with a
registered pruner). :func:`code_fingerprint` tells whether hooks or instance forwards were
added after the trace.

It remains a heuristic: plain Python that reads a layer attribute and raises
(``if self.attn.num_heads != 8: raise``) makes no torch call; ``check_forward=True`` covers it.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

import torch
from torch import nn

from .runtime import iter_tensors

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

_ONE_TENSOR = frozenset({"clamp", "clamp_", "clip", "clip_"})

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
    tensors = 0
    for a in iter_tensors((args, kwargs)):
        if not a.requires_grad and a.numel() > 1:
            return False  # a constant the graph does not follow (a mask kept in a plain attribute)
        tensors += 1
    # tensor bounds of a clamp are not tied to the clamped channels (its node has one input)
    return tensors <= 1 or name not in _ONE_TENSOR


def opaque_code(known: Dict[nn.Module, Any], modules: Iterable[nn.Module]) -> Optional[str]:
    """Code whose torch calls the trace's function mode does not see, or ``None``: a forward
    hook on a known layer, a forward set on a known layer's instance, a scripted or compiled
    module, a known layer whose class is not PyTorch's own (see the module doc)."""
    if global_hooks():
        return "a global forward hook"
    for m in modules:
        if isinstance(m, torch.jit.ScriptModule) or type(m).__name__ == "OptimizedModule":
            return f"the compiled module {type(m).__name__}"
    for m, (name, pruner) in known.items():
        if m._forward_hooks or m._forward_pre_hooks:
            return f"a forward hook on {name}"
        if "forward" in m.__dict__:
            return f"a forward set on the layer {name}"
        if not type(m).__module__.startswith("torch.nn.modules.") or \
                not type(pruner).__module__.startswith("cleanai."):
            return f"the layer {name} ({type(m).__name__})"
    return None


def code_fingerprint(modules: Iterable[nn.Module]) -> tuple:
    """The forward hooks and instance forwards of ``modules`` (and the global hooks): a
    change after the trace is code the trace never saw."""
    return (global_hooks(),) + tuple(
        (id(m), tuple(m._forward_hooks), tuple(m._forward_pre_hooks), id(m.__dict__.get("forward")))
        for m in modules if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__)


def global_hooks() -> tuple:
    """The forward hooks and pre-hooks registered for every module."""
    from torch.nn.modules import module as torch_module
    return tuple(torch_module._global_forward_hooks) + tuple(torch_module._global_forward_pre_hooks)
