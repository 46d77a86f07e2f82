"""Shipping a pruned model: int8 quantization through torchao, export to ONNX or a
``torch.export`` program, each checked against the model.

- :func:`quantize`: dynamic, static (PT2E) or weight-only int8, picked per model;
- :func:`export`: ``.onnx`` or ``.pt2``, run back and compared with the model.

torchao, onnx, onnxscript and onnxruntime are optional (``pip install cleanai[deploy]``),
imported when these functions run.
"""
from .export import ExportResult, export
from .quantize import StaticInt8Model, QuantizationResult, quantize

__all__ = ["quantize", "QuantizationResult", "StaticInt8Model", "export", "ExportResult"]
