"""``cleanai prune ... --quantize int8 --export onnx|pt2|aoti``: the deployment steps after
pruning."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, List, Optional

from .models import CLIError

QUANTIZE = {"int8": "auto", "int8-dynamic": "dynamic", "int8-static": "static",
            "int8-weight-only": "weight_only"}
#: --export choice -> the file written in OUT
EXPORTS = {"onnx": "model.onnx", "pt2": "model.pt2", "aoti": "model.aoti.pt2"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=sorted(QUANTIZE), default=None,
                   help="after pruning, an int8 copy through torchao (int8: the recipe that "
                        "fits the model, static for CNNs, calibrated on --calib-data; "
                        "dynamic for transformers); its size and latency are reported")
    p.add_argument("--export", choices=list(EXPORTS), default=None,
                   help="write the pruned (float) model to OUT/model.onnx, OUT/model.pt2 "
                        "(torch.export) or OUT/model.aoti.pt2 (compiled ahead of time by "
                        "AOTInductor; run it with cleanai.deploy.load), run it back and "
                        "compare with the model")


def needs_data(args: argparse.Namespace, inputs: Any) -> bool:
    """Whether the deployment steps asked for calibrate: static int8, for a model that takes
    positional tensors (a keyword-input model gets dynamic int8, which needs no data)."""
    return args.quantize in ("int8", "int8-static") and not isinstance(inputs, dict)


def run(args: argparse.Namespace, model: Any, dense: Optional[Any], inputs: Any,
        batches: Optional[List[Any]], out: Path, dense_mb: Optional[float]) -> List[str]:
    """Quantize and export as asked; returns the lines to print. ``dense`` (the model before
    pruning, or None without latency) is the baseline the int8 model is timed against;
    ``dense_mb`` its size on disk, as the report measured it."""
    lines: List[str] = []
    if args.quantize is not None:
        lines += _quantize(args, model, dense, inputs, batches, dense_mb)
    if args.export is not None:
        from ..deploy import export
        try:
            result = export(model, inputs, str(out / EXPORTS[args.export]), args.export)
        except ImportError as exc:
            raise CLIError(str(exc)) from exc
        lines.append(result.summary())
    return lines


def _quantize(args, model, dense, inputs, batches, dense_mb) -> List[str]:
    from ..deploy import quantize
    from ..utils import compare_latency
    from ..utils import disk_size

    mode = QUANTIZE[args.quantize]
    data = batches if needs_data(args, inputs) else None
    try:
        result = quantize(model, data, mode=mode)
    except ImportError as exc:
        raise CLIError(str(exc)) from exc
    lines = [result.summary()]
    size = disk_size(result.model) / 1e6
    line = f"int8 size on disk {size:.2f} MB"
    if dense_mb:
        line += f" (the dense float model: {dense_mb:.2f} MB, {dense_mb / size:.1f}x)"
    lines.append(line)
    if dense is not None and not args.no_latency:
        comparison = compare_latency(dense, result.model, inputs, repeats=args.latency_repeats)
        lines.append(f"int8 latency {comparison.b} against the dense float model's "
                     f"{comparison.a}: {comparison}")
    return lines
