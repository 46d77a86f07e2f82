"""Layers that hold the very same weight (tied embeddings), or whose weight runs through a
functional call instead of their forward: their channels are the weight's channels."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cleanai import DependencyGraph, StructuredPruner
from equivalence import check_equivalence


def _no_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    messages = [str(w.message) for w in caught if "CleanAI" in str(w.message) or "did not run" in str(w.message)]
    assert not messages, messages
    return out


class FunctionalEmbedding(nn.Module):
    """An embedding looked up with ``F.embedding`` (its forward never runs)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mlp, self.head = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, ids):
        h = F.embedding(ids, self.emb.weight)
        return self.head(F.relu(self.mlp(h)))


def test_embedding_looked_up_functionally_is_pruned():
    torch.manual_seed(0)
    model, ids = FunctionalEmbedding(), torch.randint(0, 20, (2, 5))
    pruner = _no_warnings(lambda: StructuredPruner(model, ids, pruning_ratio=0.5))
    group = next(g for g in pruner.graph.groups if any(m.name == "emb" for m in g.members))
    assert {(m.name, m.kind) for m in group.members} == {("emb", "out"), ("mlp", "in")}
    assert not group.protected.any()
    pruner.step()
    assert model.emb.weight.shape == (20, 4) and model.emb.embedding_dim == 4
    assert model.mlp.in_features == 4 and model(ids).shape == (2, 5, 3)


def _t5(cls):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                                pad_token_id=0, eos_token_id=1)
    return getattr(transformers, cls)(cfg).eval()


def test_t5_encoder_shared_embedding_runs_through_embed_tokens():
    model = _t5("T5EncoderModel")
    assert model.shared is not model.encoder.embed_tokens
    ids = torch.randint(0, 50, (2, 7))
    graph = _no_warnings(lambda: DependencyGraph(model, ids))
    hidden = next(g for g in graph.groups if any(m.name == "encoder.embed_tokens" for m in g.members))
    assert {"shared", "encoder.embed_tokens"} <= {m.name for m in hidden.members}
    pruner = StructuredPruner(model, ids, pruning_ratio=0.5)
    pruner.step()
    assert model(ids).last_hidden_state.shape == (2, 7, 16)


def test_t5_tied_embeddings_prune_as_one_weight_and_generate():
    model = _t5("T5ForConditionalGeneration")
    x = {"input_ids": torch.randint(0, 50, (2, 7)), "decoder_input_ids": torch.randint(0, 50, (2, 5))}
    n0 = sum(p.numel() for p in model.parameters())
    pruner = _no_warnings(lambda: StructuredPruner(model, x, pruning_ratio=0.5,
                                                   forward_fn=lambda m, x: m(**x).logits))
    # encoder and decoder read one embedding weight: their hidden sizes are one group
    hidden = [g for g in pruner.graph.groups if any(m.name.endswith("embed_tokens") for m in g.members)]
    assert len(hidden) == 1 and not hidden[0].protected.any()
    _no_warnings(pruner.step)
    assert model.shared.weight is model.encoder.embed_tokens.weight is model.decoder.embed_tokens.weight
    assert model.shared.weight is model.lm_head.weight and model.shared.weight.shape == (50, 8)
    for emb in (model.shared, model.encoder.embed_tokens, model.decoder.embed_tokens):
        assert emb.embedding_dim == 8
    assert model.config.d_model == 8
    assert sum(p.numel() for p in model.parameters()) < n0
    assert model(**x).logits.shape == (2, 5, 50)
    assert model.generate(x["input_ids"][:1], max_new_tokens=4, do_sample=False).shape == (1, 5)


class ScaledLinear(nn.Linear):
    """A known layer's subclass with a forward of its own: followed op by op."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * 2.0


class WithSubclass(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.s, self.b = nn.Linear(6, 8), ScaledLinear(8, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.b(F.relu(self.s(F.relu(self.a(x)))))


def test_subclass_with_its_own_forward_prunes_both_sides_exactly():
    torch.manual_seed(0)
    model, x = WithSubclass(), torch.randn(4, 6)
    pruner = _no_warnings(lambda: StructuredPruner(model, x, pruning_ratio=0.5))
    assert all(not g.protected.any() for g in pruner.graph.groups if g.size != 3)
    check_equivalence(model, pruner, x)
    assert (model.s.in_features, model.s.out_features) == (4, 5)
    assert model.s.weight.shape == (5, 4) and model.s.bias.shape == (5,)


@pytest.mark.parametrize("tied", [True, False])
def test_gemma3_hidden_size_prunes_and_generates(tied):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Gemma3ForCausalLM"):
        pytest.skip("transformers without Gemma3")
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=64, bos_token_id=0,
        eos_token_id=1, pad_token_id=0, sliding_window=4, tie_word_embeddings=tied,
        layer_types=["sliding_attention", "full_attention"])
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    x = {"input_ids": torch.randint(0, 100, (2, 8))}
    pruner = _no_warnings(lambda: StructuredPruner(model, x, pruning_ratio=0.5))
    hidden = [g for g in pruner.graph.groups if g.kind == "hidden"]
    # the scaled embedding (a subclass of nn.Embedding) and the RMSNorms' ``1 + weight``
    assert len(hidden) == 1 and not hidden[0].protected.any(), [g.reasons for g in hidden]
    assert any(m.name == "model.embed_tokens" for m in hidden[0].members)
    _no_warnings(pruner.step)
    emb = model.model.embed_tokens
    assert emb.weight.shape == (100, 16) and emb.embedding_dim == 16
    assert model.config.hidden_size == 16 and model.model.norm.weight.shape == (16,)
    assert (model.lm_head.weight is emb.weight) == tied
    assert model(**x).logits.shape == (2, 8, 100)
    assert model.generate(x["input_ids"][:1], max_new_tokens=5, do_sample=False).shape == (1, 13)


class RunningMaxConv(nn.Conv2d):
    """A weight through an op the tracer does not follow (``cummax``), then ``F.conv2d``."""

    def forward(self, x):
        return F.conv2d(x, self.weight.cummax(dim=0).values, self.bias, self.stride, self.padding)


class StandardizedConv(nn.Conv2d):
    """Weight standardization, then ``F.conv2d`` on the result."""

    def forward(self, x):
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_subclass_weight_through_a_conv_prunes_like_the_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), StandardizedConv(8, 16, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    x = torch.randn(2, 3, 6, 6)
    pruner = _no_warnings(lambda: StructuredPruner(model, x, pruning_ratio=0.5))
    assert not any(g.protected.any() for g in pruner.graph.groups
                   if set(g.reasons) != {"model output"})
    _no_warnings(pruner.step)
    assert model[2].weight.shape == (8, 4, 3, 3) and model[2].bias.shape == (8,)
    assert model(x).shape == (2, 4, 6, 6)


def test_subclass_weight_through_an_unknown_op_keeps_its_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), RunningMaxConv(8, 16, 3, padding=1, bias=False),
                          nn.ReLU(), nn.Conv2d(16, 4, 1))
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match="CummaxBackward0"):
        pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    conv = next(g for g in pruner.graph.groups if any(m.name == "2" and m.kind == "out" for m in g.members))
    assert conv.protected.all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.step()
    assert model[2].weight.shape[0] == 16 and model(x).shape == (2, 4, 6, 6)
