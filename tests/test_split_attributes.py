"""Splits whose parts need only equal counts, not equal positions.

* A layer's output split by sizes its module stores as integer attributes
  (``qkv(x).split([self.key_dim, self.key_dim, self.d])``, as EfficientViT and MobileViTv2
  do): each part loses channels of its own, the parts one attribute sizes keep equal counts,
  and the attribute follows.
* ``a, b = x.chunk(2)`` read by separate layers: each part picks its own channels, both lose
  as many. Where the parts meet again element-wise (a GLU) they stay tied position by
  position.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

import cleanai
from cleanai.pruner.apply import PruningError
from cleanai.pruner.keeps import layer_keeps
from equivalence import check_equivalence, zero_consumers


class Heads(nn.Module):
    """Two heads, each with its own qkv conv, split by the sizes the module stores."""

    def __init__(self, dim=8, key_dim=4, d=6):
        super().__init__()
        self.key_dim, self.d = key_dim, d
        self.qkvs = nn.ModuleList(nn.Conv2d(dim, 2 * key_dim + d, 1) for _ in range(2))
        self.proj = nn.Conv2d(2 * d, dim, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        outs = []
        for qkv in self.qkvs:
            q, k, v = qkv(x).split([self.key_dim, self.key_dim, self.d], dim=1)
            q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
            attn = (q.transpose(-2, -1) @ k).softmax(dim=-1)
            outs.append((v @ attn.transpose(-2, -1)).view(B, self.d, H, W))
        return self.proj(torch.cat(outs, 1))


class LinearAttention(nn.Module):
    """MobileViTv2's split: one query channel, then keys and values of ``embed_dim``."""

    def __init__(self, embed_dim=8):
        super().__init__()
        self.embed_dim = embed_dim
        self.qkv = nn.Conv2d(embed_dim, 1 + 2 * embed_dim, 1)
        self.out = nn.Conv2d(embed_dim, embed_dim, 1)

    def forward(self, x):
        query, key, value = self.qkv(x).split([1, self.embed_dim, self.embed_dim], dim=1)
        context = (key * query.softmax(dim=-1)).sum(dim=-1, keepdim=True)
        return self.out(value.relu() * context.expand_as(value))


@torch.no_grad()
def _zero_removed_outputs(model, plan, layers):
    """Zero the weights and biases of ``layers`` for the output positions ``plan`` removes:
    a removed query/key channel then adds nothing to the attention scores, a removed value
    channel nothing to the output, so pruning them leaves the output as it was."""
    from cleanai.pruner.keeps import layer_keeps
    keeps = layer_keeps(plan.graph, plan.removals)
    for name in layers:
        conv = model.get_submodule(name)
        keep = keeps.get((name, "out", -1))
        if keep is None:
            continue
        gone = torch.ones(conv.out_channels, dtype=torch.bool)
        gone[keep] = False
        conv.weight[gone] = 0
        conv.bias[gone] = 0


def _exact_step(model, pruner, x, layers):
    plan = pruner.plan()
    _zero_removed_outputs(model, plan, layers)
    with torch.no_grad():
        before = model(x)
    pruner.apply(plan)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    return plan


def test_split_by_integer_attributes_prunes_each_part_and_updates_them():
    torch.manual_seed(0)
    model, x = Heads().eval(), torch.randn(2, 8, 3, 3)
    graph = cleanai.DependencyGraph(model, x)
    held = [g for g in graph.groups if any(m.name.startswith("qkvs") for m in g.members)]
    assert sorted(g.size for g in held) == [4, 4, 6, 6]  # q|k and v of each head
    assert not any(bool(g.protected.any()) for g in held)
    qk = [g for g in held if g.size == 4]
    assert sorted(qk[0].equal_counts) == sorted(g.id for g in qk)  # key_dim sizes both heads
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    _exact_step(model, pruner, x, ["qkvs.0", "qkvs.1"])
    assert (model.key_dim, model.d) == (2, 3)
    assert [q.out_channels for q in model.qkvs] == [7, 7] and model.proj.in_channels == 6
    assert model(x).shape == (2, 8, 3, 3)


def test_split_part_of_one_channel_keeps_its_size_and_the_attribute_follows():
    torch.manual_seed(0)
    model, x = LinearAttention().eval(), torch.randn(2, 8, 4, 5)
    graph = cleanai.DependencyGraph(model, x)
    kv = [g for g in graph.groups if any(m.name == "qkv" for m in g.members) and g.size == 8]
    assert len(kv) == 1 and not bool(kv[0].protected.any())  # keys and values tied
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no conflicting attribute
        _exact_step(model, pruner, x, ["qkv"])
    assert model.embed_dim == 4 and model.qkv.out_channels == 9


def test_split_by_attributes_replays_from_history(tmp_path):
    torch.manual_seed(0)
    model, x = Heads().eval(), torch.randn(2, 8, 3, 3)
    fresh = copy.deepcopy(model)
    cleanai.StructuredPruner(model, x, pruning_ratio=0.5).step()
    cleanai.save_pruned(model, tmp_path)
    loaded = cleanai.load_pruned(fresh, tmp_path)
    assert (loaded.key_dim, loaded.d) == (2, 3)
    torch.testing.assert_close(loaded(x), model(x))


class ChunkTwo(nn.Module):
    """``a, b = conv(x).chunk(2)``, each half read by a layer of its own."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 1)
        self.a, self.b = nn.Conv2d(4, 5, 1), nn.Conv2d(4, 5, 1)

    def forward(self, x):
        p, q = self.conv(x).chunk(2, dim=1)
        return self.a(p.relu()) + self.b(q)


class Glu(nn.Module):
    """``a * sigmoid(b)``: the halves meet element-wise, so channel i of each goes together."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 1)
        self.out = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        a, b = self.conv(x).chunk(2, dim=1)
        return self.out(a * torch.sigmoid(b))


def test_chunk_parts_pick_their_own_channels_with_equal_counts():
    torch.manual_seed(0)
    model, x = ChunkTwo().eval(), torch.randn(2, 4, 5, 5)
    with torch.no_grad():  # the weakest channel: 0 in the first half, 3 in the second
        model.conv.weight.mul_(10)
        model.conv.weight[[0, 1, 7, 6]] *= 0.01
    graph = cleanai.DependencyGraph(model, x)
    halves = [g for g in graph.groups if any(m.name == "conv" for m in g.members)]
    assert [g.size for g in halves] == [4, 4]
    assert sorted(halves[0].equal_counts) == sorted(g.id for g in halves)
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    plan = pruner.plan()
    first, second = (plan.removals[g.id].tolist() for g in halves)
    assert first == [0, 1] and second == [2, 3]  # positions of their own, as many each
    check_equivalence(model, cleanai.StructuredPruner(model, x, pruning_ratio=0.5), x)
    assert model.conv.out_channels == 4 and model.a.in_channels == model.b.in_channels == 2


def test_plan_with_unequal_chunk_counts_is_rejected():
    torch.manual_seed(0)
    model, x = ChunkTwo().eval(), torch.randn(2, 4, 5, 5)
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    halves = [g for g in pruner.graph.groups if any(m.name == "conv" for m in g.members)]
    plan = cleanai.PruningPlan(pruner.graph, {halves[0].id: [0, 1], halves[1].id: [2]})
    with pytest.raises(PruningError, match="must lose as many channels"):
        pruner.apply(plan)
    assert model.conv.out_channels == 8


def test_glu_chunk_stays_tied_by_position():
    torch.manual_seed(0)
    model, x = Glu().eval(), torch.randn(2, 4, 5, 5)
    graph = cleanai.DependencyGraph(model, x)
    held = [g for g in graph.groups if any(m.name == "conv" for m in g.members)]
    assert len(held) == 1 and held[0].size == 4 and not held[0].equal_counts
    check_equivalence(model, cleanai.StructuredPruner(model, x, pruning_ratio=0.5), x)
    assert model.conv.out_channels == 4 and model.out.in_channels == 2


# --- timm families -------------------------------------------------------------------------

def _timm(name, **kw):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kw).eval()


def _protected(graph, sizes=None):
    """Protected channels as a fraction of those outside the model outputs (the probe's
    measure); ``sizes``: each group's size before a step."""
    total = protected = 0
    for g in graph.groups:
        if g.reasons.get("model output", 0) >= g.size:
            continue
        total += (sizes or {}).get(g.id, g.size)
        protected += int(g.protected.sum())
    return protected / total


@pytest.mark.parametrize("name, size, kw, attrs", [
    ("efficientvit_m0", 224, {}, ("stages.2.blocks.0.mixer.m.attn", ("key_dim", "val_dim"))),
    ("mobilevitv2_050", 64, {}, ("stages.2.1.transformer.0.attn", ("embed_dim",))),
    ("vit_relpos_small_patch16_224", 64, {"img_size": 64, "depth": 2},
     ("blocks.0.attn.rel_pos", ("num_heads",))),
])
def test_timm_attention_hybrids_prune_their_split_parts(name, size, kw, attrs):
    model = _timm(name, **kw)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        shape = model(x).shape
    params = sum(p.numel() for p in model.parameters())
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    assert _protected(pruner.graph) < 0.10
    owner, names = attrs
    before = {a: getattr(model.get_submodule(owner), a) for a in names}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner.step()
    fallbacks = [str(w.message) for w in caught if "no longer runs" in str(w.message)]
    if name == "efficientvit_m0":
        # its first stage has key_dim == val_dim: the split's sizes match two attributes,
        # CleanAI cannot tell which part reads which, and the check forward protects them
        assert all("stages.0." in f for f in fallbacks)
    else:
        assert not fallbacks
    assert _protected(pruner.graph, pruner.original_size) < 0.10
    after = {a: getattr(model.get_submodule(owner), a) for a in names}
    assert all(after[a] < before[a] for a in names)
    assert sum(p.numel() for p in model.parameters()) < 0.6 * params
    with torch.no_grad():
        assert model(x).shape == shape
    if name == "vit_relpos_small_patch16_224":  # the stored view shape follows the heads
        rel = model.get_submodule(owner)
        assert rel.bias_shape[-1] == rel.num_heads


def test_mobilevitv2_round_trip(tmp_path):
    model = _timm("mobilevitv2_050")
    fresh = copy.deepcopy(model)
    x = torch.randn(1, 3, 64, 64)
    cleanai.StructuredPruner(model, x, pruning_ratio=0.5).step()
    cleanai.save_pruned(model, tmp_path)
    loaded = cleanai.load_pruned(fresh, tmp_path)
    assert loaded.stages[2][1].transformer[0].attn.embed_dim == \
        model.stages[2][1].transformer[0].attn.embed_dim
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


class GatedMixer(nn.Module):
    """A linear-attention front (Gated DeltaNet's): q, k and v projections concatenated, a
    causal depthwise conv run on the conv layer's weight (``F.conv1d``), then split by the
    sizes the module stores. Its block calls it with keywords only."""

    def __init__(self, dim=8, key_dim=4, value_dim=6, kernel=3):
        super().__init__()
        self.key_dim, self.value_dim = key_dim, value_dim
        self.q, self.k = nn.Linear(dim, key_dim), nn.Linear(dim, key_dim)
        self.v = nn.Linear(dim, value_dim)
        n = 2 * key_dim + value_dim
        self.conv = nn.Conv1d(n, n, kernel, groups=n, padding=kernel - 1)
        self.out = nn.Linear(value_dim, dim)

    def forward(self, hidden_states):
        length = hidden_states.shape[1]
        mixed = torch.cat([self.q(hidden_states), self.k(hidden_states),
                           self.v(hidden_states)], -1).transpose(1, 2)
        mixed = torch.nn.functional.conv1d(mixed, self.conv.weight, self.conv.bias,
                                           padding=self.conv.padding[0],
                                           groups=mixed.shape[1])[..., :length]
        q, k, v = torch.split(torch.nn.functional.silu(mixed).transpose(1, 2),
                              [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        return self.out((q @ k.transpose(1, 2)).softmax(-1) @ v)


class MixerBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.mixer, self.head = nn.Linear(5, 8), GatedMixer(), nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(h + self.mixer(hidden_states=h))


def test_concatenated_layers_split_by_stored_sizes_through_a_functional_depthwise_conv():
    torch.manual_seed(0)
    model, x = MixerBlock(), torch.randn(2, 7, 5)
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    assert not any(g.protected.any() for g in pruner.graph.groups
                   if set(g.reasons) != {"model output"})
    plan = pruner.plan()
    zero_consumers(model, plan)  # the hidden width; then silence the removed q, k, v rows
    keeps = layer_keeps(plan.graph, plan.removals)
    mixer, gone = model.mixer, []
    with torch.no_grad():
        for layer in (mixer.q, mixer.k, mixer.v):
            g = torch.ones(layer.out_features, dtype=torch.bool)
            g[keeps[(f"mixer.{'qkv'[len(gone)]}", "out", -1)]] = False
            layer.weight[g], layer.bias[g] = 0, 0
            gone.append(g)
        mixer.conv.weight[torch.cat(gone)] = 0
        mixer.conv.bias[torch.cat(gone)] = 0
        before = model(x)
    pruner.apply(plan)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)
    assert mixer.key_dim == mixer.q.out_features == mixer.k.out_features == 2
    assert mixer.value_dim == mixer.v.out_features == 3
    assert mixer.conv.weight.shape == (7, 1, 3) and mixer.conv.in_channels == 7


def test_a_conv_run_on_a_conv_layers_weight_prunes_like_the_layer():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            h = torch.nn.functional.conv2d(x, self.a.weight, self.a.bias, padding=1)
            return self.b(h.relu())

    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 6, 6)
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    check_equivalence(model, pruner, x)
    assert model.a.weight.shape == (4, 3, 3, 3) and model.b.weight.shape == (4, 4, 1, 1)
