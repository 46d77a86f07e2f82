"""Embedding scales a config derives from a size, kept exact when that size is pruned.

Gemma multiplies its token embeddings by ``sqrt(config.hidden_size)``, held by the embedding
as a float attribute and a 0-dim buffer. Once the hidden size is pruned, a copy rebuilt from
the smaller config computes a smaller scale. Rather than keep the old scale (a
``save_pretrained`` copy would then give other outputs), the embedding takes the scale the
config derives, ``new``, and its weight is multiplied by ``c = old / new``: its output is
unchanged. A head tied to that weight would then give logits ``c`` times larger, so the
layer whose output the head reads (the final norm) is made to give ``1 / c`` times its
output: each of its parameters ``p`` becomes ``(p + o) / c - o``, with ``o = 0`` for ``x * w
+ b`` and ``o = 1`` for Gemma's ``x * (1 + w)``, the form checked on the layer's own input.
One forward before and one after must agree; otherwise everything is put back and the
config warning stays. The history records the new scale (a ``"scale"`` entry); the rescaled
values come with the weights, as compensation's do.

A float attribute of another module that multiplies one of its own Linear layers' output
(Gemma 4's ``per_layer_model_projection_scale = hidden_size ** -0.5``) likewise takes the
config's value, that layer's weight and bias multiplied by ``old / new``; the layer is the
one child Linear for which one forward gives back the model's outputs.

A float the config class itself derives from a pruned size (MiniCPM3's ``logits_scaling =
hidden_size / dim_model_base``, read in the forward) keeps its value instead: the one other
field that gives it back is scaled with the size (:func:`keep_config_scales`).
"""
from __future__ import annotations

import logging
import math
import warnings
from fractions import Fraction
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from ..core.graph import DependencyGraph, is_meta_model
from ..core.runtime import find_submodule, iter_tensors, preserved_state, run_forward
from ..core.parametrized import deepcopy_module
from .config_rebuild import Mismatch, config_mismatch, with_values

logger = logging.getLogger(__name__)

_OFFSETS = (0.0, 1.0)  # the parameter forms tried: x * w + b, then x * (1 + w)


class _Scale(NamedTuple):
    name: str  # the embedding's qualified name
    module: nn.Embedding
    attr: str  # its float attribute (``scalar_embed_scale``)
    old: float  # the pruned model's value
    new: float  # the value a copy built from the config computes


class _Unmatched(Exception):
    """Why a scale cannot be made to follow the config exactly."""


def match_scales(model: nn.Module, graph: Optional[DependencyGraph],
                 wrong: List[Mismatch]) -> Tuple[List[Mismatch], List[Dict[str, Any]]]:
    """Give each embedding scale among the differing floats ``wrong`` the value a copy built
    from the config computes, keeping the model's outputs (see module doc). Returns what
    still differs and the history entries of the scales changed (kind ``"scale"``)."""
    if graph is None or is_meta_model(model):
        return wrong, []
    by_weight: Dict[int, List[_Scale]] = {}
    fixed, entries = set(), []
    for name, mine, built in wrong:
        scale = _scale_of(model, name, mine, built)
        if scale is not None:
            by_weight.setdefault(id(scale.module.weight), []).append(scale)
            continue
        done = _match_child(model, graph, name, mine, built)
        if done:
            entries += done
            fixed.add(name)
    for scales in by_weight.values():
        try:
            entries += _match(model, graph, scales)
        except Exception as exc:  # _Unmatched, or a forward that failed: the model is as it was
            logger.info("%s keeps its scale %s: %s", scales[0].name, scales[0].attr, exc)
            continue
        fixed.update(f"{s.name}.{s.attr}" for s in scales)
        # and the 0-dim buffers that hold the scale (Gemma's ``embed_scale``)
        fixed.update(f"{s.name}.{b}" for s in scales for b, t in s.module._buffers.items()
                     if t is not None and t.dim() == 0)
    return [w for w in wrong if w[0] not in fixed], entries


def replay_scales(model: nn.Module, entries: List[Dict[str, Any]]) -> None:
    """Re-apply history entries of kind ``"scale"``: a module's float scale and the 0-dim
    buffers holding it take ``value`` (the weights rescaled with it are loaded, not
    recomputed: a replay sets structure, not values)."""
    for e in entries:
        _set_scale(model.get_submodule(e["name"]), e["attr"], float(e["value"]))


def _scale_of(model: nn.Module, name: str, mine: Any, built: Any) -> Optional[_Scale]:
    """The embedding scale behind the differing float ``name``, or None if it is not one."""
    if type(mine) is not float or type(built) is not float or not (
            math.isfinite(built) and mine > 0 and built > 0):
        return None
    owner, _, attr = name.rpartition(".")
    try:
        module = find_submodule(model, owner)
    except AttributeError:
        return None
    w = getattr(module, "weight", None)
    if type(module.__dict__.get(attr)) is not float:
        return None  # a 0-dim buffer holding the scale: set with its float attribute
    if not isinstance(module, nn.Embedding) or not isinstance(w, nn.Parameter) or \
            w.dim() != 2 or not w.is_floating_point():
        return None
    return _Scale(owner, module, attr, mine, built)


def _match(model: nn.Module, graph: DependencyGraph,
           scales: List[_Scale]) -> List[Dict[str, Any]]:
    """Rescale one embedding weight and the layers its tied heads read; raise
    :class:`_Unmatched`, with the model as it was, when that cannot be done exactly."""
    from .apply import atomic  # apply imports this module

    weight = scales[0].module.weight
    c = scales[0].old / scales[0].new
    if any(not math.isclose(s.old / s.new, c, rel_tol=1e-9) for s in scales):
        raise _Unmatched("the embeddings sharing its weight change their scales differently")
    heads = _tied_heads(model, weight, {id(s.module) for s in scales})
    before, feeds = _run(model, graph, heads)  # a forward for the outputs, hooked if heads
    norms = list({id(n): (name, n, o) for name, n, o in
                  (_form(graph, head, feeds, c) for head in heads)}.values())
    entries = [{"name": s.name, "kind": "scale", "attr": s.attr, "value": s.new}
               for s in scales]
    with atomic([s.module for s in scales] + [n for _, n, _ in norms]):
        replay_scales(model, entries)
        weight.data = _rescaled(weight.data, c, 0.0)
        for _, norm, offset in norms:
            for p in norm.parameters(recurse=False):
                if p.is_floating_point():
                    p.data = _rescaled(p.data, 1.0 / c, offset)
        after, _ = _run(model, graph, [])
        if not _same(before, after):
            raise _Unmatched("the model's outputs changed when it was rescaled")
    return entries


def _match_child(model: nn.Module, graph: DependencyGraph, name: str, mine: Any,
                 built: Any) -> List[Dict[str, Any]]:
    """A float attribute of a module that multiplies the output of one of its own Linear
    layers (Gemma 4's ``per_layer_model_projection_scale = hidden_size ** -0.5``): it takes
    the value ``built`` that the config derives, and that layer's weight and bias are
    multiplied by ``mine / built``, so the product stays. Each Linear child is tried with one
    forward; the first that gives back the model's outputs is kept. Empty when none does
    (the model as it was)."""
    from .apply import atomic  # apply imports this module

    if type(mine) is not float or type(built) is not float or \
            not (math.isfinite(built) and mine > 0 and built > 0):
        return []
    owner, _, attr = name.rpartition(".")
    try:
        module = find_submodule(model, owner)
    except AttributeError:
        return []
    if isinstance(module, nn.Embedding) or type(module.__dict__.get(attr)) is not float:
        return []
    shared = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                shared[id(p)] = shared.get(id(p), 0) + 1
    children = [c for c in module.children() if isinstance(c, nn.Linear) and
                all(shared.get(id(p)) == 1 for p in c.parameters(recurse=False))]
    if not children:
        return []
    before, _ = _run(model, graph, [])
    entries = [{"name": owner, "kind": "scale", "attr": attr, "value": built}]
    for child in children:
        try:
            with atomic([module, child]):
                replay_scales(model, entries)
                for p in child.parameters(recurse=False):
                    if p.is_floating_point():
                        p.data = p.data * (mine / built)
                after, _ = _run(model, graph, [])
                if not _same(before, after):
                    raise _Unmatched("another layer's output carries the scale")
        except Exception:  # _Unmatched, or a forward that failed: as it was
            continue
        return entries
    return []


def _tied_heads(model: nn.Module, weight: nn.Parameter,
                scaled: set) -> List[Tuple[str, nn.Linear]]:
    """The Linear layers besides the scaled embeddings that hold ``weight`` (an LM head)."""
    heads = []
    for name, m in model.named_modules():
        if id(m) in scaled or not any(p is weight for p in m._parameters.values()):
            continue
        if not isinstance(m, nn.Linear) or m.weight is not weight:
            raise _Unmatched(f"{name} ({type(m).__name__}) reads its weight too")
        heads.append((name, m))
    return heads


class _Feed(NamedTuple):
    module: nn.Module
    calls: int
    inputs: Any  # the last call's first input
    output: Any


def _run(model: nn.Module, graph: DependencyGraph,
         heads: List[Tuple[str, nn.Linear]]) -> Tuple[List[torch.Tensor], Dict[str, _Feed]]:
    """One forward on the graph's example inputs: the model's output tensors, and for each
    head and each layer the graph says feeds it, its first input and its output."""
    watched = {name: m for name, m in heads}
    sources = {_graph_name(graph, m) for _, m in heads}
    for s, t in graph.edges if heads else ():
        if t in sources and s not in sources:
            name = s if s in graph.modules else s.rpartition(".")[0]
            try:
                watched.setdefault(name, find_submodule(model, name))
            except AttributeError:
                continue
    seen: Dict[str, _Feed] = {}

    def hook(name):
        def record(m, args, out):
            calls = seen[name].calls + 1 if name in seen else 1
            seen[name] = _Feed(m, calls, args[0] if args else None, out)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in watched.items()]
    try:
        with torch.no_grad(), preserved_state(model):
            model.eval()
            out = run_forward(model, graph.example_inputs, graph.forward_fn)
    finally:
        for h in handles:
            h.remove()
    return [t.detach().clone() for t in iter_tensors(out)], seen


def _graph_name(graph: DependencyGraph, module: nn.Module) -> str:
    name = next((n for n, m in graph.modules.items() if m is module), None)
    if name is None:
        raise _Unmatched("its tied head was not traced")
    return name


def _form(graph: DependencyGraph, head: Tuple[str, nn.Linear], feeds: Dict[str, _Feed],
          c: float) -> Tuple[str, nn.Module, float]:
    """The one layer whose output is the head's input (read by nothing else), and the offset
    ``o`` for which ``(p + o) / c - o`` on its parameters divides its output by ``c``."""
    name, module = head
    fed = feeds.get(name)
    if fed is None or fed.calls != 1 or not isinstance(fed.inputs, torch.Tensor):
        raise _Unmatched(f"its tied head {name} did not run exactly once")
    found = [(n, f) for n, f in feeds.items() if n != name and f.calls == 1 and
             isinstance(f.output, torch.Tensor) and isinstance(f.inputs, torch.Tensor) and
             f.output.shape == fed.inputs.shape and torch.equal(f.output, fed.inputs)]
    if len(found) != 1:
        raise _Unmatched(f"no single layer's output is what its tied head {name} reads")
    norm_name, feed = found[0]
    head_name = _graph_name(graph, module)
    if any(t != head_name for s, t in graph.edges
           if s == norm_name or s.rpartition(".")[0] == norm_name):
        raise _Unmatched(f"{norm_name}, which feeds its tied head, feeds other layers too")
    params = [p for p in feed.module.parameters(recurse=False) if p.is_floating_point()]
    if not params or any(p is module.weight for p in params):
        raise _Unmatched(f"{norm_name}, which feeds its tied head, has no parameters to rescale")
    for offset in _OFFSETS:
        trial = deepcopy_module(feed.module).eval()
        for p in trial.parameters(recurse=False):
            if p.is_floating_point():
                p.data = _rescaled(p.data, 1.0 / c, offset)
        with torch.no_grad():
            got = trial(feed.inputs)
        if isinstance(got, torch.Tensor) and _close(feed.output, got * c):
            return norm_name, feed.module, offset
    raise _Unmatched(f"{norm_name} ({type(feed.module).__name__}), which feeds its tied head, "
                     f"is of a form CleanAI cannot rescale")


def _rescaled(t: torch.Tensor, factor: float, offset: float) -> torch.Tensor:
    if offset == 0.0:
        return t * factor
    return (t + offset) * factor - offset


def _set_scale(module: nn.Module, attr: str, value: float) -> None:
    """Set the float ``attr`` and the 0-dim buffers that hold its value (Gemma's
    ``embed_scale``) to ``value``."""
    old = getattr(module, attr)
    if type(old) is not float:
        raise TypeError(f"{type(module).__name__}.{attr} is not a float scale")
    for name, b in module._buffers.items():
        if b is not None and b.dim() == 0 and b.is_floating_point() and \
                abs(float(b) - old) <= 4 * torch.finfo(b.dtype).eps * abs(old):
            b.data = torch.tensor(value, dtype=b.dtype, device=b.device)
    setattr(module, attr, value)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    tol = max(1e-4, 16 * torch.finfo(a.dtype).eps)
    return bool(torch.allclose(a.float(), b.float(), rtol=tol,
                               atol=tol * float(a.abs().max()) if a.numel() else 0.0))


def _same(before: List[torch.Tensor], after: List[torch.Tensor]) -> bool:
    return len(before) == len(after) and all(_close(a, b) for a, b in zip(before, after))


def keep_config_scales(model: nn.Module, config: Any, old: Dict[str, Any]
                       ) -> List[Tuple[str, Any]]:
    """A float the config's class derives from a size the step changed, which the modeling
    code may read in its forward (MiniCPM3 divides its hidden states by ``logits_scaling =
    hidden_size / dim_model_base`` before the head): the pruned model must compute what it
    did, so the other field it derives from is scaled with the size (``dim_model_base``), when
    exactly that gives the float its value back and a copy built from the config has no more
    differing shapes. Returns the fields written (their old values go into ``old``)."""
    before = with_values(config, old)
    derived = []
    for name in dir(type(config)):
        if name.startswith("_") or not isinstance(getattr(type(config), name, None), property):
            continue
        try:
            was, now = getattr(before, name), getattr(config, name)
        except Exception:  # a property that needs what a tiny config lacks
            continue
        if type(was) is float and type(now) is float and math.isfinite(was) and \
                not math.isclose(was, now, rel_tol=1e-9):
            derived.append((name, was))
    if not derived:
        return []
    ratios = {Fraction(getattr(config, f), v) for f, v in old.items()
              if type(v) is int and v > 0 and type(getattr(config, f, None)) is int}
    restores = lambda: all(math.isclose(getattr(config, n), was, rel_tol=1e-9)  # noqa: E731
                           for n, was in derived)
    shapes = {w[0] for w in config_mismatch(model, old)}
    found: List[Tuple[str, Any, Any]] = []  # (field, its value, the value that restores)
    for field, value in list(vars(config).items()):
        if field in old or type(value) not in (int, float) or not value:
            continue
        for r in ratios:
            new = value * r
            new = int(new) if type(value) is int and new.denominator == 1 else float(new)
            try:
                setattr(config, field, new)
            except Exception:  # a config that validates its fields (an int that must stay one)
                continue
            try:
                if restores() and {w[0] for w in config_mismatch(
                        model, {**old, field: value})} <= shapes:
                    found.append((field, value, new))
                    break
            finally:
                setattr(config, field, value)
    names = ", ".join(f"{n} ({was:g} -> {getattr(config, n):g})" for n, was in derived)
    if len(found) == 1:
        field, value, new = found[0]
        setattr(config, field, new)
        old[field] = value
        logger.info("model.config.%s scaled to %s with the sizes, keeping %s", field, new,
                    names)
        return [(field, new)]
    why = (f"{' and '.join(f for f, _, _ in found)} would each give it back its value, and "
           f"CleanAI cannot tell which one the modeling code reads" if found else
           "no other field gives it back its value")
    warnings.warn(f"model.config of {type(model).__name__} derives {names} from the sizes "
                  f"this step changed; {why}. If the modeling code reads it, the pruned model's "
                  f"outputs changed: check them, or set the field that keeps it", stacklevel=4)
    return []
