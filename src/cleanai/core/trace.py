"""Trace a model once: the known layers' calls recorded (:mod:`cleanai.core.record`), one
walk over the autograd graph (:mod:`cleanai.core.walk`).

Known layers (those with a :class:`~cleanai.core.layers.LayerPruner`) are opaque: the walk
jumps from their outputs to their inputs. Everything else is followed op by op through
``grad_fn.next_functions``, with an explicit stack, and channel ids are pushed forward through
:mod:`cleanai.core.ops`. This module chooses the recording (the model's modes, train mode,
a doubled batch), keeps the model as it was, and says which code the check forward must cover.
"""
from __future__ import annotations

import contextlib
import logging
import traceback
import warnings
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .record import (ModelScan, as_leaf, describe_inputs, doubled, record_forward,
                     unreached_count, warn_unreached)
from .runtime import ForwardFn, LeanRecordingError, map_tensors, preserved_state
from .tied import tie_shared_weights
from .trace_result import TraceResult
from .walk import walk, with_inputs
from .widths import code_fingerprint, opaque_code

logger = logging.getLogger(__name__)


class TraceError(RuntimeError):
    """The model could not be run on the example inputs."""


def trace(model: nn.Module, example_inputs: Any, forward_fn: Optional[ForwardFn] = None,
          attention: str = "heads") -> TraceResult:
    """Run ``model`` once on ``example_inputs`` and follow every channel (see module doc).

    ``attention`` says what a split of a feature dim into ``[heads, head_dim]`` makes
    removable: ``"heads"`` (whole heads) or ``"head_dims"`` (the same dims of every head)."""
    if attention not in ("heads", "head_dims"):
        raise ValueError(f"attention must be 'heads' or 'head_dims', got {attention!r}")
    scan = ModelScan(model)
    known, names_of_params, owned = scan.known, scan.param_names, scan.owned

    # An attempt in train mode below adds a full save (BatchNorm updates its statistics); every
    # save is restored after the walk, which reads tensors the forward saved (an index buffer
    # restored before it would have a new version, and autograd refuses to hand it out).
    with contextlib.ExitStack() as saves, torch.inference_mode(False):
        saves.enter_context(preserved_state(model, scan.modules, same_modes=True))
        full_save = []

        def save_all() -> None:
            if not full_save:
                full_save.append(saves.enter_context(preserved_state(model, scan.modules)))

        for p in scan.params:
            if p.is_floating_point():
                p.requires_grad_(True)
        inputs = map_tensors(example_inputs, as_leaf)
        # The modes the model is in first: the cheapest trace, and the model as it is used.
        # If a layer with parameters did not run there (an auxiliary head that runs only in
        # training) or the forward failed, train mode next; a batch of one can fail there
        # (BatchNorm on a 1x1 map), so then train mode with the batch doubled.
        # Parameters outside known layers (a bare scale) count too: a branch may use only those.
        all_train = all(m.training for m in scan.modules)
        bare = {id(p) for p in scan.params if p.is_floating_point() and id(p) not in owned}
        attempts = [(inputs, None), (inputs, True), (map_tensors(inputs, doubled), True)]
        errors = []
        # (recording, (layers it missed, bare parameters it missed), its inputs, its mode,
        # whether it was lean)
        best = None
        lean = True
        for attempt_inputs, train in attempts:
            if train and all_train and (best is not None or attempt_inputs is inputs):
                continue  # the attempt in the model's own modes was this very one
            if train:
                save_all()
            try:
                try:
                    recording = record_forward(model, attempt_inputs, forward_fn, known, train,
                                               scan.named, lean=lean,
                                               buffers=scan.free_buffers)
                except Exception as exc:
                    if not (lean and _lean_failure(exc)):
                        raise
                    lean = False  # the forward backpropagates: it needs the whole graph
                    recording = record_forward(model, attempt_inputs, forward_fn, known, train,
                                               scan.named, lean=False,
                                               buffers=scan.free_buffers)
            except Exception as exc:  # the user's forward: reported below if all attempts fail
                errors.append(exc)
                continue
            missed = unreached_count(known, bare, recording)
            if best is None or missed < best[1]:
                best = (recording, missed, attempt_inputs, train, lean)
            if missed == (0, 0) or train:
                break
        if best is None:
            exc = errors[-1]
            hint = ""
            if scan.params and all(p.is_meta for p in scan.params):
                hint = (" (the model is on the meta device, where a forward sees shapes but no "
                        "values: pass inputs or a forward_fn that take no branch on the data, "
                        "e.g. no attention_mask)")
            raise TraceError(
                f"{type(model).__name__} failed on the example inputs "
                f"({describe_inputs(example_inputs)}): {type(exc).__name__}: {exc}{hint}") from exc
        calls, intervals, output, watched = best[0]
        if errors:
            logger.info("traced %s after %d failed attempt(s): %s", type(model).__name__,
                        len(errors), errors[0])
            # a swallowed exception's frames hold tensors whose autograd nodes remember the
            # parameters' shapes; once pruning slices them, a later backward would trip on those
            for exc in errors:
                if exc.__traceback__ is not None:
                    traceback.clear_frames(exc.__traceback__)
                exc.__traceback__ = None
            errors.clear()
        # subclasses of known layers with a forward of their own: followed op by op, their
        # weights still carry their channels (see core/tied.py)
        layers = {**scan.subclasses, **known}
        with_subclasses = {id(p): m for m in scan.subclasses for p in m.parameters()}
        with_subclasses.update(owned)  # a weight a known layer holds too is that layer's
        result = walk(model, calls, output, layers, names_of_params, with_subclasses,
                            intervals, with_inputs(watched, best[2]), attention, scan)
        if result.fixed_splits or result.wants_location or \
                any("" in wheres for wheres in result.unknown.values()):
            # say where each unknown op or fixed split ran, and read the attributes of the
            # module that split by sizes: once more, with module ranges (an unsupported
            # layer already has its name)
            if best[3]:
                save_all()
            calls, intervals, output, watched = record_forward(
                model, best[2], forward_fn, known, best[3], scan.named, locate=True,
                lean=best[4], buffers=scan.free_buffers)
            result = walk(model, calls, output, layers, names_of_params,
                                with_subclasses, intervals, with_inputs(watched, best[2]),
                                attention, scan)
        if result.unknown:
            _warn_unknown(model, result.unknown)
        tie_shared_weights(known, scan.subclasses, result)
        result.check_reason = opaque_code(known, scan.modules) or (
            f"{watched.sized} outside the known layers" if watched.sized else None) or (
            f"{result.unwatched} made by code the trace could not watch (TorchScript, a tensor "
            f"computed before the forward)" if result.unwatched else None) or (
            "an op CleanAI does not know" if result.unknown else None) or (
            "a split into sizes written in the code" if result.fixed_splits else None) or (
            "a split by sizes a module stores" if result.attr_splits else None) or (
            "traced in train mode, used in eval mode" if best[3] and not all_train else None)
        result.code = code_fingerprint(scan.modules)
        warn_unreached(known, calls, set(result.module_in) | set(result.module_out))
        return result


def _lean_failure(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it came from) is a lean recording's refusal."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, LeanRecordingError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _warn_unknown(model: nn.Module, unknown: Dict[str, List[str]]) -> None:
    """One warning for the whole model, naming every unknown op and where it ran."""
    found = []
    for op, wheres in unknown.items():
        places = sorted({w for w in wheres if w})
        shown = ", ".join(places[:3]) + (" ..." if len(places) > 3 else "")
        found.append(f"{op} (in {shown or type(model).__name__ + '.forward'})")
    warnings.warn(f"CleanAI does not know the channel semantics of {', '.join(found)}; the "
                  f"channels {'it touches are' if len(found) == 1 else 'they touch are'} "
                  f"protected and will not be pruned. Register a LayerPruner for a custom "
                  f"layer to prune through it.", stacklevel=3)


