"""Keeping a model's ``config`` (Hugging Face style) able to rebuild the pruned model.

After a step, the sizes in ``model.config`` are scaled by the fraction each kind of group kept
(``hidden_size``, ``num_attention_heads``, ``intermediate_size``...), when every group of the
kind kept the same fraction. The config is then checked the only way that is sure: the model
class is built from it on the meta device (no memory, no weights) and compared with the pruned
model, parameter and buffer shapes and the float attributes its modules derive from sizes.
Where they differ, sizes the modeling code derives when the config leaves them unset
(``head_dim = getattr(config, "head_dim", hidden_size // num_attention_heads)``) are written
down, then other size fields the differing shapes point to (``shared_expert_intermediate_size``
for a Qwen2-MoE shared expert), each kept only if the rebuilt copy then differs in fewer
places (the rebuild and comparison: :mod:`cleanai.pruner.config_rebuild`).
An embedding scale the config derives from a pruned size (Gemma's
``sqrt(hidden_size)``) is given the rebuilt copy's value, the model's outputs kept by
rescaling weights; a float the config class derives from one (MiniCPM3's
``logits_scaling``) keeps its value through the one field that gives it back (both in
:mod:`cleanai.pruner.derived_scales`). If differences remain, the extra
fields are taken back and a warning says what a copy rebuilt from the config would get wrong.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import warnings
from fractions import Fraction
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from ..core.graph import DependencyGraph
from .config_rebuild import UNSET, Mismatch, config_mismatch
from .derived_scales import keep_config_scales, match_scales

logger = logging.getLogger(__name__)

_HIDDEN = ("hidden_size", "embed_dim", "n_embd", "d_model", "model_dim")
_MLP = ("intermediate_size", "n_inner", "ffn_dim", "mlp_dim", "d_ff", "ffn_hidden_size")
#: config fields scaled by the fraction each kind of group kept
CONFIG_FIELDS = {
    "heads": ("num_attention_heads", "n_head", "num_heads", "n_heads", "num_key_value_heads",
              "n_kv_heads", "num_kv_heads", "multi_query_group_num",
              "linear_num_key_heads", "linear_num_value_heads"),  # Gated DeltaNet's heads
    "head_dims": ("head_dim",),
    "hidden": _HIDDEN,
    "channels": _MLP,
}

#: sizes the modeling code derives when the config does not set them (Qwen2, Mistral, OLMo:
#: ``head_dim = getattr(config, "head_dim", hidden_size // num_attention_heads)``); a pruned
#: hidden size or head count changes the derived value, so the modules' own value is written
DERIVED_CONFIG = ("head_dim",)

# words of the config fields that may hold a width (the fields a differing shape may point to)
_SIZE_WORDS = ("size", "dim", "head", "embd", "inner", "model", "ff", "kv", "channels",
               "width", "hidden", "intermediate", "rank", "expand", "ssm")
_NOT_SIZES = ("vocab", "position", "layers", "n_layer", "token", "window", "bucket", "experts",
              "max_", "num_labels", "seq", "length", "group_size", "chunk", "sparse_step")

def config_value(config: Any, field: str) -> Any:
    """``config.<field>``, or None where the config has no such field or no single value for
    it (a per-layer field of a config whose layers differ raises on access)."""
    try:
        return getattr(config, field, None)
    except Exception:  # noqa: BLE001 - any error means "no single value"
        return None


def set_config(model: nn.Module, fields: List[Tuple[str, Any]]) -> None:
    """Write recorded ``(field, value)`` pairs into ``model.config``, if the model has one
    (an int, a float, or a list of per-stage sizes)."""
    config = getattr(model, "config", None)
    if config is not None:
        for f, v in fields:
            if isinstance(v, (list, tuple)):
                kind = type(config_value(config, f))
                setattr(config, f, (kind if kind in (list, tuple) else list)(int(e) for e in v))
            else:  # a float: a companion of a derived scale (see _keep_derived_scales)
                setattr(config, f, v if isinstance(v, float) else int(v))


def scaled_fields(model: nn.Module, graph: DependencyGraph, before: Dict[int, int],
                  after: Dict[int, int], warn: bool = False) -> Dict[str, int]:
    """The size fields of ``model.config`` scaled by the fraction each kind of group keeps
    (group id -> size, ``before`` and ``after`` a step), where every group of the kind that
    could lose channels keeps the same fraction: field -> new value. ``warn``: say where a
    kind was pruned unevenly, or inside the attention heads."""
    config = model.config
    new: Dict[str, int] = {}
    for kind, fields in CONFIG_FIELDS.items():
        # a group of one channel never loses it (a gate's single output): it says nothing
        groups = [g for g in graph.groups if g.kind == kind and not bool(g.protected.all())
                  and before.get(g.id, g.size) > 1]
        fractions = {Fraction(after.get(g.id, g.size), before.get(g.id, g.size))
                     for g in groups}
        if not fractions or fractions == {Fraction(1)}:
            continue
        if len(fractions) > 1:
            if warn:
                warnings.warn(f"the {kind} of {type(model).__name__} were pruned unevenly "
                              f"across layers; model.config keeps the original sizes and "
                              f"cannot rebuild this model: save it with its pruning history "
                              f"instead of save_pretrained (or prune every layer by the same "
                              f"ratio)", stacklevel=4)
            continue
        kept = fractions.pop()
        if kind == "head_dims" and warn:
            warnings.warn(f"{type(model).__name__} lost dims inside its attention heads: its "
                          f"modules keep the original attention scale 1/sqrt(head_dim), but a "
                          f"copy rebuilt from model.config computes it from the smaller head_dim "
                          f"and gives different outputs; save it with its pruning history",
                          stacklevel=4)
        # read every field before writing any: aliases (GPT-2's n_head is num_attention_heads)
        # would be scaled twice
        new.update((f, int(v * kept)) for f in fields for v in (config_value(config, f),)
                   if type(v) is int and v > 0 and (v * kept).denominator == 1)
    return new


@contextlib.contextmanager
def provisional_config(model: nn.Module, graph: DependencyGraph,
                       removals: Dict[int, torch.Tensor]):
    """Within the block, ``model.config`` holds the sizes it will hold once ``removals`` are
    applied (:func:`update_config` writes them for good): for a check forward of modeling
    code that reads them (Phi-3 slices its fused projection at
    ``config.num_attention_heads * head_dim``). Put back on leaving."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        yield
        return
    before = {g.id: g.size for g in graph.groups}
    after = {gid: before[gid] - idx.shape[0] for gid, idx in removals.items() if gid in before}
    new = scaled_fields(model, graph, before, after)
    old = {f: getattr(config, f) for f in new}
    try:
        for f, v in new.items():
            setattr(config, f, v)
        yield
    finally:
        for f, v in old.items():
            setattr(config, f, v)


def update_config(model: nn.Module, graph: DependencyGraph,
                  before: Dict[int, int]) -> List[Dict[str, Any]]:
    """Scale the sizes in ``model.config`` by the fraction each kind of group kept in the last
    step (``before``: group id -> size before it), when all groups of a kind that could lose
    channels kept the same fraction; then make sure a copy built from the config has the
    pruned shapes and derived scales (see module doc), warning where it cannot. Returns the
    history entries of what changed: each field written (``{"name": "config", "kind":
    "config", "attr", "value"}``), then any scale made to follow the config (see
    :func:`~cleanai.pruner.derived_scales.match_scales`)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return []
    new = scaled_fields(model, graph, before, {g.id: g.size for g in graph.groups}, warn=True)
    old: Dict[str, Any] = {f: getattr(config, f) for f in new}  # their values before the step
    changed: List[Tuple[str, int]] = list(new.items())
    for f, v in changed:
        setattr(config, f, v)
    if not changed and all(before.get(g.id, g.size) == g.size for g in graph.groups):
        return []
    changed += keep_config_scales(model, config, old)
    # also when no scalar size was scaled: per-stage lists (a CNN's ``hidden_sizes``) or
    # widths the config derives may no longer describe the model
    wrong = config_mismatch(model, old)
    back: Dict[str, Any] = {}  # scaled fields given their old values: field -> scaled value
    scales: List[Dict[str, Any]] = []
    if wrong:
        written: List[Tuple[str, int]] = []
        tried: List[Tuple[str, int]] = []
        wrong = _complete(model, config, old, wrong, written, tried)
        if _not_scales(wrong) and len(new) > 1:
            wrong = _with_fields_taken_back(model, config, old, [f for f, _ in changed],
                                            written, tried, back)
        if wrong and all(isinstance(w[1], float) for w in wrong):
            wrong, scales = match_scales(model, graph, wrong)
        if wrong:
            _undo(config, old, [f for f, _ in written])
            _warn_config(model, wrong, tried,
                         [f for f, _ in changed] or sorted({f for f, _ in tried}))
        else:
            changed += written
    changed = [(f, v) for f, v in changed if f not in back]
    _warn_rebuilt_tables(model, graph, before)
    return [{"name": "config", "kind": "config", "attr": f, "value": v}
            for f, v in changed] + scales


def _warn_rebuilt_tables(model: nn.Module, graph: DependencyGraph,
                         before: Dict[int, int]) -> None:
    """A buffer the step sliced with its channels (a position table, see
    :mod:`cleanai.core.buffers`) that the model does not save: a copy built from the
    config computes it afresh, at the smaller width, and may hold other values."""
    tables = []
    for g in graph.groups:
        if before.get(g.id, g.size) == g.size:
            continue
        for m in g.members:
            owner, _, leaf = m.name.rpartition(".")
            module = model.get_submodule(owner) if m.kind == "param" else None
            if module is not None and leaf in module._non_persistent_buffers_set:
                tables.append(m.name)
    if tables:
        warnings.warn(f"{type(model).__name__} holds {', '.join(sorted(set(tables)))}, a buffer "
                      f"it does not save, sliced with the channels it is applied to: a copy "
                      f"built from model.config computes it afresh at the smaller width, and "
                      f"its values may differ. Save the model with its pruning history "
                      f"(cleanai.save_pruned) to keep them", stacklevel=4)


def _complete(model: nn.Module, config: Any, old: Dict[str, Any], wrong: List[Mismatch],
              written: List[Tuple[str, int]], tried: List[Tuple[str, int]]) -> List[Mismatch]:
    """Write the fields that bring a copy built from ``config`` closer to ``model``: first
    the derived sizes the config leaves unset, then the size fields the differing shapes point
    to, one at a time, each kept only when the copy differs in a strict subset of the places
    it did. Appends what it keeps to ``written`` and every try to ``tried``; returns what
    still differs."""
    if not any(isinstance(w[1], tuple) or w[1] is None for w in wrong):
        return wrong  # only derived floats differ: no size field sets them
    for field, value in _derived(model, config) + _pointed(config, wrong, set(old)):
        if any(f == field for f, _ in written):
            continue
        tried.append((field, value))
        had = field in vars(config)
        previous = vars(config)[field] if had else None
        setattr(config, field, value)
        now = config_mismatch(model, {**old, field: previous if had else UNSET})
        # a scale the field derives may differ now (Gemma's per-layer embedding scale, the
        # square root of the width written): matched afterwards, as for the scaled fields
        if _not_scales(now) < _not_scales(wrong) or \
                ({w[0] for w in now} < {w[0] for w in wrong}):
            old.setdefault(field, previous if had else UNSET)
            written.append((field, value))
            wrong = now
            if not wrong:
                break
        elif had:
            setattr(config, field, previous)
        else:
            delattr(config, field)
    return wrong


def _not_scales(wrong: List[Mismatch]) -> set:
    """The names of the differences that are not derived floats (shapes, a missing tensor,
    a config that does not build)."""
    return {w[0] for w in wrong if not isinstance(w[1], float)}


def _with_fields_taken_back(model: nn.Module, config: Any, old: Dict[str, Any],
                            scaled: List[str], written: List[Tuple[str, int]],
                            tried: List[Tuple[str, int]], back: Dict[str, Any]
                            ) -> List[Mismatch]:
    """Complete the config again, with scaled fields taken back first (:func:`_take_back`);
    if that does not rebuild the model either, complete it as it was (``back`` emptied).
    ``written`` holds the fields the final completion wrote; returns what still differs."""
    _undo(config, old, [f for f, _ in written])
    written.clear()
    wrong = _take_back(model, config, old, scaled, config_mismatch(model, old), back)
    if back:
        wrong = _complete(model, config, old, wrong, written, tried)
    if not wrong:
        return wrong
    _undo(config, old, [f for f, _ in written])  # no better: as the first try left it
    written.clear()
    for f, v in back.items():
        setattr(config, f, v)
    back.clear()
    return _complete(model, config, old, config_mismatch(model, old), written, tried)


def _take_back(model: nn.Module, config: Any, old: Dict[str, Any], scaled: List[str],
               wrong: List[Mismatch], back: Dict[str, Any]) -> List[Mismatch]:
    """Give ``scaled`` fields their values back, one or two at a time, while a copy built
    from ``config`` then differs in a strict subset of the places it did: fields of a kind
    whose groups they size all kept their width while other groups of the kind were pruned
    (Qwen3-Next's linear-attention key and value heads, protected, beside its attention
    heads). Records each field taken back in ``back`` (field -> its scaled value), for the
    caller to keep or undo; returns what still differs."""
    progress = True
    while wrong and progress:  # again from the start after each field taken back
        progress = False
        names = [f for f in scaled if f in old and f not in back]
        for fields in itertools.chain(itertools.combinations(names, 1),
                                      itertools.combinations(names, 2)):
            values = {f: getattr(config, f) for f in fields}
            for f in fields:
                setattr(config, f, old[f])
            now = config_mismatch(model, old)
            if {w[0] for w in now} < {w[0] for w in wrong}:
                back.update(values)
                wrong, progress = now, True
                break
            for f, v in values.items():
                setattr(config, f, v)
    return wrong


def _undo(config: Any, old: Dict[str, Any], fields: List[str]) -> None:
    """Give ``fields`` of ``config`` back their values from before (or remove them)."""
    for f in fields:
        if old.get(f) is UNSET:
            delattr(config, f)
        else:
            setattr(config, f, old[f])
        old.pop(f, None)


def _derived(model: nn.Module, config: Any) -> List[Tuple[str, int]]:
    """Each derived size the config leaves unset, as the model's modules all hold it."""
    out = []
    for field in DERIVED_CONFIG:
        try:
            if getattr(config, field, None) is not None:
                continue
        except Exception:  # noqa: BLE001 - no single value (per-layer fields that differ)
            continue
        values = {getattr(m, field) for m in model.modules()
                  if type(getattr(m, field, None)) is int and getattr(m, field) > 0}
        if len(values) == 1:
            out.append((field, values.pop()))
    return out


def _pointed(config: Any, wrong: List[Mismatch], scaled: set) -> List[Tuple[str, int]]:
    """Size fields of ``config`` that could explain a differing shape: a dim the config makes
    ``n * v`` (``v`` the field's value) where the pruned model has ``n * v'``: ``(field, v')``,
    in the config's field order; then each size field left None with each width that differs,
    and each list of per-stage sizes scaled by one such ratio; not the fields the step
    ``scaled`` already."""
    pairs = [(p, b) for _, pruned, built in wrong
             if isinstance(pruned, tuple) and isinstance(built, tuple) and len(pruned) == len(built)
             for p, b in zip(pruned, built) if p != b]
    ratios = sorted({Fraction(p, b) for p, b in pairs if b})
    widths = sorted({p for p, _ in pairs if p >= 1})
    sizes = [(f, v) for f, v in vars(config).items()
             if f not in scaled and not f.startswith("_") and _is_size(f)]
    out = []
    for field, v in sizes:  # one size: n * v in the copy where the model has n * v'
        if type(v) is int and v > 0:
            out += [(field, int(v * r)) for r in ratios if (v * r).denominator == 1 and v * r >= 1]
    for field, v in sizes:  # left None for the code to derive (GPT-2's ``n_inner``)
        if v is None:
            out += [(field, w) for w in widths]
    for field, v in sizes:  # per-stage sizes (``hidden_sizes``): every entry by one ratio
        if type(v) in (list, tuple) and v and all(type(e) is int and e > 0 for e in v):
            for r in ratios:
                new = [e * r for e in v]
                if all(n.denominator == 1 and n >= 1 for n in new):
                    out.append((field, type(v)(int(n) for n in new)))
    return out


def _is_size(field: str) -> bool:
    f = field.lower()
    return any(w in f for w in _SIZE_WORDS) and not any(w in f for w in _NOT_SIZES)


def _warn_config(model: nn.Module, wrong: List[Mismatch], tried: List[Tuple[str, int]],
                 changed: List[str]) -> None:
    """Warn that ``model.config`` cannot describe the pruned model, saying where and why."""
    name, mine, built = wrong[0]
    more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
    # a field and its alias (GPT-2's n_embd for hidden_size) are named once
    real = [f for f in changed if f in vars(model.config)]
    fields = ", ".join(real or changed)
    if isinstance(built, str):
        what = (f"a copy built from it fails ({built}): the step changed {fields}, which the "
                f"modeling code combines with sizes that did not change, so from_pretrained "
                f"would fail on a save_pretrained copy")
    elif isinstance(mine, float):
        what = (f"{name} is {mine:g} in the pruned model, but a copy built from the config "
                f"computes {built:g}{more}: the modeling code derives it from a size that "
                f"changed ({fields}) and no config field sets it, so a save_pretrained copy "
                f"loads but gives different outputs")
    else:
        shape = lambda s: "missing" if s is None else str(s)  # noqa: E731
        tries = ", ".join(f"{f}={v}" for f, v in tried)
        what = (f"{name} is {shape(mine)} in the pruned model, but {shape(built)} in a copy "
                f"built from the config{more}: the modeling code derives this width from "
                f"other sizes ({fields}) and no config field CleanAI knows sets it "
                f"({'tried ' + tries if tries else 'none to try'}), so from_pretrained would "
                f"fail on a save_pretrained copy")
    warnings.warn(f"model.config of {type(model).__name__} cannot describe the pruned shapes: "
                  f"{what}. Save the model with its pruning history (cleanai.save_pruned) "
                  f"instead, or prune only the kinds the config can describe.", stacklevel=4)
