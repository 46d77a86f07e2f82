"""nn.MultiheadAttention: embedding channels, whole heads and head dims prune like any group."""
import pytest
import torch
from torch import nn

import cleanai
from cleanai import StructuredPruner
from cleanai.core.layers_attention import PrunedMultiheadAttention
from cleanai.importance import ActivationImportance, WeightActivationImportance
from cleanai.pruner.apply import PruningError
from cleanai.pruner.plan import PruningPlan
from cleanai.utils import count_params

from equivalence import check_equivalence


class Attn(nn.Module):
    """A residual self- (or cross-) attention block with a classifier on top."""

    def __init__(self, batch_first=True, kdim=None, bias_kv=False, zero_attn=False,
                 need_weights=True, padding=False):
        super().__init__()
        self.embed = nn.Linear(5, 16)
        self.kv = nn.Linear(5, kdim) if kdim else None
        self.mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim,
                                         add_bias_kv=bias_kv, add_zero_attn=zero_attn)
        self.fc = nn.Linear(16, 3)
        self.need_weights, self.padding = need_weights, padding

    def forward(self, x):
        h = self.embed(x)
        kv = self.kv(x) if self.kv is not None else h
        if not self.mha.batch_first:
            h, kv = h.transpose(0, 1), kv.transpose(0, 1)
        mask = None
        if self.padding:  # the last two keys of the first sequence are padding
            mask = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
            mask[0, -2:] = True
        a, _ = self.mha(h, kv, kv, key_padding_mask=mask, need_weights=self.need_weights)
        y = a + h
        if not self.mha.batch_first:
            y = y.transpose(0, 1)
        return self.fc(y)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 6])
def test_pruned_forward_matches_the_stock_forward(batch_first, kdim):
    # the same module run by both forwards, over the options nn.MultiheadAttention takes
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim,
                                  add_bias_kv=kdim is None, add_zero_attn=kdim is None).eval()
    ours = PrunedMultiheadAttention.__new__(PrunedMultiheadAttention)
    ours.__dict__.update(stock.__dict__)
    n, length, src = 2, 5, 7
    q = torch.randn((n, length, 16) if batch_first else (length, n, 16))
    k = torch.randn((n, src, kdim or 16) if batch_first else (src, n, kdim or 16))
    padding = torch.zeros(n, src, dtype=torch.bool)
    padding[1, -3:] = True
    masks = [dict(), dict(key_padding_mask=padding), dict(attn_mask=torch.randn(length, src)),
             dict(attn_mask=torch.rand(n * 4, length, src) > 0.8, key_padding_mask=padding)]
    for kw in masks:
        for need_weights, average in ((True, True), (True, False), (False, True)):
            want = stock(q, k, k, need_weights=need_weights, average_attn_weights=average, **kw)
            got = ours(q, k, k, need_weights=need_weights, average_attn_weights=average, **kw)
            torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)
            if need_weights:
                torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-4)
            else:
                assert got[1] is None
    one = (q[0] if batch_first else q[:, 0]), (k[0] if batch_first else k[:, 0])  # unbatched
    torch.testing.assert_close(ours(one[0], one[1], one[1])[0], stock(one[0], one[1], one[1])[0],
                               atol=1e-5, rtol=1e-4)


def _internal_group(graph, name, index):
    hits = [g for g in graph.groups
            if any(m.kind == "internal" and m.name == name and m.dim == index for m in g.members)]
    assert len(hits) == 1
    return hits[0]


@pytest.mark.parametrize("case", [
    dict(batch_first=True),
    dict(batch_first=False, need_weights=False),
    dict(batch_first=True, kdim=6, need_weights=False),
    dict(batch_first=False, kdim=6),
    dict(batch_first=True, bias_kv=True, zero_attn=True, padding=True),
    dict(batch_first=False, bias_kv=True, zero_attn=True, padding=True, need_weights=False),
], ids=["fused-bf", "fused-seq-first-sdpa", "separate-bf-sdpa", "separate-seq-first",
        "bias-kv-zero-attn-padding", "bias-kv-zero-attn-padding-sdpa"])
def test_removing_silent_heads_is_exact(case):
    torch.manual_seed(0)
    model, x = Attn(**case).eval(), torch.randn(2, 7, 5)
    pruner = StructuredPruner(model, x)
    group = _internal_group(pruner.graph, "mha", 0)
    assert group.size == 4 and not group.protected.any()
    with torch.no_grad():  # heads 1 and 2 write nothing: out_proj ignores their 8 columns
        model.mha.out_proj.weight[:, 4:12] = 0
        before = model(x)
    pruner.apply(PruningPlan(pruner.graph, {group.id: [1, 2]}))
    mha = model.mha
    assert type(mha) is PrunedMultiheadAttention  # 2 heads x 4 dims no longer fill embed_dim 16
    assert (mha.num_heads, mha.head_dim, mha.embed_dim) == (2, 4, 16)
    assert mha.out_proj.weight.shape == (16, 8)
    if case.get("kdim"):
        assert mha.q_proj_weight.shape == (8, 16) and mha.k_proj_weight.shape == (8, 6)
        assert (mha.kdim, mha.vdim) == (6, 6)
    else:
        assert mha.in_proj_weight.shape == (24, 16) and mha.in_proj_bias.shape == (24,)
    if case.get("bias_kv"):
        assert mha.bias_k.shape == mha.bias_v.shape == (1, 1, 8)
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    model.train()
    model(x).sum().backward()  # trains after pruning
    assert mha.in_proj_bias.grad.shape == mha.in_proj_bias.shape


def test_head_dims_stay_uniform_and_exact():
    torch.manual_seed(0)
    model, x = Attn(need_weights=False).eval(), torch.randn(2, 7, 5)
    pruner = StructuredPruner(model, x, ignored_layers=[model.embed], attention="head_dims")
    group = _internal_group(pruner.graph, "mha", 1)
    assert group.size == 4  # head_dim: each channel is one position in every head
    removed = [0, 3]
    rows = torch.tensor([h * 4 + d for h in range(4) for d in removed])
    with torch.no_grad():  # dims 0 and 3 neither score (query rows) nor write (out_proj)
        model.mha.in_proj_weight[rows] = 0
        model.mha.in_proj_bias[rows] = 0
        model.mha.out_proj.weight[:, rows] = 0
        before = model(x)
    pruner.apply(PruningPlan(pruner.graph, {group.id: removed}))
    mha = model.mha
    assert (mha.num_heads, mha.head_dim) == (4, 2) and mha.in_proj_weight.shape == (24, 16)
    with torch.no_grad():  # the old 1/sqrt(head_dim) is folded into the query rows
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attention", ["heads", "head_dims"])
def test_zero_weight_equivalence_of_embedding_and_attention_units(attention):
    # the residual stream's removed channels are read by nobody, removed units write nothing
    torch.manual_seed(0)
    model, x = Attn(bias_kv=True), torch.randn(2, 7, 5)
    check_equivalence(model, StructuredPruner(model, x, pruning_ratio=0.5, attention=attention), x)
    assert model.mha.embed_dim == 8 and model.mha.num_heads * model.mha.head_dim == 8


def test_failed_apply_restores_the_stock_layer():
    class Checked(Attn):
        def forward(self, x):
            if self.mha.num_heads != 4:
                raise RuntimeError("this model needs 4 heads")
            return super().forward(x)

    torch.manual_seed(0)
    model, x = Checked(), torch.randn(2, 7, 5)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    # a plain Python read of a layer attribute makes no torch call: the trace cannot see
    # it, so only an explicit check forward finds the failure
    pruner = StructuredPruner(model, x, check_forward=True)
    group = _internal_group(pruner.graph, "mha", 0)
    with pytest.raises(PruningError, match="4 heads"):
        pruner.apply(PruningPlan(pruner.graph, {group.id: [0]}))
    assert type(model.mha) is nn.MultiheadAttention and model.mha._qkv_same_embed_dim
    assert (model.mha.num_heads, model.mha.head_dim, model.mha.out_proj.in_features) == (4, 4, 16)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert model(x).shape == (2, 7, 3)


def test_ratio_prunes_embedding_and_heads_back_to_the_stock_layer():
    torch.manual_seed(0)
    model, x = Attn(), torch.randn(2, 7, 5)
    before = count_params(model)
    StructuredPruner(model, x, pruning_ratio=0.5).prune()
    mha = model.mha
    # 16 -> 8 embedding channels and 4 -> 2 heads of 4: the stock forward fits again
    assert type(mha) is nn.MultiheadAttention and mha._qkv_same_embed_dim
    assert (mha.embed_dim, mha.kdim, mha.num_heads, mha.head_dim) == (8, 8, 2, 4)
    assert model.fc.in_features == 8 and count_params(model) < before / 2
    assert model(x).shape == (2, 7, 3)


def test_activation_scores_see_each_heads_output():
    torch.manual_seed(0)
    model, x = Attn(need_weights=False), torch.randn(2, 7, 5)
    with torch.no_grad():  # head 2 reads zero values: it outputs nothing, whatever it attends to
        model.mha.in_proj_weight[32 + 8:32 + 12] = 0
        model.mha.in_proj_bias[32 + 8:32 + 12] = 0
    pruner = StructuredPruner(model, x, pruning_ratio=0.25, importance=ActivationImportance())
    pruner.calibrate([torch.randn(4, 7, 5) for _ in range(3)])
    group = _internal_group(pruner.graph, "mha", 0)
    scores = pruner.importance(group, model)
    assert scores[2] == 0 and bool((scores[[0, 1, 3]] > 0).all())
    plan = pruner.plan()
    assert plan.removals[group.id].tolist() == [2]
    pruner.apply(plan)
    assert model.mha.num_heads == 3 and model(x).shape == (2, 7, 3)


def test_per_layer_ratio_reaches_the_heads():
    torch.manual_seed(0)
    model, x = Attn(), torch.randn(2, 7, 5)
    StructuredPruner(model, x, pruning_ratio=0.25, layer_pruning_ratios={"mha": 0.75}).prune()
    # the heads belong to "mha" alone; the residual stream is also written by "mha"
    assert model.mha.num_heads == 1 and model.mha.embed_dim == 4
    assert model(x).shape == (2, 7, 3)


def test_cross_attention_key_channels_follow_their_producer():
    torch.manual_seed(0)
    model, x = Attn(kdim=6), torch.randn(2, 7, 5)
    graph = cleanai.DependencyGraph(model, x)
    key = _internal_group(graph, "mha", 2)
    assert {(m.name, m.kind) for m in key.members} == {("kv", "out"), ("mha", "internal")}
    assert _internal_group(graph, "mha", 3) is key  # key and value are the same tensor
    pruner = StructuredPruner(model, x, pruning_ratio=0.5, global_pruning=True, round_to=2,
                              importance=WeightActivationImportance())
    pruner.calibrate([torch.randn(4, 7, 5) for _ in range(2)])
    pruner.prune()
    mha = model.mha
    assert mha.kdim == mha.vdim == model.kv.out_features < 6
    assert mha.k_proj_weight.shape[1] == mha.kdim and mha.head_dim * mha.num_heads == mha.q_proj_weight.shape[0]
    assert model(x).shape == (2, 7, 3)


def test_transformer_encoder_fast_path_after_head_pruning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dropout=0.0), 2,
        enable_nested_tensor=False), nn.Linear(16, 3)).eval()
    x = torch.randn(2, 7, 5)
    StructuredPruner(model, x, pruning_ratio=0.5, ignored_layers=[model[0]]).prune()
    attn = model[1].layers[0].self_attn
    assert type(attn) is PrunedMultiheadAttention and (attn.num_heads, attn.embed_dim) == (2, 16)
    with torch.no_grad():  # eval + no_grad: the layer's fused fast path must step aside
        assert model(x).shape == (2, 7, 3)


def test_encoder_decoder_transformer_prunes_at_half():
    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.src, self.tgt, self.fc = nn.Linear(5, 16), nn.Linear(5, 16), nn.Linear(16, 3)
            self.t = nn.Transformer(16, 4, 2, 2, 32, dropout=0.0, batch_first=True)

        def forward(self, x, y):
            return self.fc(self.t(self.src(x), self.tgt(y)))

    torch.manual_seed(0)
    model, inputs = Seq2Seq(), (torch.randn(2, 7, 5), torch.randn(2, 9, 5))
    before = count_params(model)
    StructuredPruner(model, inputs, pruning_ratio=0.5).prune()
    assert model.t.d_model == 8  # checked by its forward against the inputs' width
    for attn in (model.t.encoder.layers[0].self_attn, model.t.decoder.layers[1].multihead_attn):
        assert (attn.embed_dim, attn.num_heads, attn.head_dim) == (8, 2, 4)
    assert count_params(model) < before / 2
    y = model(*inputs)
    assert y.shape == (2, 9, 3)
    y.sum().backward()
    model.eval()
    with torch.no_grad():
        assert model(*inputs).shape == (2, 9, 3)


def test_history_replays_heads_on_a_fresh_model():
    torch.manual_seed(0)
    model, x = Attn(), torch.randn(2, 7, 5)
    fresh = Attn()
    fresh.load_state_dict(model.state_dict())
    pruner = StructuredPruner(model, x, pruning_ratio=0.5, ignored_layers=[model.embed])
    pruner.prune()
    assert any(e["kind"] == "internal" for e in pruner.history[0]["layers"])
    cleanai.replay(fresh, pruner.history[0]["layers"])
    assert type(fresh.mha) is type(model.mha) is PrunedMultiheadAttention
    assert {k: v.shape for k, v in fresh.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def _vit(**kw):
    tv = pytest.importorskip("torchvision")
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    args = dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                num_classes=10)
    args.update(kw)
    return tv, VisionTransformer(**args)


def test_small_vision_transformer_prunes_at_half():
    _, model = _vit()
    x = torch.randn(2, 3, 32, 32)
    before = count_params(model)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    pruner.prune()
    assert model.hidden_dim == 16 and model.conv_proj.out_channels == 16  # read by its reshape
    assert model.class_token.shape == (1, 1, 16) and model.encoder.pos_embedding.shape[-1] == 16
    for layer in model.encoder.layers:
        assert layer.self_attention.num_heads == layer.num_heads == 2
    assert count_params(model) < before / 2
    y = model(x)
    assert y.shape == (2, 10)
    y.sum().backward()


@pytest.mark.zoo
def test_vit_b_16_prunes_at_half():
    tv, _ = _vit()
    torch.manual_seed(0)
    model = tv.models.vit_b_16(weights=None)
    x = torch.randn(1, 3, 224, 224)
    before = count_params(model)
    StructuredPruner(model, x, pruning_ratio=0.5).prune()
    assert model.hidden_dim == 384 and model.encoder.layers[0].self_attention.num_heads == 6
    assert count_params(model) < before / 2
    y = model(x)
    assert y.shape == (1, 1000)
    y.sum().backward()
