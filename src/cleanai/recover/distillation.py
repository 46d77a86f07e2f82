"""Knowledge distillation of a pruned model from its dense teacher: a short training run that
changes values only, so the pruning history still replays and ``save_pruned`` still holds."""
from __future__ import annotations

import difflib
import logging
import math
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layers import get_layer_pruner
from ..core.runtime import ForwardFn, iter_tensors, run_forward
from .losses import auto_loss, loss_value, pick_output, relative_mse
from .common import (RecoveryError, all_or_nothing, check_finite, check_pair, kept_indices,
                     model_device, take, to_device)

__all__ = ["distill", "DistillationReport", "LOSSES"]

logger = logging.getLogger(__name__)

LOSSES = ("auto", "kl", "cosine", "mse")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_WINDOW = 10  # steps averaged for loss_start / loss_end


@dataclass
class DistillationReport:
    """What a :func:`distill` run did: optimizer steps, passes over the data, the loss at its
    start and end (means over the first and last up-to-10 steps) and per step, and the time."""

    steps: int
    epochs_seen: float
    loss_start: float
    loss_end: float
    seconds: float
    loss: str = "custom"
    losses: List[float] = field(default_factory=list)

    def __str__(self) -> str:
        drop = ""
        if self.loss_start > 0 and math.isfinite(self.loss_start):
            drop = f" ({100.0 * (1.0 - self.loss_end / self.loss_start):.1f}% lower)"
        return (f"distillation ({self.loss} loss): {self.steps} steps, {self.epochs_seen:.2f} "
                f"epochs, {self.seconds:.1f} s\n"
                f"  loss {self.loss_start:.4g} -> {self.loss_end:.4g}{drop} "
                f"(mean of the first / last {min(_WINDOW, self.steps)} steps)")

    def to_dict(self) -> Dict[str, Any]:
        """The report as plain JSON-able values."""
        return asdict(self)


def distill(model: nn.Module, teacher: nn.Module, data: Iterable, *,
            steps: Optional[int] = None, epochs: Optional[int] = None,
            loss: Union[str, LossFn] = "auto", temperature: float = 2.0,
            optimizer: Optional[torch.optim.Optimizer] = None, lr: float = 1e-4,
            layers: Optional[Sequence[Union[str, nn.Module]]] = None, layer_weight: float = 1.0,
            label_weight: float = 0.0, forward_fn: Optional[ForwardFn] = None,
            output_fn: Optional[Callable[[Any], torch.Tensor]] = None,
            max_batches: Optional[int] = None, progress: bool = True,
            seed: int = 0, train_mode: bool = True) -> DistillationReport:
    """Train the pruned ``model`` to reproduce the dense ``teacher`` (the model as it was before
    pruning) on ``data``; only values change, never shapes.

    The student trains in train mode (see ``train_mode``); the teacher runs in eval mode under ``no_grad``. It runs
    ``steps`` optimizer steps, cycling over ``data`` (re-iterated each pass), or ``epochs`` passes
    (one epoch when neither is given). A pass reads at most ``max_batches`` batches. A ``data``
    without ``len()`` (a generator) is read once and kept in memory.

    Args:
        loss: ``"kl"`` (KL(teacher || student) of softmax(logits / T) over the last dim, times
            T^2), ``"cosine"`` (1 - cosine similarity over the last dim), ``"mse"`` (mean
            squared error / mean square of the teacher), a callable ``(student, teacher) ->
            scalar``, or ``"auto"``: kl for classifier outputs (``.logits`` or 2-D), cosine for
            hidden states (``.last_hidden_state`` or 3-D and more).
        optimizer: used as given (no schedule); by default AdamW(lr) over the parameters that
            require grad, with the lr decayed to 0 along a cosine over the run.
        layers: names of modules whose outputs are matched too (MSE / teacher mean square,
            times ``layer_weight``); a pruned layer's teacher output keeps the channels the
            model kept. For a pretrained transformer whose hidden size was kept, every
            layer's output (``encoder.layer.{i}``) is a good choice.
        label_weight: mixes cross-entropy on the labels of ``(inputs, labels)`` batches:
            ``(1 - label_weight) * distillation + label_weight * CE``.
        output_fn: ``output -> tensor`` to compare; by default the output itself, its
            ``.logits``, its ``.last_hidden_state`` or the first tensor of a tuple.
        seed: the run is deterministic for a seed; the caller's RNG state is left untouched.
        train_mode: the student runs in train mode (dropout on, BatchNorm statistics updated);
            ``False`` keeps it in eval mode, which suits a short distillation of a pretrained
            transformer, where dropout noise outweighs the few steps' signal.

    Padded token positions (where a dict batch's ``attention_mask`` is 0) count neither in the
    output loss nor in the layer terms.

    Every module's train/eval flag and ``requires_grad`` are restored, every hook removed and
    the model's ``.grad`` fields left as None. Any error (also a NaN loss or KeyboardInterrupt)
    leaves the model's values exactly as they were.

    Raises:
        RecoveryError: model not pruned, teacher of another architecture, no data, a batch
            that does not run, outputs of different shapes, a non-finite loss.
        ValueError: a bad argument (steps, epochs, temperature, loss name, layer names, ...).
    """
    check_pair(model, teacher, "distill")
    _check_args(steps, epochs, temperature, lr, layer_weight, label_weight, max_batches, loss)
    if data is None:
        raise RecoveryError("distill needs data: pass a DataLoader or an iterable of batches")
    names = _layer_names(model, layers)
    params = _trainable(model, optimizer)

    batches, per_pass = _source(data, max_batches)
    total = steps if steps is not None else (epochs or 1) * per_pass if per_pass else None

    mine = list(model.modules()) + list(teacher.modules())
    modes = [(m, m.training) for m in mine]
    flags = [(p, p.requires_grad) for p in list(model.parameters()) + list(teacher.parameters())]
    device, t_device = model_device(model), model_device(teacher)
    rng_devices = [device] if device.type == "cuda" else []
    losses: List[float] = []
    seen = [0, 0]  # batches of the current pass, full passes done
    start = time.perf_counter()
    bar = _bar(total, progress)
    try:
        with ExitStack() as stack:
            stack.enter_context(all_or_nothing(model))
            stack.enter_context(torch.random.fork_rng(devices=rng_devices))
            stack.enter_context(torch.enable_grad())  # also when called under no_grad
            torch.manual_seed(seed)
            captured = stack.enter_context(_Hooks(model, teacher, names))
            opt = optimizer if optimizer is not None else torch.optim.AdamW(params, lr=lr)
            model.train(train_mode)
            teacher.eval()
            state = _State(loss, temperature, output_fn, forward_fn, layer_weight, label_weight,
                           kept_indices(model) if names else {}, names, captured)
            for i, batch in enumerate(_stream(batches, steps, epochs, max_batches, seen)):
                if optimizer is None and total:
                    for g in opt.param_groups:
                        g["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * min(i, total) / total))
                opt.zero_grad(set_to_none=True)
                value = state.loss(model, teacher, batch, i, device, t_device)
                check_finite(value.detach(), f"the distillation loss at step {i}")
                value.backward()
                opt.step()
                losses.append(float(value.detach()))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{sum(losses[-_WINDOW:]) / len(losses[-_WINDOW:]):.4g}")
                elif progress and (i + 1) % max(1, (total or 100) // 10) == 0:
                    logger.info("distill: step %d%s, loss %.4g", i + 1,
                                f"/{total}" if total else "", losses[-1])
            if not losses:
                raise RecoveryError("distill: the data yielded no batches")
    finally:
        if bar is not None:
            bar.close()
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)
        for p in model.parameters():
            p.grad = None

    done = seen[1] + (seen[0] / per_pass if per_pass else 0.0)
    head, tail = losses[:_WINDOW], losses[-_WINDOW:]
    return DistillationReport(steps=len(losses), epochs_seen=float(done),
                              loss_start=sum(head) / len(head), loss_end=sum(tail) / len(tail),
                              seconds=time.perf_counter() - start, loss=state.name,
                              losses=losses)


def _check_args(steps, epochs, temperature, lr, layer_weight, label_weight, max_batches, loss) -> None:
    def positive_int(name, v):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"distill: {name} must be a positive int, got {v!r}")

    positive_int("steps", steps)
    positive_int("epochs", epochs)
    positive_int("max_batches", max_batches)
    if steps is not None and epochs is not None:
        raise ValueError("distill: pass steps or epochs, not both")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"distill: temperature must be > 0, got {temperature!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"distill: lr must be > 0, got {lr!r}")
    if not (isinstance(layer_weight, (int, float)) and layer_weight >= 0):
        raise ValueError(f"distill: layer_weight must be >= 0, got {layer_weight!r}")
    if not (isinstance(label_weight, (int, float)) and 0 <= label_weight <= 1):
        raise ValueError(f"distill: label_weight must be in [0, 1], got {label_weight!r}")
    if not callable(loss) and loss not in LOSSES:
        raise ValueError(f"distill: unknown loss {loss!r}; choose one of {LOSSES} or pass a "
                         f"callable (student, teacher) -> scalar")


def _layer_names(model: nn.Module, layers) -> List[str]:
    """The qualified names of ``layers`` (names or modules of ``model``), checked."""
    if layers is None:
        return []
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    known = dict(model.named_modules())
    by_id = {id(m): n for n, m in known.items()}
    out = []
    for layer in layers:
        if isinstance(layer, nn.Module):
            if id(layer) not in by_id:
                raise ValueError(f"distill: layers holds a {type(layer).__name__} that is not "
                                 f"a module of the model")
            out.append(by_id[id(layer)])
        elif isinstance(layer, str):
            if layer not in known:
                close = difflib.get_close_matches(layer, [n for n in known if n], n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise ValueError(f"distill: the model has no layer named {layer!r}{hint}")
            out.append(layer)
        else:
            raise TypeError(f"distill: layers must hold module names or modules, "
                            f"got {type(layer).__name__}")
    return list(dict.fromkeys(out))


def _trainable(model: nn.Module, optimizer) -> List[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        if not params:
            raise ValueError("distill: no parameter of the model requires grad")
        return params
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"distill: optimizer must be a torch.optim.Optimizer instance, got "
                        f"{type(optimizer).__name__}")
    ours = {id(p) for p in model.parameters()}
    if any(id(p) not in ours for g in optimizer.param_groups for p in g["params"]):
        raise ValueError("distill: the optimizer holds tensors that are not parameters of the "
                         "pruned model (was it built before pruning, or over the teacher?); "
                         "build it over model.parameters() after pruning")
    return params


def _source(data: Iterable, max_batches: Optional[int]) -> Tuple[Iterable, Optional[int]]:
    """The batches to re-iterate and the number of batches in a pass (None when unknown)."""
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        n = None
    if n is not None:
        return data, min(n, max_batches) if max_batches else n
    kept = take(data, max_batches, "distill")
    return kept, len(kept)


def _stream(batches: Iterable, steps: Optional[int], epochs: Optional[int],
            max_batches: Optional[int], seen: List[int]) -> Iterator[Any]:
    """Batches for ``steps`` steps (cycling) or ``epochs`` passes of at most ``max_batches``
    batches; ``seen`` counts progress: [batches of this pass, passes done]."""
    done = 0
    passes = epochs or 1
    while True:
        seen[0] = 0
        for batch in batches:
            if max_batches is not None and seen[0] >= max_batches:
                break
            yield batch
            done += 1
            seen[0] += 1
            if steps is not None and done >= steps:
                return
        if seen[0] == 0:
            raise RecoveryError("distill: the data yielded no batches" +
                                (f" on pass {seen[1] + 1}" if seen[1] else ""))
        seen[1] += 1
        seen[0] = 0
        if steps is None and seen[1] >= passes:
            return


def _bar(total: Optional[int], progress: bool):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="distilling", unit="step")


class _State:
    """One step's loss: student and teacher forwards, outputs, layer terms, labels."""

    def __init__(self, loss, temperature, output_fn, forward_fn, layer_weight, label_weight,
                 kept, names, captured) -> None:
        self.loss_arg, self.temperature = loss, float(temperature)
        self.output_fn, self.forward_fn = output_fn, forward_fn
        self.layer_weight, self.label_weight = float(layer_weight), float(label_weight)
        self.kept, self.names, self.captured = kept, names, captured
        self.name = loss if isinstance(loss, str) and loss != "auto" else \
            ("custom" if callable(loss) else "auto")

    def loss(self, model, teacher, batch, i, device, t_device) -> torch.Tensor:
        from ..importance.stats import drop_padding, model_inputs, padding_mask

        inputs = model_inputs(batch)
        labels = batch[1] if inputs is not batch and isinstance(batch, (tuple, list)) else None
        if self.label_weight > 0 and labels is None:
            raise ValueError(f"distill: label_weight={self.label_weight} needs (inputs, labels) "
                             f"batches; batch {i} is a {type(batch).__name__} without labels")
        for side in self.captured.values():
            side.clear()
        try:
            with torch.no_grad():
                t_out = run_forward(teacher, to_device(inputs, t_device), self.forward_fn)
        except Exception as e:
            raise RecoveryError(f"distill: batch {i} does not run through the teacher: "
                                f"{type(e).__name__}: {e}") from e
        try:
            s_out = run_forward(model, to_device(inputs, device), self.forward_fn)
        except Exception as e:
            raise RecoveryError(f"distill: batch {i} does not run through the model: "
                                f"{type(e).__name__}: {e}") from e
        pick = self.output_fn or pick_output
        s, t = pick(s_out), pick(t_out)
        if not (isinstance(s, torch.Tensor) and isinstance(t, torch.Tensor)):
            raise RecoveryError("distill: output_fn must return a tensor")
        t = t.to(s.device)
        if s.shape != t.shape:
            raise RecoveryError(f"distill: the model's output has shape {tuple(s.shape)} but the "
                                f"teacher's has {tuple(t.shape)}; the outputs compared must "
                                f"match (pass output_fn to pick matching tensors)")
        if self.name == "auto":
            self.name = auto_loss(s_out, s, self.output_fn is not None)
        mask = padding_mask(inputs)
        if callable(self.loss_arg):
            value = self.loss_arg(s, t)
            if not (isinstance(value, torch.Tensor) and value.numel() == 1):
                raise ValueError("distill: the loss callable must return a scalar tensor")
            value = value.reshape(())
        else:
            # token outputs of a batch with an attention_mask: padded positions do not count
            real_s = drop_padding(s, s.dim() - 1, mask)[0]
            real_t = drop_padding(t, t.dim() - 1, mask)[0]
            value = loss_value(self.name, real_s, real_t, self.temperature)
        if self.names and self.layer_weight > 0:
            value = value + self.layer_weight * self._layer_terms(model, device, mask)
        if self.label_weight > 0:
            value = (1 - self.label_weight) * value + self.label_weight * self._ce(s, labels, i)
        return value

    def _layer_terms(self, model, device, mask) -> torch.Tensor:
        """The sum over ``layers`` of each output's MSE / the teacher's mean square; token
        outputs ``[batch, tokens, ..., channels]`` of a batch with an ``attention_mask`` count
        their real tokens only."""
        from ..importance.stats import drop_padding

        total = torch.zeros((), device=device)
        student, teacher = self.captured["model"], self.captured["teacher"]
        for name in self.names:
            s_list, t_list = student.get(name, []), teacher.get(name, [])
            if not s_list or len(s_list) != len(t_list):
                raise RecoveryError(f"distill: layer {name!r} ran {len(s_list)} time(s) in the "
                                    f"model and {len(t_list)} in the teacher on one batch; "
                                    f"match layers that run in every forward")
            for s, t in zip(s_list, t_list):
                t = self._align(model, name, s, t.to(s.device))
                s = drop_padding(s, s.dim() - 1, mask)[0]
                t = drop_padding(t, t.dim() - 1, mask)[0]
                total = total + relative_mse(s.float(), t.float())
        return total

    def _align(self, model, name, s, t) -> torch.Tensor:
        """The teacher's output of layer ``name`` restricted to the channels the model kept."""
        kept = self.kept.get((name, "out", -1))
        if kept is not None and s.shape != t.shape:
            module = model.get_submodule(name)
            pruner = get_layer_pruner(module, inherited=True)
            if pruner is not None:
                dim = pruner.out_dim(module, t.dim())
            else:
                diff = [d for d in range(t.dim()) if s.dim() == t.dim() and s.shape[d] != t.shape[d]]
                dim = diff[0] if len(diff) == 1 else -1
            if s.dim() == t.dim() and s.shape[dim] == len(kept) and t.shape[dim] > int(kept.max()):
                t = t.index_select(dim, kept.to(t.device))
        if s.shape != t.shape:
            raise RecoveryError(f"distill: layer {name!r} outputs shape {tuple(s.shape)} in the "
                                f"model but {tuple(t.shape)} in the teacher, and the pruning "
                                f"history does not say which channels it kept; match the layer "
                                f"that produces these channels (a conv or linear) instead")
        return t

    def _ce(self, s: torch.Tensor, labels: torch.Tensor, i: int) -> torch.Tensor:
        labels = labels.to(s.device)
        if s.dim() != 2 or labels.dim() != 1 or labels.shape[0] != s.shape[0]:
            raise RecoveryError(f"distill: label_weight needs class scores of shape (N, C) and "
                                f"labels of shape (N,); batch {i} gives {tuple(s.shape)} and "
                                f"{tuple(labels.shape)}")
        return F.cross_entropy(s.float(), labels.long())


class _Hooks:
    """Forward hooks recording the outputs of ``names`` in both models; removed on exit."""

    def __init__(self, model: nn.Module, teacher: nn.Module, names: List[str]) -> None:
        self.models = {"model": model, "teacher": teacher}
        self.names = names
        self.handles: List[Any] = []

    def __enter__(self) -> Dict[str, Dict[str, List[torch.Tensor]]]:
        captured: Dict[str, Dict[str, List[torch.Tensor]]] = {"model": {}, "teacher": {}}

        def make(store: Dict[str, List[torch.Tensor]], name: str):
            def fn(module, args, output) -> None:
                t = next(iter_tensors(output), None)
                if t is not None:
                    store.setdefault(name, []).append(t)
            return fn

        try:
            for side, m in self.models.items():
                for name in self.names:
                    module = m.get_submodule(name)
                    self.handles.append(module.register_forward_hook(make(captured[side], name)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return captured

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
