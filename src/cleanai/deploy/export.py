"""Exporting a (pruned) model to a file an inference runtime loads, checked against the model.

- ``"pt2"``: ``torch.export`` (an ``ExportedProgram`` saved with ``torch.export.save``); the
  check loads it back and runs it.
- ``"aoti"``: the ``torch.export`` program compiled ahead of time by AOTInductor into a
  package (a ``.pt2`` zip holding a shared library and the weights) that runs without
  Python's per-operator overhead, which is what decides the latency of a small model at batch
  1; :func:`load` runs it. Compiling needs a C++ compiler, as ``torch.compile`` does.
- ``"onnx"``: PyTorch's ONNX exporter (``torch.onnx.export(..., dynamo=True)``, which needs
  the optional packages ``onnx`` and ``onnxscript``: ``pip install cleanai[deploy]``); the
  check runs the file with onnxruntime when it is installed, else validates it with
  ``onnx.checker``.

The batch dim of every input is exported as dynamic where the model allows it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..core.runtime import iter_tensors, preserved_state, run_forward

FORMATS = ("onnx", "pt2", "aoti")
#: how far an int8 file may be from the int8 model it came from (relative L2 error over the
#: outputs): int8 runtimes round activations their own way (per token in torchao, per tensor in
#: onnxruntime, other kernels once compiled), which moves outputs by a few percent; a wrong
#: file is off by the size of the outputs
INT8_RTOL = 0.25
SHAPES_KEY = "cleanai.input_shapes"  # in an AOTInductor package's metadata


@dataclasses.dataclass
class ExportResult:
    """Where the model went and how the file was checked. ``max_abs_diff`` is the largest
    difference between the file's outputs and the model's on the example inputs and
    ``relative_error`` the L2 norm of the differences over that of the model's outputs (both
    ``None`` when the file could not be run here); ``checked_with`` names what ran or
    validated it."""

    path: str
    format: str
    size_bytes: int
    max_abs_diff: Optional[float]
    checked_with: str
    relative_error: Optional[float] = None

    def summary(self) -> str:
        diff = "not run"
        if self.max_abs_diff is not None:
            diff = f"outputs within {self.max_abs_diff:.1e} of the model"
            if self.relative_error is not None and self.relative_error > 1e-4:
                diff += f" (relative error {self.relative_error:.1%})"
        return (f"exported {self.format} to {self.path} ({self.size_bytes / 1e6:.2f} MB); "
                f"checked with {self.checked_with}: {diff}")


def export(model: nn.Module, example_inputs: Any, path: str, format: Optional[str] = None, *,
           check: bool = True, atol: Optional[float] = None) -> ExportResult:
    """Write ``model`` to ``path`` as ``format`` (``"onnx"``, ``"pt2"`` or ``"aoti"``; by
    default from the file's suffix, where ``.pt2`` means ``"pt2"``) and check that the file
    runs and matches the model on ``example_inputs``: within ``atol`` (default 1e-4), or for
    an int8 model with ``atol=None``, to a relative error of ``INT8_RTOL`` (int8 runtimes round
    activations differently; ``relative_error`` in the result says how close it came). The
    model is exported in eval mode and left as it was; a Hugging Face model with
    ``config.use_cache`` is exported without its key/value cache; a static int8 result of
    :func:`quantize` exports its int8 graph. A dynamic int8 result goes to ONNX as its float
    graph (the values its int8 weights stand for) quantized by onnxruntime's dynamic
    quantization: int8 weights per output channel, activations per tensor, which is coarser
    than torchao's per-token scales.

    ``"aoti"`` compiles for inference (inductor's freezing: weights folded and prepacked). Its
    batch dim stays dynamic, except for a static int8 graph, whose package runs at the batch
    size of ``example_inputs`` only (inductor's int8 convolutions need a static shape).
    Compiling takes seconds to minutes. Load the file with :func:`load`.

    ``example_inputs``: a tensor, a tuple (positional) or a dict (keywords), as for the pruner.

    Raises:
        ValueError: an unknown format, a model that does not run on ``example_inputs``, or a
            file whose outputs differ by more than the tolerance.
        ImportError: ``"onnx"`` without the ``onnx`` / ``onnxscript`` packages.
        RuntimeError: the exporter or compiler failed (with its message); ONNX of a
            weight-only int8 model.
    """
    if format is None:
        format = {".onnx": "onnx", ".pt2": "pt2"}.get(os.path.splitext(path)[1].lower())
        if format is None:
            raise ValueError(f"cannot tell the format from {path!r}: name it *.onnx or *.pt2, "
                             f"or pass format='onnx' | 'pt2'")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    from .quantize import StaticInt8Model
    static_int8 = isinstance(model, StaticInt8Model)
    int8 = static_int8 or bool(_subclass_weights(model))
    if static_int8:  # its int8 graph (what compile would run) goes out
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
                                                          path, format, check, static_int8)
        finally:
            if cache:
                config.use_cache = cache
    diff = relative = None
    if outputs is not None:
        if len(outputs) != len(expected):
            raise ValueError(f"the exported file returns {len(outputs)} tensors, the model "
                             f"{len(expected)}")
        pairs = [(a.float(), b) for a, b in zip(outputs, expected) if b.numel()]
        diff = max((float((a - b).abs().max()) for a, b in pairs), default=0.0)
        off = sum(float((a - b).pow(2).sum()) for a, b in pairs) ** 0.5
        size = sum(float(b.pow(2).sum()) for _, b in pairs) ** 0.5
        relative = off / size if size else (0.0 if off == 0 else float("inf"))
        if int8 and atol is None:
            if not relative <= INT8_RTOL:
                raise ValueError(f"the exported {format} file's outputs differ from the int8 "
                                 f"model's by {relative:.1%} (relative; at most "
                                 f"{INT8_RTOL:.0%}); the file is at {path}")
        elif not diff <= (1e-4 if atol is None else atol):
            raise ValueError(f"the exported {format} file's outputs differ from the model's by "
                             f"{diff:.3g} (atol {1e-4 if atol is None else atol:g}); the file "
                             f"is at {path}")
    return ExportResult(path, format, os.path.getsize(path), diff, checked, relative)


def _export_and_run(model, example_inputs, args, kwargs, path, format, check, static_int8):
    """The model's outputs, what checked the file and the file's outputs (or None)."""
    try:
        expected = [t.detach().float() for t in iter_tensors(run_forward(model, example_inputs))]
    except Exception as exc:
        raise ValueError(f"{type(model).__name__} does not run on the example inputs: "
                         f"{type(exc).__name__}: {exc}") from exc
    if format == "aoti":
        checked, outputs = _aoti(model, args, kwargs, path, check, dynamic=not static_int8)
    else:
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
    """A dynamic batch (dim 0) for every tensor input, in the exporters' structure (nested
    tuples, lists and dicts of tensors too)."""
    from torch.utils._pytree import tree_map

    def dims(v):
        return {0: torch.export.Dim.AUTO} if isinstance(v, torch.Tensor) and v.dim() else None
    return tree_map(dims, dict(kwargs) if kwargs else tuple(args))


def _exported(model: nn.Module, args: tuple, kwargs: dict,
              dynamic: bool = True) -> "torch.export.ExportedProgram":
    """``torch.export`` of the model, with a dynamic batch dim where ``dynamic`` and the model
    allow it (an example batch of 1 fixes the batch at 1: torch.export specializes sizes 0
    and 1)."""
    try:
        return torch.export.export(model, args, kwargs,
                                   dynamic_shapes=_batch_dims(args, kwargs) if dynamic else None)
    except Exception as exc:
        raise RuntimeError(f"torch.export could not export {type(model).__name__}: "
                           f"{type(exc).__name__}: {exc}") from exc


def _input_shapes(program: "torch.export.ExportedProgram", args: tuple,
                  kwargs: dict) -> Dict[str, List[Optional[int]]]:
    """Every tensor input's shape as the program takes it (``None`` for a dynamic dim), keyed
    by its place in ``(args, kwargs)``."""
    from torch.export.graph_signature import InputKind
    from torch.utils._pytree import keystr, tree_flatten_with_path
    leaves = tree_flatten_with_path((args, kwargs))[0]
    user = [spec.arg.name for spec in program.graph_signature.input_specs
            if spec.kind == InputKind.USER_INPUT]
    values = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    shapes = {}
    for (path, leaf), name in zip(leaves, user):
        val = values.get(name)
        if isinstance(leaf, torch.Tensor) and isinstance(val, torch.Tensor):
            shapes[keystr(path)] = [d if isinstance(d, int) else None for d in val.shape]
    return shapes


def _pt2(model, args, kwargs, path, check) -> Tuple[str, Optional[List[torch.Tensor]]]:
    program = _exported(model, args, kwargs)
    torch.export.save(program, path)
    if not check:
        return "nothing (check=False)", None
    loaded = torch.export.load(path).module()
    return "torch.export.load", [t.detach() for t in iter_tensors(loaded(*args, **kwargs))]


def _aoti(model, args, kwargs, path, check,
          dynamic: bool) -> Tuple[str, Optional[List[torch.Tensor]]]:
    # ``dynamic=False`` for a static int8 graph: inductor fuses its quantize / dequantize ops
    # into int8 kernels only with a static batch
    program = _exported(model, args, kwargs, dynamic=dynamic)
    shapes = json.dumps(_input_shapes(program, args, kwargs))
    try:
        with warnings.catch_warnings():  # inductor's int8 lowering copies a tensor that way
            warnings.filterwarnings("ignore", message="To copy construct from a tensor")
            torch._inductor.aoti_compile_and_package(
                program, package_path=path,
                inductor_configs={"freezing": True,
                                  "aot_inductor.metadata": {SHAPES_KEY: shapes}})
    except Exception as exc:
        raise RuntimeError(f"AOTInductor could not compile {type(model).__name__}: "
                           f"{type(exc).__name__}: {exc}") from exc
    if not check:
        return "nothing (check=False)", None
    loaded = load(path)
    return "AOTInductor (cleanai.deploy.load)", [
        t.detach() for t in iter_tensors(loaded(*args, **kwargs))]


def _onnx(model, args, kwargs, path, check) -> Tuple[str, Optional[List[torch.Tensor]]]:
    for package in ("onnx", "onnxscript"):
        try:
            __import__(package)
        except ImportError as exc:
            raise ImportError(f"ONNX export needs the {package} package: pip install onnx "
                              f"onnxscript (or pip install cleanai[deploy])") from exc
    subclass = _subclass_weights(model)
    target = path
    if subclass:  # torchao int8 weights: the float graph goes out, onnxruntime quantizes it
        model = _dequantized(model, subclass)
        target = path + ".float.onnx"
    try:
        torch.onnx.export(model, args, target, kwargs=kwargs or None, dynamo=True,
                          dynamic_shapes=_batch_dims(args, kwargs), external_data=False,
                          verbose=False)
    except Exception as exc:
        raise RuntimeError(f"ONNX export of {type(model).__name__} failed: "
                           f"{type(exc).__name__}: {exc}") from exc
    if subclass:
        _onnx_dynamic_int8(target, path)
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


def _subclass_weights(model: nn.Module) -> List[nn.Parameter]:
    """The parameters held as tensor subclasses (torchao's int8 weights)."""
    return [p for p in model.parameters() if type(p.data) is not torch.Tensor]


def _dequantized(model: nn.Module, subclass: List[torch.Tensor]) -> nn.Module:
    """A float copy of a model whose weights are torchao's dynamic int8 tensors: each weight
    holds the values its int8 form stands for (so the copy computes what the int8 weights do,
    up to the activations' rounding)."""
    if any(getattr(p.data, "act_quant_kwargs", None) is None or
           not hasattr(p.data, "dequantize") for p in subclass):
        raise RuntimeError(
            "ONNX export: this model's weights are tensor subclasses other than torchao's "
            "dynamic int8 (weight-only int8 has no ONNX form here). Export the float model, "
            "or quantize with mode='dynamic' or mode='static'")
    out = copy.deepcopy(model)
    for module in out.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and type(p.data) is not torch.Tensor:
                module._parameters[name] = nn.Parameter(p.data.dequantize(),
                                                        requires_grad=False)
    return out


def _onnx_dynamic_int8(source: str, path: str) -> None:
    """onnxruntime's dynamic quantization of the float graph at ``source`` into ``path``:
    int8 weights per output channel, activations quantized at run time, as torchao's dynamic
    recipe does (its activations are scaled per token, onnxruntime's per tensor)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        os.remove(source)
        raise ImportError("ONNX export of a dynamic int8 model quantizes the float graph "
                          "with onnxruntime: pip install onnxruntime (or pip install "
                          "cleanai[deploy])") from exc
    try:
        quantize_dynamic(source, path, per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        os.remove(source)


class CompiledPackage(nn.Module):
    """An AOTInductor package loaded for inference, as a module: ``forward`` takes the inputs
    the model was exported with (same positions and keywords) and checks their shapes against
    the ones the package was compiled for (a compiled kernel does not). It holds no
    parameters; its weights live in the package's compiled library."""

    def __init__(self, runner: Any, path: str) -> None:
        super().__init__()
        object.__setattr__(self, "_runner", runner)  # not a module: kept out of the tree
        self.path = path
        metadata = runner.get_metadata() if hasattr(runner, "get_metadata") else {}
        self.input_shapes: Dict[str, List[Optional[int]]] = json.loads(
            metadata.get(SHAPES_KEY, "{}"))
        # (positional index or keyword, shape) per input, read without flattening the call
        # (a batch-1 call lasts a few hundred microseconds); None for nested inputs
        top = [(_top_level(key), key) for key in self.input_shapes]
        self._top = None if any(where is None for where, _ in top) else top

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._top is None:
            from torch.utils._pytree import keystr, tree_flatten_with_path
            for path, leaf in tree_flatten_with_path((args, kwargs))[0]:
                self._check(keystr(path), leaf)
        else:
            for where, key in self._top:
                leaf = kwargs.get(where) if isinstance(where, str) else \
                    (args[where] if where < len(args) else None)
                self._check(key, leaf)
        return self._runner(*args, **kwargs)

    def _check(self, key: str, leaf: Any) -> None:
        """Refuse a tensor input of another shape than the one compiled for the input at
        flattened ``key``."""
        want = self.input_shapes.get(key)
        if want is None or not isinstance(leaf, torch.Tensor):
            return
        if leaf.dim() == len(want) and all(w is None or w == d for w, d in zip(want, leaf.shape)):
            return
        name = ("args" if key.startswith("[0]") else "kwargs") + key[3:]
        form = "(" + ", ".join("any" if w is None else str(w) for w in want) + ")"
        hint = (" (an example batch of 1 fixes the batch at 1: export with 2 or more for any "
                "batch)" if want and want[0] == 1 else "")
        raise ValueError(f"{self.path} was compiled for {name} of shape {form}, got "
                         f"{tuple(leaf.shape)}: export again with an example of this "
                         f"shape{hint}")

    def extra_repr(self) -> str:
        return f"path={self.path!r}"


def _top_level(key: str) -> Any:
    """The positional index (``"[0][2]"``) or keyword (``"[1]['input_ids']"``) a flattened
    input key names, or None for an input nested deeper."""
    import re
    m = re.fullmatch(r"\[0\]\[(\d+)\]|\[1\]\['([^']+)'\]", key)
    return None if m is None else (int(m.group(1)) if m.group(1) is not None else m.group(2))


def load(path: str) -> nn.Module:
    """Load a file written by :func:`export` with ``format="pt2"`` or ``"aoti"`` as a module
    that runs it (an ONNX file runs in onnxruntime, not here).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is neither a ``torch.export`` program nor an AOTInductor package.
    """
    import zipfile
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file at {path!r}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path!r} is not a .pt2 archive (an ONNX file runs in onnxruntime)") \
            from exc
    if any("/data/aotinductor/" in n for n in names):
        runner = torch._inductor.aoti_load_package(path)
        from torch.utils._pytree import treespec_loads
        for spec in runner.loader.get_call_spec():  # read at every call: its types must exist
            _importing_output_types(treespec_loads, spec)
        return CompiledPackage(runner, path)
    if any(n.endswith("models/model.json") for n in names):
        return _importing_output_types(torch.export.load, path).module()
    raise ValueError(f"{path!r} holds neither a torch.export program nor an AOTInductor package")


def _importing_output_types(read: Any, path: str) -> Any:
    """``read(path)``, importing the modules of the output classes it names first (a Hugging
    Face ``ModelOutput``, which registers itself with pytree on import)."""
    import importlib
    import re
    tried = set()
    while True:
        try:
            return read(path)
        except NotImplementedError as exc:
            m = re.search(r"Deserializing ([\w.]+)\.\w+ in pytree is not registered", str(exc))
            if m is None or m.group(1) in tried:
                raise
            tried.add(m.group(1))
            importlib.import_module(m.group(1))
