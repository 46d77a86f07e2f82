"""``cleanai prune ... --quantize int8 --export onnx|pt2``: the deployment steps after pruning."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, List, Optional

from .models import CLIError

QUANTIZE = {"int8": "auto", "int8-dynamic": "dynamic", "int8-static": "static",
            "int8-weight-only": "weight_only"}
EXPORTS = ("onnx", "pt2")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=sorted(QUANTIZE), default=None,
                   help="after pruning, an int8 copy through torchao (int8: the recipe that "
                        "fits the model, static for CNNs, calibrated on --calib-data; "
                        "dynamic for transformers); its size and latency are reported")
    p.add_argument("--export", choices=EXPORTS, default=None,
                   help="write the pruned (float) model to OUT/model.onnx or OUT/model.pt2, "
                        "run it back and compare with the model")


def needs_data(args: argparse.Namespace) -> bool:
    """Whether the deployment steps asked for need calibration batches."""
    return args.quantize in ("int8", "int8-static")


def run(args: argparse.Namespace, model: Any, dense: Optional[Any], inputs: Any,
        batches: Optional[List[Any]], out: Path) -> List[str]:
    """Quantize and export as asked; returns the lines to print. ``dense`` (the model before
    pruning, or None without latency) is the baseline the int8 model is timed against."""
    lines: List[str] = []
    if args.quantize is not None:
        lines += _quantize(args, model, dense, inputs, batches)
    if args.export is not None:
        from ..deploy import export
        try:
            result = export(model, inputs, str(out / f"model.{args.export}"), args.export)
        except ImportError as exc:
            raise CLIError(str(exc)) from exc
        lines.append(result.summary())
    return lines


def _quantize(args, model, dense, inputs, batches) -> List[str]:
    from ..deploy import quantize
    from ..utils import compare_latency
    from ..utils import disk_size

    mode = QUANTIZE[args.quantize]
    data = None
    if mode in ("auto", "static") and batches is not None and not isinstance(inputs, dict):
        data = batches
    try:
        result = quantize(model, data, mode=mode)
    except ImportError as exc:
        raise CLIError(str(exc)) from exc
    lines = [result.summary()]
    size = disk_size(result.model)
    base = dense if dense is not None else model
    lines.append(f"int8 size on disk {size / 1e6:.2f} MB (the dense float model: "
                 f"{disk_size(base) / 1e6:.2f} MB, {disk_size(base) / size:.1f}x)")
    if dense is not None and not args.no_latency:
        comparison = compare_latency(dense, result.model, inputs, repeats=args.latency_repeats)
        lines.append(f"int8 latency {comparison.b} against the dense float model's "
                     f"{comparison.a}: {comparison}")
    return lines
