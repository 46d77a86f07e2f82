"""Building the model a command-line MODEL argument names, and its example inputs."""
from __future__ import annotations

import difflib
import importlib
import os
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

MODEL_HELP = """MODEL is one of:
  torchvision:NAME       a torchvision model with random weights (e.g. torchvision:resnet18)
  timm:NAME              a timm model with random weights (e.g. timm:resnet18)
  hf:DIR                 a Hugging Face model saved in a local directory (never downloads)
  package.module:factory a function returning an nn.Module
  DIR                    a pruned model saved by `cleanai prune --out DIR`"""


class CLIError(Exception):
    """A user mistake on the command line: printed as one line, exit status 2."""


class BuiltModel:
    """A model with what the command line needs to run it: example inputs, how it was named,
    and, for Hugging Face models, the vocabulary size for token inputs."""

    def __init__(self, model: nn.Module, spec: str, kind: str, loaded_from: Optional[str] = None,
                 input_shape: Optional[List[int]] = None) -> None:
        self.model, self.spec, self.kind = model, spec, kind
        self.loaded_from = loaded_from
        self.input_shape = input_shape

    def example_inputs(self, shape: Optional[Sequence[int]] = None) -> Any:
        """Random inputs of ``shape`` (or the default shape for this kind of model)."""
        given = list(shape or self.input_shape or [])
        shape = given or list(default_shape(self.kind) or [])
        if self.kind == "hf":
            if len(shape) != 2:
                raise CLIError(f"a Hugging Face model takes token ids: --input-shape must be "
                               f"BATCH,SEQ_LEN, got {','.join(map(str, shape))}")
            vocab = int(getattr(getattr(self.model, "config", None), "vocab_size", 100) or 100)
            ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        form = _vision_form(self.model) if self.kind in ("torchvision", "timm") else None
        if form is not None and not given:
            shape = form[1]
        elif form is not None and len(shape) != len(form[1]):
            raise CLIError(f"--input-shape {','.join(map(str, shape))} does not fit {self.spec}: "
                           f"it takes {len(form[1])} numbers, {form[0]} (e.g. "
                           f"{','.join(map(str, form[1]))})")
        if not shape:
            from ..pruner.references import infer_example_inputs
            try:
                return infer_example_inputs(self.model)
            except ValueError as exc:
                raise CLIError(f"{exc}; give --input-shape") from exc
        return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def default_shape(kind: str) -> Optional[List[int]]:
    return {"torchvision": [1, 3, 224, 224], "timm": [1, 3, 224, 224], "hf": [1, 16]}.get(kind)


def _vision_form(model: nn.Module) -> Optional[Tuple[str, List[int]]]:
    """``("N,C,H,W", default shape)`` for an image model, ``("N,C,T,H,W", ...)`` where the first
    conv is 3-D (video models), ``None`` without convs. Only the rank can be told this way: the
    first conv in module order is not always the first to run, so its channels are not."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
    if first is None:
        return None
    return ("N,C,H,W", [1, 3, 224, 224]) if isinstance(first, nn.Conv2d) else \
        ("N,C,T,H,W", [1, 3, 16, 112, 112])


def parse_shape(text: str) -> List[int]:
    """``"1,3,224,224"`` -> ``[1, 3, 224, 224]`` (argparse type)."""
    import argparse

    try:
        shape = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    except ValueError:
        shape = []
    if not shape or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,3,224,224, got {text!r}")
    return shape


def build_model(spec: str) -> BuiltModel:
    """Build the model ``spec`` names (see ``MODEL_HELP``), in eval mode."""
    path = Path(spec)
    if path.is_dir() and (path / "cleanai.json").is_file():
        return _load_saved(path)
    kind, sep, name = spec.partition(":")
    if not path.exists() and (os.sep in kind or "/" in kind or kind in (".", "..")):
        raise CLIError(f"{spec} does not exist (a MODEL path must be a directory written by "
                       f"`cleanai prune --out DIR`)")
    if not sep or not name:
        if path.exists():
            raise CLIError(f"{spec} is not a pruned model directory (no cleanai.json in it)")
        raise CLIError(f"unknown model {spec!r}: use torchvision:NAME, timm:NAME, hf:DIR, "
                       f"module:factory or a saved pruned model directory")
    builders = {"torchvision": _torchvision, "timm": _timm, "hf": _huggingface}
    build = builders.get(kind, _factory)
    model = build(name) if kind in builders else build(kind, name)
    if kind == "hf":  # saved metadata must find the directory from anywhere
        spec = f"hf:{os.path.abspath(name)}"
    return BuiltModel(model.eval(), spec, kind if kind in builders else "factory")


def _need(package: str, spec: str):
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise CLIError(f"{spec} needs the {package} package: pip install {package}") from exc


def _closest(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _torchvision(name: str) -> nn.Module:
    tv = _need("torchvision", f"torchvision:{name}")
    names = tv.models.list_models()
    if name not in names:
        raise CLIError(f"torchvision has no model {name!r}{_closest(name, names)}")
    return tv.models.get_model(name, weights=None)


def _timm(name: str) -> nn.Module:
    timm = _need("timm", f"timm:{name}")
    names = timm.list_models()
    if name not in names:
        raise CLIError(f"timm has no model {name!r}{_closest(name, names)}")
    return timm.create_model(name, pretrained=False)


def _huggingface(name: str) -> nn.Module:
    if not os.path.isdir(name) or not os.path.isfile(os.path.join(name, "config.json")):
        raise CLIError(f"hf:{name} must be a local directory with a config.json (CleanAI never "
                       f"downloads; save one with model.save_pretrained(DIR))")
    transformers = _need("transformers", f"hf:{name}")
    try:
        return transformers.AutoModel.from_pretrained(name, local_files_only=True)
    except Exception as exc:
        raise CLIError(f"could not load the Hugging Face model in {name}: "
                       f"{type(exc).__name__}: {exc}") from exc


def _factory(module: str, attr: str) -> nn.Module:
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise CLIError(f"unknown model {module}:{attr}: cannot import {module!r} ({exc})") from exc
    fn: Optional[Callable[[], Any]] = getattr(mod, attr, None)
    if fn is None or not callable(fn):
        raise CLIError(f"unknown model {module}:{attr}: {module} has no callable {attr!r}")
    model = fn()
    if not isinstance(model, nn.Module):
        raise CLIError(f"{module}:{attr}() returned {type(model).__name__}, not an nn.Module")
    return model


def _load_saved(path: Path) -> BuiltModel:
    from ..utils.save import LoadError, load_pruned, read_pruned_info

    try:
        meta = read_pruned_info(path).get("meta") or {}
    except LoadError as exc:
        raise CLIError(str(exc)) from exc
    spec = meta.get("model")
    if not isinstance(spec, str):
        raise CLIError(f"{path} does not say how to rebuild its architecture (no \"model\" in "
                       f"its metadata); load it in Python with cleanai.load_pruned(model, path)")
    built = build_model(spec)
    try:
        load_pruned(built.model, path)
    except LoadError as exc:
        raise CLIError(str(exc)) from exc
    built.loaded_from = str(path)
    built.input_shape = meta.get("input_shape")
    return built

