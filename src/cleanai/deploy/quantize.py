"""int8 quantization of a (pruned) model through torchao, the PyTorch team's quantization
library (an optional extra: ``pip install cleanai[deploy]``).

Three recipes, picked per model (``mode="auto"``) or by name:

- ``"dynamic"``: int8 weights and int8 activations quantized per token at run time, for every
  ``nn.Linear`` (torchao ``Int8DynamicActivationInt8WeightConfig``). Fast in eager mode on
  Linear-heavy models (transformers, MLPs); needs no data.
- ``"static"``: PT2E static quantization with the x86 inductor quantizer: the model is
  exported with ``torch.export``, observed on calibration data, converted to int8 convs and
  linears (BatchNorm folded) and run through ``torch.compile``, whose int8 kernels need
  inductor's freezing (switched on for this model's calls only). For CNNs; needs data.
- ``"weight_only"``: int8 weights of every ``nn.Linear``, computed in float (torchao
  ``Int8WeightOnlyConfig``): a quarter of the memory and file size, no speed-up on a CPU.

torchao has no int8 recurrent layers: LSTM / GRU / RNN stay in float in every recipe, and the
result says so.
"""
from __future__ import annotations

import copy
import itertools
import dataclasses
import logging
import warnings
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn

from ..core.runtime import preserved_state
from ..importance.stats import model_inputs

logger = logging.getLogger(__name__)

MODES = ("auto", "dynamic", "static", "weight_only")
BACKENDS = ("x86",)
RECURRENT = (nn.RNNBase, nn.RNNCellBase)


@dataclasses.dataclass
class QuantizationResult:
    """What :func:`quantize` did. ``model`` is the int8 model to run (a new module; the input
    model is untouched); ``quantized`` names the layers now in int8, ``skipped`` the layers
    left in float with the reason."""

    model: nn.Module
    mode: str
    quantized: List[str]
    skipped: Dict[str, str]
    compiled: bool

    def summary(self) -> str:
        how = {"dynamic": "dynamic int8 (int8 weights, activations quantized per token)",
               "static": "static int8 (PT2E, x86 inductor quantizer, calibrated)",
               "weight_only": "int8 weights, float compute"}[self.mode]
        lines = [f"quantized: {how}{', compiled' if self.compiled else ''}; "
                 f"{len(self.quantized)} layer(s) in int8"]
        reasons: Dict[str, List[str]] = {}
        for name, why in self.skipped.items():
            reasons.setdefault(why, []).append(name)
        for why, names in reasons.items():
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            lines.append(f"left in float: {shown} ({why})")
        return "\n".join(lines)


def quantize(model: nn.Module, data: Optional[Iterable] = None, *, mode: str = "auto",
             backend: str = "x86", example_inputs: Any = None, max_batches: Optional[int] = 8,
             compile: Optional[bool] = None) -> QuantizationResult:
    """An int8 copy of ``model``, by the recipe ``mode`` names (see the module).

    Args:
        model: the model, in eval mode for inference (it is not changed).
        data: calibration batches for ``"static"`` (tensors, ``(inputs, target)`` pairs or
            tuples of positional inputs); up to ``max_batches`` are used.
        mode: ``"auto"`` picks ``"static"`` for a model with conv layers when ``data`` is
            given, else ``"dynamic"`` for a model with Linear layers.
        backend: ``"x86"`` (CPU kernels through inductor); the only one supported.
        example_inputs: the inputs ``"static"`` exports with (default: the first batch).
        compile: run through ``torch.compile`` (default: only for ``"static"``, whose int8
            kernels exist only there; its eager form runs float reference math, slower than
            the float model).

    Raises:
        ImportError: torchao is not installed.
        ValueError: an unknown mode or backend, ``"static"`` without data, inputs that are not
            positional tensors for ``"static"``, or a model with no layer the recipe quantizes.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not supported: CleanAI quantizes for "
                         f"{', '.join(BACKENDS)} (CPU) through torchao's x86 inductor kernels")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    kinds = _layer_kinds(model)
    if mode == "auto":
        mode = "static" if kinds["conv"] and data is not None else "dynamic"
        logger.info("quantize: mode 'auto' chose %r", mode)
    if mode == "static" and data is None and example_inputs is None:
        raise ValueError("static quantization calibrates on data: pass data= (a few batches "
                         "of real inputs), or use mode='dynamic', which needs none")
    _torchao()
    if mode == "static":
        return _static(model, data, example_inputs, max_batches, kinds,
                       True if compile is None else compile)
    return _weights(model, mode, kinds, bool(compile))


def _torchao():
    """Import torchao (quietly: its import logs a deprecation note from torch)."""
    quiet = logging.getLogger("torch.utils._pytree")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401
        return torchao
    except ImportError as exc:
        raise ImportError("cleanai.deploy.quantize needs torchao: pip install torchao "
                          "(or pip install cleanai[deploy])") from exc
    finally:
        quiet.setLevel(level)


def _layer_kinds(model: nn.Module) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {"linear": [], "conv": [], "recurrent": [], "other_conv": []}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out["linear"].append(name)
        elif isinstance(m, nn.Conv2d):
            out["conv"].append(name)
        elif isinstance(m, (nn.Conv1d, nn.Conv3d, nn.modules.conv._ConvTransposeNd)):
            out["other_conv"].append(name)
        elif isinstance(m, RECURRENT):
            out["recurrent"].append(name)
    return out


def _recurrent_note(kinds: Dict[str, List[str]]) -> Dict[str, str]:
    return {n: "torchao has no int8 recurrent layers" for n in kinds["recurrent"]}


def _weights(model: nn.Module, mode: str, kinds: Dict[str, List[str]],
             compile: bool) -> QuantizationResult:
    from torchao.quantization import (Int8DynamicActivationInt8WeightConfig,
                                      Int8WeightOnlyConfig, quantize_)
    if not kinds["linear"]:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer: mode={mode!r} "
                         f"quantizes Linear layers only"
                         + ("; use mode='static' with data for its convs"
                            if kinds["conv"] else ""))
    out = copy.deepcopy(model).eval()
    config = (Int8DynamicActivationInt8WeightConfig if mode == "dynamic"
              else Int8WeightOnlyConfig)(set_inductor_config=False)  # leave inductor's globals alone
    quantize_(out, config)
    for m in out.modules():  # quantize_ sets an instance extra_repr that stops pickling
        m.__dict__.pop("extra_repr", None)
    skipped = {n: f"mode={mode!r} quantizes Linear layers only" for n in
               kinds["conv"] + kinds["other_conv"]}
    skipped.update(_recurrent_note(kinds))
    run = torch.compile(out) if compile else out
    return QuantizationResult(run, mode, list(kinds["linear"]), skipped, compile)


def _static(model: nn.Module, data: Optional[Iterable], example_inputs: Any,
            max_batches: Optional[int], kinds: Dict[str, List[str]],
            compile: bool) -> QuantizationResult:
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    batches = [_positional(model_inputs(b)) for b in itertools.islice(data or [], max_batches)]
    if data is not None and not batches:
        raise ValueError("static quantization: the data yielded no batches")
    example = _positional(example_inputs) if example_inputs is not None else batches[0]
    if not kinds["conv"] and not kinds["linear"]:
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize")
    try:
        with preserved_state(model):  # every submodule's mode comes back as it was
            model.eval()
            dims = tuple({0: torch.export.Dim.AUTO} for _ in example)
            graph = torch.export.export(model, example, dynamic_shapes=dims).module()
    except Exception as exc:
        raise ValueError(f"static quantization exports the model with torch.export, which "
                         f"failed: {type(exc).__name__}: {exc}. Use mode='dynamic', or make "
                         f"the forward exportable") from exc
    _separate_calls(graph)
    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for b in batches or [example]:
            prepared(*b)
    converted = convert_pt2e(prepared)
    move_exported_model_to_eval(converted)
    _drop_unused(converted)
    skipped = {n: "not annotated by the x86 inductor quantizer" for n in kinds["other_conv"]}
    skipped.update(_recurrent_note(kinds))
    run = StaticInt8Model(converted, compile)
    return QuantizationResult(run, "static", kinds["conv"] + kinds["linear"], skipped, compile)


def _positional(inputs: Any) -> tuple:
    """Inputs as a tuple of tensors (what the static recipe exports with)."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in inputs):
        return tuple(inputs)
    raise ValueError(f"static quantization takes tensors as positional inputs, got "
                     f"{type(inputs).__name__}; for a model called with keywords (a Hugging "
                     f"Face transformer) use mode='dynamic'")


def _separate_calls(graph: torch.fx.GraphModule) -> None:
    """Give each call of a module called several times (torchvision's ResNet blocks call one
    ``self.relu`` twice) a source name of its own. The quantizer matches patterns on
    ``get_source_partitions``, which groups nodes by module name (``source_fn_stack``, else
    the innermost ``nn_module_stack`` entry) and rejects a group with two outputs; one call is
    one connected set of nodes."""
    groups: Dict[str, List[torch.fx.Node]] = {}
    for node in graph.graph.nodes:
        name = _source_name(node)
        if name is not None:
            groups.setdefault(name, []).append(node)
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        root = {n: n for n in nodes}

        def find(n):
            while root[n] is not n:
                root[n] = root[root[n]]
                n = root[n]
            return n
        for n in nodes:
            for user in n.users:
                if user in root:
                    root[find(user)] = find(n)
        calls: Dict[torch.fx.Node, List[torch.fx.Node]] = {}
        for n in nodes:
            calls.setdefault(find(n), []).append(n)
        for k, call in enumerate(list(calls.values())[1:], 1):
            for n in call:
                _rename_source(n, f"__call{k}")


def _source_name(node: torch.fx.Node) -> Optional[str]:
    stack = node.meta.get("source_fn_stack")
    if stack:
        return stack[-1][0]
    modules = node.meta.get("nn_module_stack")
    if node.op == "call_function" and modules:
        return "module:" + list(modules.values())[-1][0]
    return None


def _rename_source(node: torch.fx.Node, suffix: str) -> None:
    stack = node.meta.get("source_fn_stack")
    if stack:
        stack = list(stack)
        stack[-1] = (stack[-1][0] + suffix, stack[-1][1])
        node.meta["source_fn_stack"] = stack
        return
    modules = dict(node.meta["nn_module_stack"])
    key = list(modules)[-1]
    fqn, cls = modules[key]
    modules[key] = (fqn + suffix, cls)
    node.meta["nn_module_stack"] = modules


def _drop_unused(graph: torch.fx.GraphModule) -> None:
    """Remove the float weights convert_pt2e leaves behind (no graph node reads them): they
    would make the int8 model's state_dict larger than the float one."""
    used = {n.target for n in graph.graph.nodes if n.op == "get_attr"}
    for name, _ in list(graph.named_parameters()) + list(graph.named_buffers()):
        if name not in used:
            path, _, attr = name.rpartition(".")
            delattr(graph.get_submodule(path) if path else graph, attr)


class StaticInt8Model(nn.Module):
    """The converted int8 graph of the static recipe, for inference.

    With ``compile``, it runs through ``torch.compile`` with inductor's freezing on, which its
    int8 conv and linear kernels need; the setting holds only during this model's calls.
    Shapes are then static (a new batch size compiles again): inductor's int8 convs fail on a
    dynamic batch. Without ``compile`` the graph runs float reference math (correct, slow).
    ``train()`` / ``eval()`` only set the flag: the graph is in inference form for good."""

    def __init__(self, graph: nn.Module, compile: bool) -> None:
        super().__init__()
        self.graph = graph
        # kept outside the module tree: the state_dict holds the int8 graph's tensors once
        object.__setattr__(self, "_compiled",
                           torch.compile(graph, dynamic=False) if compile else None)
        self._seen: set = set()  # input shapes compiled so far, with inductor's freezing

    def train(self, mode: bool = True) -> "StaticInt8Model":
        self.training = mode  # an exported graph refuses train()/eval() of its own
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled is None:
            return self.graph(*args, **kwargs)
        key = (torch.is_grad_enabled(),) + tuple(
            (tuple(t.shape), t.dtype) for t in list(args) + list(kwargs.values())
            if isinstance(t, torch.Tensor))
        if key in self._seen:  # compiled already: skip the settings (a batch-1 call is short)
            return self._compiled(*args, **kwargs)
        import torch._inductor.config as inductor_config
        with inductor_config.patch(freezing=True), warnings.catch_warnings():
            # inductor's int8 lowering copies a tensor the way torch warns about; not ours
            warnings.filterwarnings("ignore", message="To copy construct from a tensor")
            out = self._compiled(*args, **kwargs)
        self._seen.add(key)
        return out
