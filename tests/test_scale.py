"""Depth: a LLaMA-style decoder (tests/llama_like.py, plain PyTorch) builds its graph and prunes
at 64 layers, the graph grows linearly with depth, and no depth needs a higher recursion limit.
Timings per layer are in benchmarks/scale_depth.py (no timed assertions here)."""
import sys
import warnings

import pytest
import torch

from cleanai import DependencyGraph, StructuredPruner

from llama_like import LlamaLike

IDS = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(0))


def sizes(depth, **kw):
    """(groups, members, traced layers, junction-level edges) of the graph at ``depth``."""
    torch.manual_seed(0)
    model = LlamaLike(layers=depth, **kw).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = DependencyGraph(model, IDS)
    raw_edges, junctions = g._edges
    return (len(g.groups), sum(len(gr.members) for gr in g.groups), len(g.modules),
            len(raw_edges) + sum(len(j) for j in junctions))


def test_graph_grows_linearly_with_depth():
    s4, s16, s64 = sizes(4), sizes(16), sizes(64)
    for a, b, c in zip(s4, s16, s64):
        assert c - b == 4 * (b - a), (s4, s16, s64)  # exactly a * depth + b


def _prune(depth, **kw):
    torch.manual_seed(0)
    model = LlamaLike(layers=depth, **kw).eval()
    limit = sys.getrecursionlimit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = StructuredPruner(model, IDS, pruning_ratio=0.5)
        pruner.prune()
    assert sys.getrecursionlimit() == limit
    return model, pruner


def test_llama_like_with_64_layers_prunes():
    model, pruner = _prune(64)
    assert model(IDS).shape == (1, 8, 50)
    # every SwiGLU hidden layer loses half; every attention block loses half of its key/value
    # groups with their query heads (4 q / 2 kv -> 2 q / 1 kv), and its head counts follow
    assert all(layer.mlp.gate_proj.out_features == layer.mlp.up_proj.out_features ==
               layer.mlp.down_proj.in_features == 16 for layer in model.layers)
    assert all((a.heads, a.kv_heads, a.head_dim, a.q_proj.out_features, a.k_proj.out_features)
               == (2, 1, 4, 8, 4) for a in (layer.self_attn for layer in model.layers))
    model(IDS).sum().backward()


@pytest.mark.slow
@pytest.mark.parametrize("depth", [256, 512])
def test_very_deep_llama_like_needs_no_recursion(depth):
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(250)  # far below the depth: any recursion over layers would fail
    try:
        model, _ = _prune(depth, dim=8, heads=2, kv_heads=1, hidden=8)
    finally:
        sys.setrecursionlimit(limit)
    assert model(IDS).shape == (1, 8, 50)
    assert model.layers[-1].mlp.gate_proj.out_features == 4


@pytest.mark.parametrize("depth", [2, pytest.param(64, marks=pytest.mark.slow)])
def test_transformers_llama(depth):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=depth, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        StructuredPruner(model, IDS, pruning_ratio=0.5,
                         forward_fn=lambda m, x: m(x).logits).prune()
    assert model(IDS).logits.shape == (1, 8, 50)
    assert all(layer.mlp.gate_proj.out_features == 16 for layer in model.model.layers)
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1
