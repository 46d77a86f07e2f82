"""Shipping a pruned model: int8 quantization through torchao, export to ONNX or a
``torch.export`` program, each checked against the model.

- :func:`quantize`: dynamic, static (PT2E) or weight-only int8, picked per model;
- :func:`export`: ``.onnx``, a ``torch.export`` program or an AOTInductor package (compiled
  ahead of time), run back and compared with the model; :func:`load` runs the ``.pt2`` files.

torchao, onnx, onnxscript and onnxruntime are optional (``pip install cleanai[deploy]``),
imported when these functions run.
"""
from .export import CompiledPackage, ExportResult, export, load
from .quantize import StaticInt8Model, QuantizationResult, quantize

__all__ = ["quantize", "QuantizationResult", "StaticInt8Model", "export", "ExportResult", "load",
           "CompiledPackage"]
