"""Keeping the sizes that modules and configs store in step with the sliced tensors.

Attention and MLP blocks keep their widths as plain integers (``num_heads``, ``head_dim``,
``all_head_size``, ``split_size``, ``intermediate_size``...) and read them in ``forward``.
After a group loses channels, each such attribute of the group's scope (the innermost module
that holds all its layers) or of a module inside it that holds some of those layers (or owns
a parameter of the group) is scaled
by the fraction of units kept, when its name says it measures that kind of width and its value
is a multiple of the group's size.
A model's ``config`` (Hugging Face style) is updated the same way when every layer was pruned
alike; otherwise a warning says that the config can no longer describe the model.
"""
from __future__ import annotations

import logging
import math
import warnings
from fractions import Fraction
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from ..core.graph import DependencyGraph, Group
from ..core.layers import get_layer_pruner

logger = logging.getLogger(__name__)

_HEADS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads", "num_q_heads",
          "num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head", "kv_heads")
_INNER = ("all_head_size", "inner_dim", "split_size", "attn_dim", "qkv_dim")
_HEAD_DIM = ("head_dim", "attention_head_size", "head_size", "dim_head", "d_head")
_HIDDEN = ("hidden_size", "embed_dim", "n_embd", "d_model", "model_dim")
_MLP = ("intermediate_size", "n_inner", "ffn_dim", "mlp_dim", "d_ff", "ffn_hidden_size")

# attribute names per group kind; "exact" names must equal the group's size, the others be a
# multiple of it (a head count is a multiple of the key/value head count a group holds)
_ROLES: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "heads": ((), _HEADS + _INNER),
    "head_dims": (_HEAD_DIM, _INNER),
    "hidden": (_HIDDEN, ()),
    "channels": (_MLP, ()),
}
_NAMES = frozenset(a for exact, multiple in _ROLES.values() for a in exact + multiple)
_CONFIG = {
    "heads": ("num_attention_heads", "n_head", "num_heads", "n_heads", "num_key_value_heads",
              "n_kv_heads", "num_kv_heads", "multi_query_group_num"),
    "head_dims": ("head_dim",),
    "hidden": _HIDDEN,
    "channels": _MLP,
}

Update = Tuple[str, str, Any]  # (module name, attribute, new int or shape tuple)


def scope_of(group: Group) -> str:
    """The innermost module name that contains every layer of ``group``."""
    names = [m.name.rpartition(".")[0] if m.kind == "param" else m.name for m in group.members]
    parts = [n.split(".") if n else [] for n in names]
    common: List[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    # the scope is the block around the layers, not a layer itself
    if len(common) == max((len(p) for p in parts), default=0) and common:
        common = common[:-1]
    return ".".join(common)


def attribute_updates(model: nn.Module, graph: DependencyGraph, removals: Dict[int, torch.Tensor],
                      keeps: Dict[Tuple[str, str, int], torch.Tensor]) -> List[Update]:
    """The attributes to rewrite once ``removals`` are applied (see module doc); ``keeps`` is
    ``layer_keeps(graph, removals)``."""
    proposals: Dict[Tuple[str, str], set] = {}
    candidates = None  # (module name, attribute, value): positive ints with a known name
    for g in graph.groups:
        idx = removals.get(g.id)
        if idx is None or idx.shape[0] == 0 or g.kind not in _ROLES:
            continue
        if candidates is None:
            # in the modules' own attribute order: the history must not follow the hash seed
            candidates = [(n, a, v) for n, m in model.named_modules()
                          if not _NAMES.isdisjoint(m.__dict__) and get_layer_pruner(m) is None
                          for a, v in m.__dict__.items()
                          if a in _NAMES and type(v) is int and v > 0]
            if not candidates:
                break
        kept = Fraction(g.size - idx.shape[0], g.size)
        exact, multiple = _ROLES[g.kind]
        scope = scope_of(g)
        layers = {m.name.rpartition(".")[0] if m.kind == "param" else m.name for m in g.members}
        for name, attr, v in candidates:
            if scope and name != scope and not name.startswith(scope + "."):
                continue
            if name != scope and name not in layers and \
                    not any(n.startswith(name + ".") for n in layers):
                continue  # a block beside the group's layers: an equal width there is chance
            if (attr in exact and v == g.size) or (attr in multiple and v % g.size == 0):
                new = v * kept
                if new.denominator == 1:
                    proposals.setdefault((name, attr), set()).add(int(new))
    _stored_shapes(model, keeps, proposals)
    updates = []
    for (name, attr), values in proposals.items():
        if len(values) == 1:
            updates.append((name, attr, values.pop()))
        else:
            warnings.warn(f"{name}.{attr} would change to different values "
                          f"({sorted(values)}) for different groups; CleanAI leaves it as is "
                          f"(prune the groups that share it alike)", stacklevel=3)
    return updates


def _stored_shapes(model: nn.Module, keeps: Dict[Tuple[str, str, int], torch.Tensor],
                   proposals: Dict[Tuple[str, str], set]) -> None:
    """A module that keeps the shape it views its own parameter with (``self.shape =
    (dim, 1, 1)`` for ``self.scale.view(self.shape)``): the entry for the sliced dim follows.
    ``keeps`` (from ``layer_keeps``) counts the positions every group removes from a dim."""
    for (name, kind, dim), keep in keeps.items():
        if kind != "param":
            continue
        owner, _, pname = name.rpartition(".")
        module = model.get_submodule(owner)
        p = module._parameters.get(pname)
        n = p.shape[dim] - keep.shape[0] if p is not None else 0
        if n == 0:
            continue
        old = p.shape[dim]
        for attr, v in module.__dict__.items():
            if type(v) is tuple and v and all(type(e) is int for e in v) and \
                    v.count(old) == 1 and math.prod(v) == p.numel():
                proposals.setdefault((owner, attr), set()).add(
                    tuple(old - n if e == old else e for e in v))


def set_attributes(model: nn.Module, updates: List[Update]) -> None:
    """Write ``updates`` (from :func:`attribute_updates` or a history entry) into the model:
    an integer, or a stored shape (a tuple, a list once read back from JSON)."""
    for name, attr, value in updates:
        value = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else int(value)
        setattr(model.get_submodule(name), attr, value)


def set_config(model: nn.Module, fields: List[Tuple[str, int]]) -> None:
    """Write recorded ``(field, value)`` pairs into ``model.config``, if the model has one."""
    config = getattr(model, "config", None)
    if config is not None:
        for f, v in fields:
            setattr(config, f, int(v))


def update_config(model: nn.Module, graph: DependencyGraph,
                  before: Dict[int, int]) -> List[Tuple[str, int]]:
    """Scale the sizes in ``model.config`` by the fraction each kind of group kept in the last
    step (``before``: group id -> size before it), when all groups of a kind kept the same
    fraction; then warn if the config still cannot describe the model's shapes.
    Returns the ``(field, new value)`` pairs written."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return []
    changed: List[Tuple[str, int]] = []
    for kind, fields in _CONFIG.items():
        groups = [g for g in graph.groups if g.kind == kind and not bool(g.protected.all())]
        fractions = {Fraction(g.size, before.get(g.id, g.size)) for g in groups}
        if not fractions or fractions == {Fraction(1)}:
            continue
        if len(fractions) > 1:
            warnings.warn(f"the {kind} of {type(model).__name__} were pruned unevenly across "
                          f"layers; model.config keeps the original sizes and cannot rebuild "
                          f"this model: save it with its pruning history instead of "
                          f"save_pretrained (or prune every layer by the same ratio)", stacklevel=3)
            continue
        kept = fractions.pop()
        if kind == "head_dims":
            warnings.warn(f"{type(model).__name__} lost dims inside its attention heads: its "
                          f"modules keep the original attention scale 1/sqrt(head_dim), but a "
                          f"copy rebuilt from model.config computes it from the smaller head_dim "
                          f"and gives different outputs; save it with its pruning history",
                          stacklevel=3)
        new_values = {}
        for f in fields:
            v = getattr(config, f, None)
            if type(v) is int and v > 0 and (v * kept).denominator == 1:
                new_values[f] = int(v * kept)
        for f, v in new_values.items():
            setattr(config, f, v)
            changed.append((f, v))
    if changed:
        wrong = _config_mismatch(model)
        if wrong:
            before_fields = set(vars(config))
            derived = _write_derived(model, config)
            still = _config_mismatch(model)
            if still:  # the modeling code does not read them: leave the config as it was
                for field, _ in derived:
                    if field in before_fields:
                        setattr(config, field, None)
                    else:
                        delattr(config, field)
            else:
                changed += derived
            wrong = still
        if wrong:
            _warn_config(model, wrong)
    return changed


#: sizes the modeling code derives when the config does not set them (Qwen2, Mistral, Gemma:
#: ``head_dim = getattr(config, "head_dim", hidden_size // num_attention_heads)``); a pruned
#: hidden size changes the derived value, so the module's own value is written down instead
DERIVED_CONFIG = ("head_dim",)


def _write_derived(model: nn.Module, config: Any) -> List[Tuple[str, int]]:
    """Write each derived size the config leaves unset, as the model's modules hold it."""
    written = []
    for field in DERIVED_CONFIG:
        if getattr(config, field, None) is not None:
            continue
        values = {getattr(m, field) for m in model.modules()
                  if type(getattr(m, field, None)) is int and getattr(m, field) > 0}
        if len(values) == 1:
            value = values.pop()
            setattr(config, field, value)
            written.append((field, value))
    return written


def _config_mismatch(model: nn.Module) -> List[Tuple[str, tuple, tuple]]:
    """The parameters whose shape ``type(model)(model.config)`` would not reproduce, as
    ``(name, pruned shape, config's shape)``; empty when it would, or cannot be built."""
    try:
        with torch.device("meta"):
            fresh = type(model)(model.config)
    except Exception as exc:  # a model that cannot be rebuilt from its config: nothing to check
        logger.debug("could not rebuild %s from its config: %s", type(model).__name__, exc)
        return []
    expected = {n: tuple(p.shape) for n, p in fresh.named_parameters()}
    return [(n, tuple(p.shape), expected[n]) for n, p in model.named_parameters()
            if expected.get(n, tuple(p.shape)) != tuple(p.shape)]


def _warn_config(model: nn.Module, wrong: List[Tuple[str, tuple, tuple]]) -> None:
    """Warn that ``model.config`` cannot describe the pruned shapes."""
    warnings.warn(f"model.config of {type(model).__name__} cannot describe the pruned shapes "
                  f"(e.g. {wrong[0][0]}: {wrong[0][1]}, the config gives {wrong[0][2]}); "
                  f"from_pretrained would fail on a save_pretrained copy. Save the model with "
                  f"its pruning history instead.", stacklevel=4)

