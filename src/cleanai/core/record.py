"""Record one forward of a model for the tracer: the known layers (:class:`ModelScan`), their
calls, each module's autograd sequence range, and the operand shapes of adds and subs.

:func:`cleanai.core.trace.trace` runs :func:`record_forward` (more than once when a branch only runs in
training) and hands the recording to the autograd walk.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .layers import LayerPruner, get_layer_pruner
from .runtime import ForwardFn, LeanRecordingError, iter_tensors, run_forward
from .tied import is_subclass_layer
from .operands import NoTorchFunction, OperandRecorder, step_aside, step_back


@dataclasses.dataclass(eq=False)
class ModuleCall:
    """One call of a known layer during the trace."""

    name: str
    module: nn.Module
    pruner: LayerPruner
    input_key: Optional[Tuple[Any, int]]
    input_shape: Optional[Tuple[int, ...]]
    outputs: List[Tuple[Tuple[Any, int], Tuple[int, ...]]]
    #: the tensor inputs after the first: (key or None for a constant, shape)
    extras: List[Tuple[Optional[Tuple[Any, int]], Tuple[int, ...]]] = dataclasses.field(
        default_factory=list)


class ModelScan:
    """One walk over the model's modules: everything the trace needs to know before it runs.

    ``named`` lists ``(qualified name, module)`` as ``named_modules()`` does; ``known`` maps each
    outermost module with a LayerPruner to ``(name, pruner)``; ``params``/``buffers`` are the
    model's tensors (each once); ``param_names`` maps ``id(parameter)`` to its first name and
    ``owned`` maps ``id(parameter)`` to the known layer holding it; ``subclasses`` maps the
    subclasses of known layers with a forward of their own (see core/tied.py) like ``known``."""

    def __init__(self, model: nn.Module) -> None:
        self.named = list(model.named_modules())
        self.modules = [m for _, m in self.named]
        self.known: Dict[nn.Module, Tuple[str, LayerPruner]] = {}
        self.subclasses: Dict[nn.Module, Tuple[str, LayerPruner]] = {}
        self.param_names: Dict[int, str] = {}
        self.owned: Dict[int, nn.Module] = {}
        self.params: List[torch.Tensor] = []
        self.buffers: List[torch.Tensor] = []
        #: buffers outside the known layers, by qualified name (a position table added to
        #: the hidden states: see OperandRecorder's ``buffer_operands``)
        self.free_buffers: Dict[str, torch.Tensor] = {}
        inside: Dict[str, nn.Module] = {}  # name -> the known layer it is (or is inside)
        seen_buffers = set()
        for name, m in self.named:
            owner = inside.get(name.rpartition(".")[0]) if name else None
            if owner is None:
                pruner = get_layer_pruner(m)
                if pruner is not None:
                    self.known[m] = (name, pruner)
                    owner = m
                elif is_subclass_layer(m):
                    self.subclasses[m] = (name, get_layer_pruner(m, inherited=True))
            if owner is not None:
                inside[name] = owner
            dot = name + "." if name else ""
            for k, p in m._parameters.items():
                if p is None:
                    continue
                if id(p) not in self.param_names:
                    self.param_names[id(p)] = dot + k
                    self.params.append(p)
                if owner is not None:  # a weight tied across known layers: the last one
                    self.owned[id(p)] = owner
            for k, b in m._buffers.items():
                if b is not None and id(b) not in seen_buffers:
                    seen_buffers.add(id(b))
                    self.buffers.append(b)
                    if owner is None and b.dim() > 0 and b.device.type != "meta":
                        self.free_buffers[dot + k] = b


def record_forward(model: nn.Module, inputs: Any, forward_fn: Optional[ForwardFn], known, train,
                   named: Optional[List[Tuple[str, nn.Module]]] = None, locate: bool = False,
                   lean: bool = True, buffers: Optional[Dict[str, torch.Tensor]] = None):
    """One recorded forward: known-layer calls and, with ``locate=True``, each module's
    autograd sequence range (only needed to say where an op ran; a hook on every module
    costs time, so the tracer asks for it only when it has something to report).

    Returns ``(calls, intervals, output, watched)``: ``watched`` is the function mode that
    saw the torch calls outside the known layers (``shapes``: add/sub operand shapes and
    splits; ``sized``: the first call that may hold a width of its own, see core/widths.py;
    ``made``: the autograd nodes those calls made; ``buffer_operands``: see
    :class:`~cleanai.core.operands.OperandRecorder`, for the ``buffers`` given by name).

    ``train=True`` runs in train mode, ``None`` in the modes the caller left the model in.
    ``named`` is ``list(model.named_modules())`` when the caller has it already.
    ``lean=True`` drops the activations autograd saves for backward (the walk reads the
    graph's shapes, never those values): the forward frees them as it goes, as it would
    without autograd, instead of holding every activation of the model at once. The
    recording cannot be backpropagated then; a forward that runs backward itself raises
    :class:`LeanRecordingError`, and the caller records again with ``lean=False``.
    """
    if named is None:
        named = list(model.named_modules())
    recorder = OperandRecorder(buffers)
    calls: List[ModuleCall] = []
    intervals: List[Tuple[int, int, str]] = []
    open_calls: Dict[int, int] = {}

    def last_seq(obj) -> int:
        # the newest autograd node among these tensors: ops a module creates come after it
        if type(obj) is tuple and len(obj) == 1:
            obj = obj[0]
        if isinstance(obj, torch.Tensor):  # the common case, without the generic walk
            fn = obj.grad_fn
            return -1 if fn is None else fn._sequence_nr()
        return max((t.grad_fn._sequence_nr() for t in iter_tensors(obj) if t.grad_fn is not None),
                   default=-1)

    # The hooks only read tensor attributes (grad_fn, shape): outside the operand recorder, so
    # that each read is not dispatched to it (most of its calls would be these reads).
    def pre_hook(module, args, kwargs) -> None:
        with NoTorchFunction():  # (a block called with keywords only: its inputs are there)
            open_calls[id(module)] = last_seq((args, kwargs) if kwargs else args)

    def post_hook(name):
        def hook(module, args, output) -> None:
            with NoTorchFunction():
                intervals.append((open_calls.pop(id(module), -1) + 1, last_seq(output), name))
        return hook

    # Inside a known layer no operand shape is needed (the walk never enters it): the
    # recorder steps aside there, so the layer's own ops are not dispatched to it. So it does
    # in a stock activation, pooling or dropout layer (width-free, no add, sub or split
    # inside), whose calls would otherwise each go through torch's Python dispatch. The
    # forward is wrapped (lighter than hooks, which put every call of the layer on
    # nn.Module's slow path); the recorder comes back even when the layer raises, and
    # ``after(args, kwargs, output)`` then notes the call and returns the output.
    def stepping_aside(forward, after):
        def forward_aside(*args, **kwargs):
            aside = step_aside(recorder)
            try:
                output = forward(*args, **kwargs)
            finally:
                step_back(aside)
            with NoTorchFunction():
                return after(args, kwargs, output)
        return forward_aside

    def recorded(name, module, pruner):
        def after(args, kwargs, output):
            if isinstance(output, torch.Tensor) and output._base is not None and \
                    output.grad_fn is not None:
                # an output that is a view (InstanceNorm's) gets a new autograd node from an
                # in-place op after it (ReLU(inplace=True)); a copy keeps the recorded one
                output = output.clone()
            record_call(name, module, pruner, args, kwargs, output)
            return output
        return after

    def seen(args, kwargs, output):
        recorder.saw(output)
        return output

    def record_call(name, module, pruner, args, kwargs, output) -> None:
        if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            x, rest = args[0], []  # the common case, without the generic walk
        else:
            tensors = list(iter_tensors((args, kwargs)))
            x, rest = (tensors[0], tensors[1:]) if tensors else (None, [])
        in_key = tensor_key(x)
        outs = []
        for t in (output,) if isinstance(output, torch.Tensor) else iter_tensors(output):
            k = tensor_key(t)
            if k is not None and k != in_key:
                outs.append((k, tuple(t.shape)))
                recorder.results[(id(k[0]), k[1])] = weakref.ref(t)
        calls.append(ModuleCall(name, module, pruner, in_key,
                                None if x is None else tuple(x.shape), outs,
                                [(tensor_key(t), tuple(t.shape)) for t in rest]))

    modes = [(m, m.training) for _, m in named]
    handles = []
    wrapped: List[Tuple[nn.Module, Any]] = []
    try:
        if train:
            model.train()
        # sequence ranges only for modules whose ops the walk can meet: the ops inside a
        # known layer are never walked (it jumps from the layer's outputs to its input), and
        # nn.Sequential's own forward makes no op (each op falls in a child's range)
        opaque = set()
        for name, m in named if locate else ():
            if m in known or (name and name.rpartition(".")[0] in opaque):
                opaque.add(name)
                continue
            if type(m).forward is _SEQUENTIAL_FORWARD:
                continue
            handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(m.register_forward_hook(post_hook(name)))
        for m, (name, pruner) in known.items():  # an instance attribute shadows the method
            own = m.__dict__.get("forward")
            wrapped.append((m, own))
            m.__dict__["forward"] = stepping_aside(m.forward, recorded(name, m, pruner))
        for _, m in named:
            if type(m) in _QUIET and "forward" not in m.__dict__:
                wrapped.append((m, None))
                m.__dict__["forward"] = stepping_aside(m.forward, seen)
        lean_saves = torch.autograd.graph.saved_tensors_hooks(_drop_activation, _dropped) \
            if lean else contextlib.nullcontext()
        with torch.enable_grad(), recorder, lean_saves:
            output = run_forward(model, inputs, forward_fn)
    finally:
        for h in handles:
            h.remove()
        for m, own in wrapped:
            if own is None:
                del m.__dict__["forward"]
            else:
                m.__dict__["forward"] = own
        for m, mode in modes:
            if m.training != mode:
                m.training = mode
    return calls, intervals, output, recorder


_SEQUENTIAL_FORWARD = nn.Sequential.forward

# PyTorch's layers whose forward only applies a width-free function to its input and makes
# no view (exact classes: a subclass may have a forward of its own)
_QUIET = frozenset({
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid,
    nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softmax,
    nn.LogSoftmax, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d})


def _drop_activation(t: torch.Tensor) -> Optional[torch.Tensor]:
    """What a lean recording keeps of a tensor autograd saves: nothing of a floating-point
    activation (one with an autograd node); anything else (an index, a mask, a parameter, a
    constant) as it is. Handlers read saved tensors only for operands outside the graph."""
    if t.grad_fn is not None and t.is_floating_point():
        return None
    return t


def _dropped(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None:
        raise LeanRecordingError("a lean recording keeps no activations for backward")
    return t

def _missed(known, calls: List[ModuleCall]) -> List[str]:
    """Names of the known layers with parameters that no call in ``calls`` ran."""
    called = {c.module for c in calls}
    return [name for m, (name, _) in known.items() if m not in called and (
        any(p is not None for p in m._parameters.values()) or any(True for _ in m.parameters()))]


def unreached_count(known, bare: set, recording) -> Tuple[int, int]:
    """(known layers with parameters, bare parameters) that a recording did not reach.

    A layer counts as reached when it ran, or when its parameters took part in the graph
    anyway (a layer whose weights the model passes to ``F.linear`` itself).
    """
    missed = _missed(known, recording[0])
    if not missed and not bare:
        return 0, 0
    reached = _reached(recording[2])
    by_name = {name: m for m, (name, _) in known.items()}
    layers = sum(1 for name in missed
                 if not any(id(p) in reached for p in by_name[name].parameters()))
    return layers, len(bare - reached)


def _reached(output: Any) -> set:
    """``id`` of every leaf (parameter) the autograd graph of ``output`` reaches."""
    seen, found = set(), set()
    stack = [t.grad_fn for t in iter_tensors(output) if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:
            found.add(id(var))
        stack.extend(f for f, _ in fn.next_functions if f is not None and f not in seen)
    return found


def warn_unreached(known, calls: List[ModuleCall], seen) -> None:
    """Warn once about known layers with parameters that neither ran nor were reached."""
    missed = [name for name in _missed(known, calls) if name not in seen]
    if missed:
        shown = ", ".join(missed[:5]) + (" ..." if len(missed) > 5 else "")
        count = "1 layer" if len(missed) == 1 else f"{len(missed)} layers"
        warnings.warn(f"{count} did not run on the example inputs ({shown}); "
                      f"CleanAI cannot see their channels, so it will not adjust them. Pass "
                      f"inputs (or a forward_fn) that run every branch you will use.", stacklevel=3)


def doubled(t: torch.Tensor) -> torch.Tensor:
    """The batch twice over: train-mode BatchNorm fails on a batch of one 1x1 map."""
    return torch.cat([t, t]) if t.dim() > 0 else t


def as_leaf(t: torch.Tensor) -> torch.Tensor:
    """A float input that takes part in autograd, so ops on it show in the graph; the clone of
    the leaf lets the model modify its input in place."""
    if t.is_floating_point():
        return t.detach().clone().requires_grad_(True).clone()
    return t.clone()


def tensor_key(t: Optional[torch.Tensor]):
    """``(grad_fn, output_nr)``: names a tensor in the autograd graph (``None`` for a constant)."""
    if t is None or t.grad_fn is None:
        return None
    return (t.grad_fn, t.output_nr)


def describe_inputs(inputs: Any) -> str:
    """Shapes and dtypes of the example inputs, for error messages."""
    shapes = [f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in iter_tensors(inputs)]
    return ", ".join(shapes) or "no tensors"
