"""Exporting a (pruned) model to a file an inference runtime loads, checked against the model.

- ``"pt2"``: ``torch.export`` (an ``ExportedProgram`` saved with ``torch.export.save``); the
  check loads it back and runs it.
- ``"onnx"``: PyTorch's ONNX exporter (``torch.onnx.export(..., dynamo=True)``, which needs
  the optional packages ``onnx`` and ``onnxscript``: ``pip install cleanai[deploy]``); the
  check runs the file with onnxruntime when it is installed, else validates it with
  ``onnx.checker``.

The batch dim of every input is exported as dynamic where the model allows it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from ..core.runtime import iter_tensors, preserved_state, run_forward

FORMATS = ("onnx", "pt2")


@dataclasses.dataclass
class ExportResult:
    """Where the model went and how the file was checked. ``max_abs_diff`` is the largest
    difference between the file's outputs and the model's on the example inputs (``None``
    when the file could not be run here); ``checked_with`` names what ran or validated it."""

    path: str
    format: str
    size_bytes: int
    max_abs_diff: Optional[float]
    checked_with: str

    def summary(self) -> str:
        diff = (f"outputs within {self.max_abs_diff:.1e} of the model"
                if self.max_abs_diff is not None else "not run")
        return (f"exported {self.format} to {self.path} ({self.size_bytes / 1e6:.2f} MB); "
                f"checked with {self.checked_with}: {diff}")


def export(model: nn.Module, example_inputs: Any, path: str, format: Optional[str] = None, *,
           check: bool = True, atol: Optional[float] = None) -> ExportResult:
    """Write ``model`` to ``path`` as ``format`` (``"onnx"`` or ``"pt2"``; by default from the
    file's suffix) and check that the file runs and matches the model on ``example_inputs``
    within ``atol`` (default 1e-4; for an int8 model, 1% of the outputs' largest magnitude: an
    int8 runtime rounds differently). The model is exported in eval mode and left as it was; a
    Hugging Face model with ``config.use_cache`` is exported without its key/value cache; a
    static int8 result of :func:`quantize` exports its int8 graph.

    ``example_inputs``: a tensor, a tuple (positional) or a dict (keywords), as for the pruner.

    Raises:
        ValueError: an unknown format, a model that does not run on ``example_inputs``, or a
            file whose outputs differ by more than ``atol``.
        ImportError: ``"onnx"`` without the ``onnx`` / ``onnxscript`` packages.
        RuntimeError: the exporter failed (with its message).
    """
    if format is None:
        format = {".onnx": "onnx", ".pt2": "pt2"}.get(os.path.splitext(path)[1].lower())
        if format is None:
            raise ValueError(f"cannot tell the format from {path!r}: name it *.onnx or *.pt2, "
                             f"or pass format='onnx' | 'pt2'")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    from .quantize import StaticInt8Model
    int8 = isinstance(model, StaticInt8Model) or any(
        type(p.data) is not torch.Tensor for p in model.parameters())
    if isinstance(model, StaticInt8Model):  # its int8 graph (what compile would run) goes out
        model = model.graph
    args, kwargs = _split(example_inputs)
    config = getattr(model, "config", None)
    cache = getattr(config, "use_cache", None)
    with preserved_state(model), torch.no_grad():
        try:
            model.eval()
        except NotImplementedError:  # an exported graph keeps the mode it was exported in
            pass
        if cache:  # a Hugging Face decoder exports without its key/value cache object
            config.use_cache = False
        try:
            expected, checked, outputs = _export_and_run(model, example_inputs, args, kwargs,
                                                          path, format, check)
        finally:
            if cache:
                config.use_cache = cache
    diff = None
    if outputs is not None:
        if len(outputs) != len(expected):
            raise ValueError(f"the exported file returns {len(outputs)} tensors, the model "
                             f"{len(expected)}")
        diff = max((float((a.float() - b).abs().max()) for a, b in zip(outputs, expected)
                    if b.numel()), default=0.0)
        if atol is None:
            scale = max((float(b.abs().max()) for b in expected if b.numel()), default=1.0)
            atol = 1e-2 * max(scale, 1.0) if int8 else 1e-4
        if diff > atol:
            raise ValueError(f"the exported {format} file's outputs differ from the model's by "
                             f"{diff:.3g} (atol {atol:g}); the file is at {path}")
    return ExportResult(path, format, os.path.getsize(path), diff, checked)


def _export_and_run(model, example_inputs, args, kwargs, path, format, check):
    """The model's outputs, what checked the file and the file's outputs (or None)."""
    try:
        expected = [t.detach().float() for t in iter_tensors(run_forward(model, example_inputs))]
    except Exception as exc:
        raise ValueError(f"{type(model).__name__} does not run on the example inputs: "
                         f"{type(exc).__name__}: {exc}") from exc
    run = _pt2 if format == "pt2" else _onnx
    checked, outputs = run(model, args, kwargs, path, check)
    return expected, checked, outputs


def _split(inputs: Any) -> Tuple[tuple, dict]:
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def _batch_dims(args: tuple, kwargs: dict) -> Any:
    """A dynamic batch (dim 0) for every tensor input, in the exporters' structure."""
    def dims(v):
        return {0: torch.export.Dim.AUTO} if isinstance(v, torch.Tensor) and v.dim() else None
    if kwargs:
        return {k: dims(v) for k, v in kwargs.items()}
    return tuple(dims(a) for a in args)


def _exported(model: nn.Module, args: tuple, kwargs: dict) -> "torch.export.ExportedProgram":
    try:
        return torch.export.export(model, args, kwargs, dynamic_shapes=_batch_dims(args, kwargs))
    except Exception as exc:
        raise RuntimeError(f"torch.export could not export {type(model).__name__}: "
                           f"{type(exc).__name__}: {exc}") from exc


def _pt2(model, args, kwargs, path, check) -> Tuple[str, Optional[List[torch.Tensor]]]:
    program = _exported(model, args, kwargs)
    torch.export.save(program, path)
    if not check:
        return "nothing (check=False)", None
    loaded = torch.export.load(path).module()
    return "torch.export.load", [t.detach() for t in iter_tensors(loaded(*args, **kwargs))]


def _onnx(model, args, kwargs, path, check) -> Tuple[str, Optional[List[torch.Tensor]]]:
    for package in ("onnx", "onnxscript"):
        try:
            __import__(package)
        except ImportError as exc:
            raise ImportError(f"ONNX export needs the {package} package: pip install onnx "
                              f"onnxscript (or pip install cleanai[deploy])") from exc
    try:
        torch.onnx.export(model, args, path, kwargs=kwargs or None, dynamo=True,
                          dynamic_shapes=_batch_dims(args, kwargs), external_data=False,
                          verbose=False)
    except Exception as exc:
        subclass = any(type(p.data) is not torch.Tensor for p in model.parameters())
        hint = (" Its weights are tensor subclasses (torchao's dynamic or weight-only int8), "
                "which the ONNX converter does not know: export the float model, or quantize "
                "with mode='static', whose int8 graph exports." if subclass else "")
        raise RuntimeError(f"ONNX export of {type(model).__name__} failed: "
                           f"{type(exc).__name__}: {exc}.{hint}") from exc
    if not check:
        return "nothing (check=False)", None
    try:
        import onnxruntime
    except ImportError:
        import onnx
        onnx.checker.check_model(onnx.load(path))
        return "onnx.checker (install onnxruntime to run it)", None
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    values = list(args) + list(kwargs.values())
    feed = {}
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    for spec, value in zip(session.get_inputs(), tensors):
        feed[spec.name] = value.detach().cpu().numpy()
    return "onnxruntime", [torch.from_numpy(o) for o in session.run(None, feed)]
