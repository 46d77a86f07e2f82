"""What users point at: layers by module or qualified name, and the example inputs a model's
first layer implies."""
from __future__ import annotations

import difflib
from typing import Union

import torch
from torch import nn

LayerRef = Union[str, nn.Module]


class LayerNames:
    """Resolves modules and qualified names given by the user, with helpful errors."""

    def __init__(self, model: nn.Module) -> None:
        self.by_module = {m: n for n, m in model.named_modules()}
        self.names = [n for n in self.by_module.values() if n]
        self.model_name = type(model).__name__

    def resolve(self, key: LayerRef, what: str) -> str:
        if isinstance(key, nn.Module):
            if key not in self.by_module:
                raise ValueError(f"{what}: the {type(key).__name__} given is not a submodule "
                                 f"of this {self.model_name}")
            return self.by_module[key]
        if not isinstance(key, str):
            raise TypeError(f"{what}: keys must be modules or qualified names, got {key!r}")
        if key not in self.names:
            close = difflib.get_close_matches(key, self.names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"{what}: {self.model_name} has no layer named {key!r}{hint}")
        return key


def infer_example_inputs(model: nn.Module) -> torch.Tensor:
    """A batch-1 input shaped for the model's first layer (see :class:`StructuredPruner`)."""
    for name, m in model.named_modules():
        p = next(m.parameters(recurse=False), None)
        kw = {"dtype": p.dtype if p is not None and p.is_floating_point() else torch.float32,
              "device": p.device if p is not None else "cpu"}
        if isinstance(m, nn.Conv2d):
            return torch.randn(1, m.in_channels, 224, 224, **kw)
        if isinstance(m, nn.Conv1d):
            return torch.randn(1, m.in_channels, 256, **kw)
        if isinstance(m, nn.Conv3d):
            return torch.randn(1, m.in_channels, 16, 112, 112, **kw)
        if isinstance(m, nn.Linear):
            return torch.randn(1, m.in_features, **kw)
        if isinstance(m, nn.Embedding):
            return torch.randint(0, m.num_embeddings, (1, 16), device=kw["device"])
        if p is not None:
            break
    raise ValueError(f"cannot infer example inputs for {type(model).__name__} from its first "
                     f"layer; pass example_inputs=... (a tensor, tuple or dict for one forward)")
