"""Slices of a layer's whole output (Phi-3's fused ``qkv_proj`` read as ``qkv[..., :q_pos]``
and so on): each part prunes on its own, and every pruned forward checks that the bounds the
code computes follow the counts the parts kept; bounds written in the code are caught and
their groups kept."""
import warnings

import pytest
import torch
from torch import nn

import cleanai
from equivalence import check_equivalence


class FusedAttention(nn.Module):
    """Grouped-query attention with one fused projection, sliced at bounds computed from the
    head counts it stores (as Phi-3 does)."""

    def __init__(self, dim=32, heads=8, kv_heads=4, head_dim=4):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = heads, kv_heads, head_dim
        self.qkv_proj = nn.Linear(dim, (heads + 2 * kv_heads) * head_dim)
        self.o_proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x):
        b, s, _ = x.shape
        qkv = self.qkv_proj(x)
        q_pos = self.num_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        q = qkv[..., :q_pos].view(b, s, -1, self.head_dim).transpose(1, 2)
        k = qkv[..., q_pos:q_pos + kv].view(b, s, -1, self.head_dim).transpose(1, 2)
        v = qkv[..., q_pos + kv:].view(b, s, -1, self.head_dim).transpose(1, 2)
        groups = self.num_heads // self.num_key_value_heads
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        out = torch.softmax(q @ k.transpose(-1, -2) / 2, -1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class Net(nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.inp, self.attn, self.head = nn.Linear(6, 32), attention, nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.attn(self.inp(x)))


def test_fused_projection_parts_prune_and_follow():
    torch.manual_seed(0)
    model, x = Net(FusedAttention()), torch.randn(2, 5, 6)
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5, kinds=["heads"],
                                      iterative_steps=2)
    assert sorted(s[2:] for s in pruner.graph.slices) == [[0, 32], [32, 48], [48, 64]]
    assert not any(g.protected.any() for g in pruner.graph.groups if g.kind == "heads")
    for _ in range(2):  # the second step checks the bounds the first one moved
        check_equivalence(model, pruner, x)
    attn = model.attn
    assert (attn.num_heads, attn.num_key_value_heads) == (4, 2)
    assert attn.qkv_proj.out_features == (4 + 2 * 2) * 4 and attn.o_proj.in_features == 16
    assert sorted(s[2:] for s in pruner.graph.slices) == [[0, 16], [16, 24], [24, 32]]


class LiteralSlices(nn.Module):
    """A layer's output read at bounds written in the code: the middle part would move."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.mid, self.ends = nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc(x)
        return self.mid(h[:, 4:12]) + self.ends(torch.cat([h[:, :4], h[:, 12:]], 1))


@pytest.mark.parametrize("check_forward", ["auto", False])
def test_literal_bounds_are_caught_and_their_groups_kept(check_forward):
    # a step that prunes a sliced layer is checked even with check_forward=False: the slice
    # would read the wrong channels without failing
    torch.manual_seed(0)
    model, x = LiteralSlices(), torch.randn(3, 6)
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5, check_forward=check_forward)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_equivalence(model, pruner, x)  # the output of the model as pruned is exact
    said = " ".join(str(w.message) for w in caught)
    assert "SliceMoved" in said and "h[:, 4:12]" in said, said
    # the parts whose loss would move the middle slice keep their channels; the last part,
    # read from a fixed start to the end, still prunes
    assert model.mid.in_features == 8 and model.fc.out_features == 14


class InterleavedAttention(nn.Module):
    """One fused projection viewed as ``[..., heads, 3, head_dim]`` and read as q, k and v by
    ``select`` on the 3 (Persimmon, BLOOM), with a LayerNorm over each head's dims."""

    def __init__(self, dim=32, heads=4, head_dim=8, unbind=False):
        super().__init__()
        self.num_heads, self.head_dim, self.unbind = heads, head_dim, unbind
        self.query_key_value = nn.Linear(dim, 3 * heads * head_dim)
        self.q_layernorm, self.k_layernorm = nn.LayerNorm(head_dim), nn.LayerNorm(head_dim)
        self.dense = nn.Linear(heads * head_dim, dim)

    def forward(self, x):
        b, s, _ = x.shape
        qkv = self.query_key_value(x).view(b, s, self.num_heads, 3, self.head_dim)
        if self.unbind:
            q, k, v = qkv.unbind(-2)
        else:
            q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        q, k = self.q_layernorm(q).transpose(1, 2), self.k_layernorm(k).transpose(1, 2)
        out = torch.softmax(q @ k.transpose(-1, -2), -1) @ v.transpose(1, 2)
        return self.dense(out.transpose(1, 2).reshape(b, s, -1))


@pytest.mark.parametrize("unbind", [False, True], ids=["select", "unbind(-2)"])
def test_heads_of_a_projection_read_by_select_prune(unbind):
    torch.manual_seed(0)
    model, x = Net(InterleavedAttention(unbind=unbind)), torch.randn(2, 5, 6)
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5, kinds=["heads"])
    heads = [g for g in pruner.graph.groups if g.kind == "heads"]
    assert [g.size for g in heads] == [4] and not heads[0].protected.any()
    check_equivalence(model, pruner, x)
    attn = model.attn
    assert attn.num_heads == 2 and attn.query_key_value.out_features == 3 * 2 * 8
    assert attn.q_layernorm.normalized_shape == (8,)  # each head's dims stay


class RotaryOnOutput(nn.Module):
    """rotate_half on a layer's output itself, its frequencies computed from the width: the
    two halves are paired position by position, each pair at a fixed frequency."""

    def __init__(self):
        super().__init__()
        self.q, self.out = nn.Linear(6, 16), nn.Linear(16, 5)

    def forward(self, x):
        q = self.q(x)
        d, s = q.shape[-1], q.shape[-2]
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        emb = torch.outer(torch.arange(s).float(), inv).repeat(1, 2)
        half = torch.cat([-q[..., d // 2:], q[..., :d // 2]], -1)
        return self.out(q * emb.cos() + half * emb.sin())


def test_rotate_half_on_a_layer_output_keeps_its_channels():
    g = cleanai.DependencyGraph(RotaryOnOutput(), torch.randn(2, 7, 6))
    assert g.slices == []
    q = next(grp for grp in g.groups if any(m.name == "q" and m.kind == "out"
                                            for m in grp.members))
    assert q.protected.all() and "rotate_half" in next(iter(q.reasons))
