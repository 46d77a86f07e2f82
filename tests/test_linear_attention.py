"""Gated DeltaNet (the linear attention of Qwen3.5, Qwen3-Next and OLMo-Hybrid): its heads prune
through the chunked delta rule, whose recurrent state starts as a constant and whose output is
written chunk by chunk into a fresh tensor. And inputs held per decoder layer in one table
(Gemma 4), whose width prunes alike in every layer."""
import warnings

import pytest
import torch
from torch import nn

from cleanai import PruningPlan, StructuredPruner
from equivalence import apply_unchanged, check_equivalence


def _group(pruner, layer: str, kind: str):
    """The group that holds ``layer``'s ``kind`` ("in" / "out") channels."""
    return next(g for g in pruner.graph.groups
                if any(m.name == layer and m.kind == kind for m in g.members))


class StateRead(nn.Module):
    """Heads read a state made during the forward, ``q @ state`` per head, then written
    into a fresh output one position at a time (``out[:, :, t] = ...``)."""

    def __init__(self, per_head_state: bool):
        super().__init__()
        self.per_head_state = per_head_state
        self.q = nn.Linear(8, 4 * 3)
        self.o = nn.Linear(4 * 3, 8)

    def forward(self, x):  # x: [B, T, 8]
        b, t, _ = x.shape
        q = self.q(x).view(b, t, -1, 3).transpose(1, 2)  # [B, heads, T, 3]
        heads = q.shape[1]
        state = torch.eye(3).expand(b, heads, 3, 3) + 0.5  # made from the input's shape
        if self.per_head_state:  # values that differ per head: they cannot follow a cut
            state = state * torch.arange(1.0, heads + 1.0).view(1, heads, 1, 1)
        out = torch.zeros_like(q)
        for i in range(t):
            out[:, :, i] = (q[:, :, i, None] @ state)[:, :, 0]
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("per_head_state", [False, True])
def test_a_constant_state_prunes_heads_only_when_alike_for_every_head(per_head_state):
    torch.manual_seed(0)
    model, x = StateRead(per_head_state), torch.randn(2, 5, 8)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5, kinds=["heads"])
    heads = _group(pruner, "o", "in")
    assert heads.size == 4 and bool(heads.protected.all()) is per_head_state
    if not per_head_state:
        check_equivalence(model, pruner, x)
        assert model.q.out_features == model.o.in_features == 6


class WriteInto(nn.Module):
    """Channels written into one position of a tensor made in the forward: a fresh zero
    tensor (it holds nothing per channel), or one whose values differ per channel (they would
    be made again at the smaller width), or moved by ``index_add_``."""

    def __init__(self, base: str):
        super().__init__()
        self.base = base
        self.a = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: [B, 6]
        v = self.a(x)  # [B, C]
        c = v.shape[1]
        if self.base == "zeros":
            out = torch.zeros(x.shape[0], c, 2)
        else:
            out = torch.arange(float(c)).view(1, c, 1).repeat(x.shape[0], 1, 2)
        if self.base == "index_add":
            out[:, :, 0].index_add_(1, torch.arange(c - 1, -1, -1), v)
        else:
            out[:, :, 0] = v
        return self.head(out.sum(-1))


@pytest.mark.parametrize("base,prunes", [("zeros", True), ("per_channel", False),
                                         ("index_add", False)])
def test_a_write_into_a_tensor_made_in_the_forward(base, prunes):
    torch.manual_seed(0)
    model, x = WriteInto(base), torch.randn(4, 6)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    group = _group(pruner, "a", "out")
    assert bool(group.protected.any()) is not prunes
    if prunes:
        check_equivalence(model, pruner, x)
        assert model.a.out_features == 4


def _tiny(model_type, layer_types=("linear_attention", "full_attention")):
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=64, hidden_size=32, num_hidden_layers=len(layer_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64,
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=6, layer_types=list(layer_types), max_position_embeddings=128,
        pad_token_id=0)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_config(config).eval()


def _linear_heads(pruner):
    return [g for g in pruner.graph.groups
            if any(m.name.endswith("linear_attn.A_log") for m in g.members)]


@pytest.mark.parametrize("model_type,seq", [("qwen3_5_text", 7), ("qwen3_5_text", 70),
                                            ("olmo_hybrid", 7)])
def test_gated_deltanet_heads_prune_exactly(model_type, seq):
    """Each key head goes with the value heads it serves (two here), in every projection,
    the depthwise conv, ``A_log`` and ``dt_bias``; removing the heads whose output columns
    are zero changes nothing, over one chunk of the delta rule or several (64 positions
    each)."""
    model = _tiny(model_type)
    inputs = {"input_ids": torch.randint(1, 64, (2, seq)), "use_cache": False}
    pruner = StructuredPruner(model, inputs, pruning_ratio=0.5, kinds=["heads"])
    heads = _linear_heads(pruner)
    assert len(heads) == 1 and heads[0].size == 2 and not heads[0].protected.any()
    full = pruner.plan()
    apply_unchanged(model, pruner, inputs,
                    PruningPlan(pruner.graph, {heads[0].id: full.removals[heads[0].id]}))
    mixer = model.model.layers[0].linear_attn
    assert (mixer.num_k_heads, mixer.num_v_heads, mixer.key_dim, mixer.value_dim) == (1, 2, 8, 12)
    assert mixer.A_log.shape == mixer.dt_bias.shape == (2,)
    assert mixer.conv1d.weight.shape[0] == 2 * 8 + 12


def test_qwen3_5_pruned_generates_and_reloads(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _tiny("qwen3_5_text")
    ids = torch.randint(1, 64, (2, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the config describes the pruned model
        StructuredPruner(model, {"input_ids": ids, "use_cache": False}, pruning_ratio=0.5).step()
    assert (model.config.linear_num_key_heads, model.config.linear_num_value_heads) == (1, 2)
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, 10)
    model.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


@pytest.mark.parametrize("kinds", [["heads"], None])
def test_config_fields_of_heads_that_stayed_keep_their_values(kinds, tmp_path):
    """Qwen3-Next fuses its linear attention's projections per key head, which keeps those
    heads whole; its attention heads prune. The config's linear head counts, scaled with the
    other head counts at first, are taken back, so the config rebuilds the pruned model."""
    transformers = pytest.importorskip("transformers")
    model = _tiny("qwen3_next")
    ids = torch.randint(1, 64, (2, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        StructuredPruner(model, {"input_ids": ids, "use_cache": False}, pruning_ratio=0.5,
                         kinds=kinds).step()
    assert model.config.num_attention_heads == 2
    assert (model.config.linear_num_key_heads, model.config.linear_num_value_heads) == (2, 4)
    model.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


# --- inputs per decoder layer ---------------------------------------------------------------

class PerLayerInputs(nn.Module):
    """One table holds a slice for each of 3 layers (Gemma 4's per-layer inputs): viewed as
    ``[..., layers, width]``, shifted, then layer ``i`` takes slice ``i``."""

    def __init__(self, read: str = "select"):
        super().__init__()
        self.read = read
        self.table = nn.Linear(8, 3 * 6)
        self.gates = nn.ModuleList(nn.Linear(8, 6) for _ in range(3))
        self.outs = nn.ModuleList(nn.Linear(6, 8) for _ in range(3))

    def forward(self, x):
        per = self.table(x).view(*x.shape[:-1], 3, -1) * 0.5 + 1.0
        parts = [per[..., i, :] for i in range(3)] if self.read == "select" else \
            [p.squeeze(-2) for p in per.split(1, dim=-2)]
        for i in range(3):
            x = x + self.outs[i](torch.relu(self.gates[i](x)) * parts[i])
        return x


@pytest.mark.parametrize("read", ["select", "split"])
def test_slices_read_one_per_layer_prune_alike_exactly(read):
    """Every slice is read on its own (``select``, or a split into single positions), so the
    slices are not heads: each loses the same positions, with the gates and projections of
    every layer."""
    torch.manual_seed(0)
    model, x = PerLayerInputs(read), torch.randn(4, 8)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5, kinds=["channels"])
    width = _group(pruner, "table", "out")
    assert width.size == 6 and not width.protected.any()
    assert {m.name for m in width.members} >= {"gates.0", "gates.2", "outs.1"}
    check_equivalence(model, pruner, x)
    assert model.table.out_features == 3 * 3 and model.gates[1].out_features == 3


def _gemma4(per_layer: int):
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(
        "gemma4_text", vocab_size=64, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64,
        hidden_size_per_layer_input=per_layer, vocab_size_per_layer_input=64,
        max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("kinds", [["channels", "heads"], None])
def test_gemma4_per_layer_inputs_prune_and_reload(kinds, tmp_path):
    """Gemma 4's per-layer embedding table (``num_layers x hidden_size_per_layer_input``
    wide), its projection, their norm and each layer's gate and projection lose the same
    positions; the width follows in the modules and the config. With the hidden size pruned
    too, the projection's scale ``hidden_size ** -0.5`` takes the config's new value and the
    projection's weight makes up for it."""
    transformers = pytest.importorskip("transformers")
    model = _gemma4(per_layer=12)
    ids = torch.randint(1, 64, (2, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the config describes the pruned model
        StructuredPruner(model, {"input_ids": ids, "use_cache": False}, pruning_ratio=0.5,
                         kinds=kinds).step()
    assert model.model.embed_tokens_per_layer.weight.shape == (64, 2 * 6)
    assert model.config.hidden_size == (32 if kinds else 16)
    assert model.model.hidden_size_per_layer_input == model.config.hidden_size_per_layer_input == 6
    assert model.model.layers[1].per_layer_input_gate.out_features == 6
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, 10)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


class HeadsRead(nn.Module):
    """Attention over a view into heads, read in parts of two heads (``how="pairs"``) or one
    head at a time by a module that counts its heads (``how="each"``)."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.num_heads = how, 4
        self.q, self.k, self.v = (nn.Linear(8, 16) for _ in range(3))
        self.o = nn.Linear(16, 8)

    def forward(self, x):  # x: [B, T, 8]
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, self.num_heads, -1) for f in (self.q, self.k, self.v))
        if self.how == "pairs":
            y = torch.cat([nn.functional.scaled_dot_product_attention(
                a.transpose(1, 2), c.transpose(1, 2), d.transpose(1, 2)).transpose(1, 2)
                for a, c, d in zip(q.split(2, 2), k.split(2, 2), v.split(2, 2))], 2)
        else:
            y = torch.stack([torch.softmax(q[:, :, h] @ k[:, :, h].transpose(1, 2), -1)
                             @ v[:, :, h] for h in range(self.num_heads)], 2)
        return self.o(y.reshape(b, t, -1))


@pytest.mark.parametrize("how", ["pairs", "each"])
def test_heads_read_in_parts_or_one_by_one_stay_heads(how):
    """Not blocks read on their own (the per-layer inputs above): a split into parts of
    several heads, or a module that counts the heads it reads one by one, keeps heads as
    the units."""
    torch.manual_seed(0)
    model, x = HeadsRead(how), torch.randn(2, 5, 8)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5, kinds=["heads"])
    heads = _group(pruner, "q", "out")
    # in pairs: 2 units of two heads each; one by one: 4 heads, which the selects keep
    assert (heads.kind, heads.size, bool(heads.protected.all())) == (
        "heads", 2 if how == "pairs" else 4, how == "each")
    if how == "pairs":
        check_equivalence(model, pruner, x)
        assert model.q.out_features == 8


def test_a_factory_tensor_handed_on_stays_fresh_and_one_written_into_does_not():
    """``zeros(...).to(dtype)`` still holds one value everywhere; ``new_empty`` filled in part
    without autograd holds values of its own."""
    class Write(nn.Module):
        def __init__(self, how):
            super().__init__()
            self.how, self.a, self.head = how, nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            v = self.a(x)
            if self.how == "to":
                out = torch.zeros(v.shape[0], v.shape[1], 2, dtype=torch.float64).to(v.dtype)
            else:
                out = v.new_empty(v.shape[0], v.shape[1], 2)
                out[:, :, 1] = torch.arange(float(v.shape[1]))
            out[:, :, 0] = v
            return self.head(out.sum(-1))

    torch.manual_seed(0)
    x = torch.randn(4, 6)
    for how, prunes in (("to", True), ("filled", False)):
        model = Write(how)
        pruner = StructuredPruner(model, x, pruning_ratio=0.5)
        group = _group(pruner, "a", "out")
        assert bool(group.protected.any()) is not prunes, how


def test_gemma4_hidden_size_prunes_when_the_per_layer_width_equals_it():
    """The per-layer width is a name of the channels kind only: a hidden size of the same
    value leaves it as it is."""
    model = _gemma4(per_layer=32)
    ids = torch.randint(1, 64, (2, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        StructuredPruner(model, {"input_ids": ids, "use_cache": False}, pruning_ratio=0.5).step()
    assert model.model.embed_tokens.weight.shape == (64, 16)
    assert model.model.hidden_size_per_layer_input == 16  # its own group, pruned alike
    assert model(ids).logits.shape == (2, 7, 64)


class ForwardSubstitution(nn.Module):
    """A per-head matrix over positions solved by forward substitution in place
    (``attn[..., i, :i] = ...``, the chunked delta rule written without a triangular solve);
    ``narrow_heads`` also writes into part of the heads."""

    def __init__(self, narrow_heads: bool = False):
        super().__init__()
        self.narrow_heads = narrow_heads
        self.k = nn.Linear(8, 4 * 3)
        self.v = nn.Linear(8, 4 * 3)
        self.o = nn.Linear(4 * 3, 8)

    def forward(self, x):  # x: [B, T, 8]
        b, t, _ = x.shape
        k = self.k(x).view(b, t, -1, 3).transpose(1, 2)  # [B, heads, T, 3]
        v = self.v(x).view(b, t, -1, 3).transpose(1, 2)
        attn = -(k @ k.transpose(-1, -2)).tril(-1) * 0.1  # [B, heads, T, T]
        for i in range(1, t):
            row = attn[..., i, :i].clone()
            sub = attn[..., :i, :i].clone()
            if self.narrow_heads:
                attn[:, :1, i, :i] = (row + (row.unsqueeze(-1) * sub).sum(-2))[:, :1]
            else:
                attn[..., i, :i] = row + (row.unsqueeze(-1) * sub).sum(-2)
        y = (attn + torch.eye(t)) @ v
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("narrow_heads", [False, True])
def test_a_write_into_a_block_of_position_dims_keeps_heads_prunable(narrow_heads):
    torch.manual_seed(0)
    model, x = ForwardSubstitution(narrow_heads), torch.randn(2, 5, 8)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5, kinds=["heads"])
    heads = _group(pruner, "k", "out")
    assert bool(heads.protected.any()) is narrow_heads
    if not narrow_heads:
        check_equivalence(model, pruner, x)
        assert model.k.out_features == model.o.in_features == 6


class WriteKept(nn.Module):
    """Writes whose unwritten positions or written values hold something per channel."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.a, self.head = how, nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        v = self.a(x)
        b, c = v.shape
        if self.how == "out":  # filled by a call's ``out=``
            out = torch.empty(b, c, 2)
            torch.mul(torch.arange(float(c)).view(1, c, 1).expand(b, c, 2), 1.0, out=out)
            out[:, :, 0] = v
        elif self.how == "alias":  # filled through another alias, without autograd
            e = torch.empty(b, c, 2)
            out = e.detach()
            e.copy_(torch.arange(float(c)).view(1, c, 1).expand(b, c, 2))
            out[:, :, 0] = v
        elif self.how == "wrap":  # a flat view whose range runs into the next row
            out = torch.zeros(b, 3, c)
            out.view(b, 3 * c)[:, 1:1 + c] = v
            out = out.sum(1).unsqueeze(-1)
        else:  # a constant, one value per channel, written into a block
            out = v.view(b, c, 1, 1).expand(b, c, 2, 2).clone()
            out[:, :, 1, :1] = torch.arange(float(c)).view(1, c, 1)
            out = out.flatten(2)
        return self.head(out.sum(-1))


@pytest.mark.parametrize("how", ["out", "alias", "wrap", "block"])
def test_writes_that_would_not_follow_a_cut_keep_the_channels(how):
    torch.manual_seed(0)
    model, x = WriteKept(how), torch.randn(4, 6)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    group = _group(pruner, "a", "out")
    assert group.protected.all()


def test_a_sparse_tensor_in_the_forward_traces():
    """A sparse tensor has no storage to tie its aliases by: tracing goes on (the sparse
    product is an op CleanAI does not know, so its channels stay)."""
    class Graph(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):  # x: [nodes, 6]
            adj = torch.eye(x.shape[0]).to_sparse().to(x.dtype).detach()
            return self.head(torch.sparse.mm(adj, torch.relu(self.a(x))))

    torch.manual_seed(0)
    model, x = Graph(), torch.randn(5, 6)
    with pytest.warns(UserWarning, match="SparseAddmm"):
        pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    assert _group(pruner, "a", "out").protected.all()
    assert model(x).shape == (5, 3)
