"""Keeping the sizes that modules and configs store in step with the sliced tensors.

Attention and MLP blocks keep their widths as plain integers (``num_heads``, ``head_dim``,
``all_head_size``, ``split_size``, ``intermediate_size``...) and read them in ``forward``.
After a group loses channels, each such attribute of the group's scope (the innermost module
that holds all its layers) or of a module inside it that holds some of those layers (or owns
a parameter of the group) is scaled
by the fraction of units kept, when its name says it measures that kind of width and its value
is a multiple of the group's size.
A module that stores a shape it views its own parameter with, or the sizes it splits a child
layer's output into, gets the sliced sizes too. A model's ``config`` (Hugging Face style) is
kept in step by :mod:`cleanai.pruner.model_config`.
"""
from __future__ import annotations

import math
import warnings
from fractions import Fraction
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from ..core.graph import DependencyGraph, Group
from ..core.layers import get_layer_pruner
from ..core.walk_context import HEAD_COUNTS
from .model_config import DERIVED_CONFIG, set_config, update_config  # noqa: F401 (re-exported)


_HEADS = HEAD_COUNTS
_INNER = ("all_head_size", "inner_dim", "split_size", "attn_dim", "qkv_dim")
_HEAD_DIM = ("head_dim", "attention_head_size", "head_size", "dim_head", "d_head")
_HIDDEN = ("hidden_size", "embed_dim", "n_embd", "d_model", "model_dim", "hidden_dim", "input_size")
_MLP = ("intermediate_size", "n_inner", "ffn_dim", "mlp_dim", "d_ff", "ffn_hidden_size")
# the width of Gemma 3n's and Gemma 4's per-layer inputs, one slice per decoder layer
_PER_LAYER = ("hidden_size_per_layer_input",)

# attribute names per group kind; "exact" names must equal the group's size, the others be a
# multiple of it (a head count is a multiple of the key/value head count a group holds)
_ROLES: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "heads": ((), _HEADS + _INNER),
    "head_dims": (_HEAD_DIM, _INNER),
    "hidden": (_HIDDEN, ()),
    "channels": (_MLP + _PER_LAYER, ()),
}
_NAMES = frozenset(a for exact, multiple in _ROLES.values() for a in exact + multiple)

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
    _stored_splits(model, graph, keeps, proposals)
    # what a traced split reads wins over a guess from the attribute's name (MobileViTv2
    # names the width of its keys and values ``embed_dim``), and an attribute a split reads
    # changes only with the parts it sizes (GPTBigCode's ``embed_dim`` sizes its queries,
    # not the hidden size it is named after)
    for _, owner, attrs, _ in getattr(graph, "split_attributes", ()):
        for a in attrs:
            proposals.pop((owner, a), None)
    proposals.update(_attribute_splits(model, graph, keeps))
    _norm_group_sizes(model, graph, keeps, proposals)
    _shapes_with_heads(model, proposals)
    _parameter_free_norms(model, graph, removals, proposals)
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


def _stored_splits(model: nn.Module, graph: DependencyGraph,
                   keeps: Dict[Tuple[str, str, int], torch.Tensor],
                   proposals: Dict[Tuple[str, str], set]) -> None:
    """A module that keeps the sizes it splits a child layer's output into (timm's parallel
    block: ``torch.split(self.in_proj(x), self.in_split, -1)`` with ``self.in_split = [mlp,
    d, d, d]``): each size becomes the number of positions its part keeps. The trace made
    each part channels of its own (``WalkContext.cut``): the layer's output is held by several
    groups, each over whole parts (q, k and v share the heads), so every group begins and
    ends where a part does."""
    for (name, kind, _), keep in keeps.items():
        if kind != "out":
            continue
        owner = name.rpartition(".")[0]
        layer = model.get_submodule(name)
        pr = get_layer_pruner(layer)
        old = pr.out_channels(layer) if pr is not None else None
        if not old or keep.shape[0] == old:
            continue
        module = model.get_submodule(owner)
        lists = [(a, v) for a, v in module.__dict__.items()
                 if type(v) in (list, tuple) and len(v) > 1 and
                 all(type(e) is int and e > 0 for e in v) and sum(v) == old]
        if not lists:
            continue
        # where the groups that hold the layer's output begin and end
        bounds = {int(e) for g in graph.groups for m in g.members
                  if m.name == name and m.kind == "out"
                  for e in (m.positions.min(), m.positions.max() + 1)}
        for attr, v in lists:
            ends = torch.tensor(v).cumsum(0)
            if len(bounds) < 3 or not bounds <= set(ends.tolist()) | {0}:
                continue  # one group holds it all: no split by these sizes was cut there
            ends = torch.searchsorted(keep, ends)
            counts = torch.diff(ends, prepend=ends.new_zeros(1))
            proposals.setdefault((owner, attr), set()).add(tuple(counts.tolist()))


def _attribute_splits(model: nn.Module, graph: DependencyGraph,
                      keeps: Dict[Tuple[str, str, int], torch.Tensor]
                      ) -> Dict[Tuple[str, str], set]:
    """A module that splits a layer's output by sizes it stores as integers (EfficientViT's
    ``qkv(x).split([self.key_dim, self.key_dim, self.val_dim])``, MobileViTv2's ``[1,
    self.embed_dim, self.embed_dim]``): each attribute becomes the number of positions its
    parts keep. The trace made each part channels of its own and tied the parts one
    attribute sizes to equal counts (``DependencyGraph.split_attributes``)."""
    out: Dict[Tuple[str, str], set] = {}
    for layer, owner, attrs, sizes in getattr(graph, "split_attributes", ()):
        keep = keeps.get((layer, "out", -1))
        if keep is None:
            continue
        module = model.get_submodule(owner)
        now = [getattr(module, a, None) if a else n for a, n in zip(attrs, sizes)]
        if not all(type(n) is int for n in now):
            continue
        ends = torch.searchsorted(keep, torch.tensor(now).cumsum(0))
        counts = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
        for attr, n in zip(attrs, counts):
            if attr:
                out.setdefault((owner, attr), set()).add(int(n))
    return out


def _norm_group_sizes(model: nn.Module, graph: DependencyGraph,
                      keeps: Dict[Tuple[str, str, int], torch.Tensor],
                      proposals: Dict[Tuple[str, str], set]) -> None:
    """A grouped norm written by hand over heads (Mamba-2's gated RMSNorm, ``view(...,
    -1, self.group_size)``): every group keeps the same positions, so the group size
    becomes the kept width of its weight over the number of groups
    (``DependencyGraph.norm_groups``)."""
    for owner, attr in getattr(graph, "norm_groups", ()):
        module = model.get_submodule(owner)
        size = getattr(module, attr)
        for pname, p in module._parameters.items():
            keep = keeps.get((f"{owner}.{pname}", "param", 0))
            if p is not None and keep is not None and p.dim() == 1 and p.numel() % size == 0:
                proposals.setdefault((owner, attr), set()).add(
                    keep.shape[0] // (p.numel() // size))


def _shapes_with_heads(model: nn.Module, proposals: Dict[Tuple[str, str], set]) -> None:
    """A shape a module stores beside the head count it views a tensor into (timm's
    ``RelPosMlp.bias_shape = (window_area, window_area, num_heads)`` for
    ``bias.view(self.bias_shape)``): the head count in it follows ``num_heads``. Only a
    tuple named as a shape, holding the old count once."""
    for (name, attr), values in list(proposals.items()):
        if attr not in _HEADS or len(values) != 1:
            continue
        module = model.get_submodule(name)
        old, new = module.__dict__.get(attr), next(iter(values))
        if type(old) is not int or type(new) is not int or old == new:
            continue
        for a, v in module.__dict__.items():
            if "shape" in a and type(v) is tuple and v.count(old) == 1 and \
                    all(type(e) is int for e in v) and (name, a) not in proposals:
                proposals[(name, a)] = {tuple(new if e == old else e for e in v)}


def _parameter_free_norms(model: nn.Module, graph: DependencyGraph,
                          removals: Dict[int, torch.Tensor],
                          proposals: Dict[Tuple[str, str], set]) -> None:
    """A norm without parameters (OLMo's ``F.layer_norm(x, self.normalized_shape)``) has no
    layer pruner and no weight in any group, yet stores the width it normalises. It follows
    a group of that width when it sits beside the group's layers (its parent holds some) in
    the group's scope, as a block's input norm sits beside its attention."""
    norms = [(n, v) for n, m in model.named_modules()
             if type(m.__dict__.get("normalized_shape")) in (tuple, list)
             and not m._modules and all(p is None for p in m._parameters.values())
             and get_layer_pruner(m) is None
             for v in (m.__dict__["normalized_shape"],)
             if v and all(type(e) is int for e in v)]
    if not norms:
        return
    for g in graph.groups:
        idx = removals.get(g.id)
        if idx is None or idx.shape[0] == 0:
            continue
        scope = scope_of(g)
        layers = {m.name.rpartition(".")[0] if m.kind == "param" else m.name for m in g.members}
        for name, shape in norms:
            parent = name.rpartition(".")[0]
            if shape[-1] != g.size or (scope and not (parent + ".").startswith(scope + ".")):
                continue
            beside = not parent or any(n == parent or n.startswith(parent + ".") for n in layers)
            if beside:
                proposals.setdefault((name, "normalized_shape"), set()).add(
                    tuple(shape[:-1]) + (g.size - idx.shape[0],))


def set_attributes(model: nn.Module, updates: List[Update]) -> None:
    """Write ``updates`` (from :func:`attribute_updates` or a history entry) into the model:
    an integer, or a stored shape or list of sizes (a tuple, a list once read back from JSON;
    it takes the type the attribute has, so a list the module stores stays a list)."""
    for name, attr, value in updates:
        module = model.get_submodule(name)
        if isinstance(value, (list, tuple)):
            value = (list if isinstance(getattr(module, attr, None), list) else tuple)(
                int(v) for v in value)
        else:
            value = int(value)
        setattr(module, attr, value)
