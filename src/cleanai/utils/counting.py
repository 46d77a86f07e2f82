"""Model size and cost: unique parameters, and multiply-accumulates of one forward pass.

MACs come from :class:`torch.utils.flop_counter.FlopCounterMode`, which counts the matrix
products and convolutions PyTorch dispatches (the usual fvcore/ptflops convention: element-wise
ops, norms and activations are not counted). One MAC is two FLOPs.

Recurrent layers (``nn.RNN``/``LSTM``/``GRU`` and their cells) run as fused kernels that the
counter has no formula for (oneDNN's LSTM on CPU, cuDNN on GPU), so they are counted by
:class:`RecurrentMacs` instead: every step multiplies each weight matrix once.
"""
from __future__ import annotations

import io
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils.rnn import PackedSequence
from torch.utils.flop_counter import FlopCounterMode

from ..core.runtime import ForwardFn, preserved_state, run_forward

__all__ = ["count_params", "count_macs"]


def count_params(model: nn.Module) -> int:
    """Number of parameter elements in ``model``; a parameter shared by several layers (tied
    weights) is counted once.

    Raises:
        ValueError: if the model still has uninitialized (lazy) parameters.
    """
    total = 0
    for name, p in model.named_parameters():  # named_parameters() skips repeats of a Parameter
        if isinstance(p, UninitializedParameter):
            raise ValueError(
                f"{type(model).__name__}.{name} is a lazy parameter that is not initialized yet; "
                f"run one forward pass before counting parameters.")
        total += p.numel()
    return total


def count_macs(model: nn.Module, example_inputs: Any,
               forward_fn: Optional[ForwardFn] = None) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on ``example_inputs``.

    Args:
        model: any ``nn.Module``; its train/eval mode, buffers and the RNG are left as they were.
        example_inputs: a tensor, a tuple (passed positionally) or a dict (passed as keywords),
            on the model's device. The batch size counts: MACs grow with it.
        forward_fn: optional ``forward_fn(model, example_inputs) -> outputs`` for models that
            need a custom call.

    Returns:
        MACs as counted by ``FlopCounterMode`` (FLOPs // 2), under ``torch.no_grad``.

    Raises:
        RuntimeError: if the forward pass fails, naming the model and the original error.
    """
    counter, recurrent = counted_forward(model, example_inputs, forward_fn, "count_macs")
    return recurrent.total(counter)


def counted_forward(model: nn.Module, example_inputs: Any, forward_fn: Optional[ForwardFn],
                    caller: str):
    """One forward under ``torch.no_grad`` with the model left as it was, counted: returns the
    ``FlopCounterMode`` and the :class:`RecurrentMacs` that watched it. A failing forward
    raises ``RuntimeError`` naming ``caller`` and the model."""
    counter = FlopCounterMode(display=False)
    with preserved_state(model, same_modes=True), torch.no_grad(), \
            RecurrentMacs(model, counter) as recurrent, no_fused_attention():
        try:
            with counter:
                run_forward(model, example_inputs, forward_fn)
        except Exception as exc:  # the user's forward: report it with the model's name
            raise RuntimeError(
                f"{caller} could not run {type(model).__name__} on the example inputs: "
                f"{type(exc).__name__}: {exc}") from exc
    return counter, recurrent


@contextmanager
def no_fused_attention() -> Iterator[None]:
    """Switch off ``nn.MultiheadAttention``'s and ``nn.TransformerEncoderLayer``'s inference
    fast path for the block: its one fused kernel is invisible to ``FlopCounterMode``, which
    would count none of the layer's projections and attention products."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


class RecurrentMacs:
    """Counts the recurrent layers of ``model`` while ``counter`` counts the rest.

    Per step (one token of one sequence), a recurrent layer multiplies every weight matrix once:
    for each layer and direction ``gates * hidden * (input + hidden_out)`` plus
    ``hidden * proj_size`` with projections (``gates``: 4 LSTM, 3 GRU, 1 RNN), i.e. the number of
    elements of its ``weight_*`` tensors; biases and the gates' element-wise math are not counted,
    as for other layers. Steps are ``seq_len * batch`` (the real lengths of a packed sequence).
    Whatever the counter saw inside these layers is replaced by this count.

    Use as a context around the counted forward, then read :meth:`total` and :attr:`macs`
    (module name -> MACs of its calls).
    """

    def __init__(self, model: nn.Module, counter: FlopCounterMode) -> None:
        self.counter = counter
        self.layers = {m: name for name, m in model.named_modules()
                       if isinstance(m, (nn.RNNBase, nn.RNNCellBase))}
        self.macs: Dict[str, int] = {}
        self.seen_flops = 0  # what the counter counted inside recurrent layers
        self._start: Dict[int, int] = {}
        self._handles = []

    def __enter__(self) -> "RecurrentMacs":
        for m in self.layers:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, module, args) -> None:
        self._start[id(module)] = self.counter.get_total_flops()

    def _post(self, module, args, kwargs, output) -> None:
        self.seen_flops += self.counter.get_total_flops() - self._start.pop(id(module), 0)
        name = self.layers[module]
        x = args[0] if args else kwargs.get("input")  # ``lstm(input=x)`` counts too
        self.macs[name] = self.macs.get(name, 0) + recurrent_macs(module, x)

    def total(self, counter: FlopCounterMode) -> int:
        """All MACs: the counter's, with recurrent layers counted here."""
        return (int(counter.get_total_flops()) - self.seen_flops) // 2 + sum(self.macs.values())


def recurrent_macs(module: nn.Module, x: Any) -> int:
    """MACs of one call of a recurrent layer or cell on input ``x`` (see :class:`RecurrentMacs`)."""
    per_step = sum(p.numel() for n, p in module.named_parameters(recurse=False)
                   if n.startswith("weight_"))
    if isinstance(x, PackedSequence):
        steps = x.data.shape[0]
    elif not isinstance(x, torch.Tensor):
        steps = 0
    elif isinstance(module, nn.RNNCellBase):
        steps = x.shape[0] if x.dim() == 2 else 1
    else:
        steps = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
    return steps * per_step


def disk_size(model: nn.Module) -> Optional[int]:
    """Bytes ``torch.save(model.state_dict())`` writes: the model's size on disk, counted
    without keeping the bytes; ``None`` for a model on the meta device, whose tensors hold no
    bytes to save."""
    state = model.state_dict()
    if any(t.is_meta for t in state.values() if isinstance(t, torch.Tensor)):
        return None
    sink = _CountingWriter()
    torch.save(state, sink)
    return sink.written


class _CountingWriter(io.RawIOBase):
    """A write-only stream that only counts the bytes written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        self.written += n
        return n
