"""Where a pruned model failed: the exception, the module that was running and the line of
code, read from the traceback (no second forward)."""
from __future__ import annotations

import dataclasses
import linecache
import os
import traceback
from typing import Optional

import torch
from torch import nn


@dataclasses.dataclass
class Failure:
    """How and where a pruned model failed: the exception, the innermost module of the model
    that was running (``""``: the model's own forward; ``None``: none, e.g. while slicing)
    and the innermost line of code outside PyTorch and CleanAI."""

    error: str  # the exception's type
    message: str  # its message, first line
    layer: Optional[str] = None
    layer_type: str = ""
    source: Optional[str] = None  # "file.py:12 `code`"

    def where(self, model_name: str) -> str:
        """Where it failed, as `` in 2 (CheckedConv) at net.py:12 <the line>``; empty when
        unknown."""
        out = ""
        if self.layer == "":
            out = f" in {model_name}'s own forward"
        elif self.layer:
            out = f" in {self.layer} ({self.layer_type})"
        if self.source:
            out += f" at {self.source}"
        return out

    def describe(self, model_name: str) -> str:
        """The exception's type, where it was raised and its message, for a warning."""
        return f"{self.error}{self.where(model_name)}: {self.message}"


#: PyTorch's and CleanAI's own files: a failure's source line is the innermost line outside them
_LIBRARIES = (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
              os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep)


def describe_failure(exc: BaseException, model: nn.Module) -> Failure:
    """Read from ``exc``'s traceback where in ``model`` it was raised (no second forward):
    the innermost frame whose ``self`` is one of the model's modules, and the innermost line
    outside PyTorch and CleanAI (the user's or a model library's code)."""
    names = {id(m): n for n, m in model.named_modules()}
    layer: Optional[str] = getattr(exc, "layer", None)
    layer_type, source = "", None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if owner is not None and id(owner) in names:
            layer, layer_type = names[id(owner)], type(owner).__name__
        path = frame.f_code.co_filename
        if not path.startswith(_LIBRARIES) and not path.startswith("<"):
            code = linecache.getline(path, lineno).strip()
            source = f"{os.path.basename(path)}:{lineno}" + (f" `{code}`" if code else "")
    if layer and not layer_type:
        try:
            layer_type = type(model.get_submodule(layer)).__name__
        except AttributeError:
            pass
    lines = str(exc).strip().splitlines()
    message = lines[0] if lines else ""
    if len(message) > 300:
        message = message[:297] + "..."
    return Failure(type(exc).__name__, message, layer, layer_type, source)
