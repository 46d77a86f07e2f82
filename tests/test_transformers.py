"""Attention in traced transformers: Hugging Face (tiny random configs, nothing downloaded),
timm and torchvision vision transformers."""
import copy
import warnings

import pytest
import torch

import torch.nn.functional as F
from torch import nn

import cleanai
from cleanai import PruningPlan


def tiny(name):
    """A small random model and its inputs (batch 2)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = {"input_ids": torch.randint(0, 100, (2, 8))}
    if name == "bert":
        cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64)
        return transformers.BertModel(cfg).eval(), ids
    if name == "vit":
        cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64)
        return transformers.ViTModel(cfg).eval(), {"pixel_values": torch.randn(2, 3, 32, 32)}
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval(), ids
    if name == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=64, bos_token_id=0, eos_token_id=0)
        return transformers.LlamaForCausalLM(cfg).eval(), ids
    if name == "qwen3":  # GQA plus an RMSNorm over head_dim on queries and keys
        cfg = transformers.Qwen3Config(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=8, intermediate_size=64, bos_token_id=0,
                                       eos_token_id=0)
        return transformers.Qwen3ForCausalLM(cfg).eval(), ids
    raise KeyError(name)


def out(model, x):
    with torch.no_grad():
        o = model(**x)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def params(model):
    return sum(p.numel() for p in model.parameters())


def prune(model, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # config warnings are checked where they matter
        pruner = cleanai.StructuredPruner(model, x, **{"pruning_ratio": 0.5, **kw})
        pruner.step()
    return pruner


@pytest.mark.parametrize("name", ["bert", "vit", "gpt2", "llama", "qwen3"])
def test_prune_heads_and_mlp_keeps_output_shape(name):
    model, x = tiny(name)
    shape, n0 = out(model, x).shape, params(model)
    pruner = prune(model, x)
    assert out(model, x).shape == shape
    assert params(model) < n0
    assert {"heads", "channels", "hidden"} <= {g.kind for g in pruner.graph.groups}
    assert model.config.num_attention_heads == 2
    # every module that stores a head count agrees with the config
    for m in model.modules():
        for attr in ("num_heads", "num_attention_heads"):
            if isinstance(m.__dict__.get(attr), int):
                assert m.__dict__[attr] == 2, f"{type(m).__name__}.{attr}"
    # and every q/k projection has the config's heads of the unchanged head size
    cfg = model.config
    kv = getattr(cfg, "num_key_value_heads", None)
    for m in model.modules():
        if hasattr(m, "q_proj") and hasattr(m, "k_proj") and kv is not None:
            head_dim = getattr(cfg, "head_dim", None) or 8  # tiny configs: 32 wide, 4 heads
            assert m.q_proj.out_features == cfg.num_attention_heads * head_dim
            assert m.k_proj.out_features == kv * head_dim
            assert m.num_key_value_groups == cfg.num_attention_heads // kv
    model.zero_grad()
    o = model(**x)
    (o.logits if hasattr(o, "logits") else o.last_hidden_state).sum().backward()
    assert all(p.grad is None or p.grad.shape == p.shape for p in model.parameters())


def test_bert_attributes_follow_head_pruning():
    model, x = tiny("bert")
    prune(model, x, kinds=["heads"])
    att = model.encoder.layer[0].attention.self
    assert att.num_attention_heads == 2 and att.attention_head_size == 8
    assert att.all_head_size == 16 == att.query.out_features == att.value.out_features
    assert model.encoder.layer[0].attention.output.dense.in_features == 16
    assert model.encoder.layer[0].intermediate.dense.out_features == 64  # MLP untouched


def test_kinds_switch_mlp_only():
    model, x = tiny("bert")
    prune(model, x, kinds=["channels"])
    assert model.encoder.layer[0].attention.self.num_attention_heads == 4
    assert model.encoder.layer[0].intermediate.dense.out_features == 32
    assert model.config.intermediate_size == 32


def test_ignored_layers_keep_their_heads():
    model, x = tiny("bert")
    with pytest.warns(UserWarning, match="unevenly across layers"):
        cleanai.StructuredPruner(model, x, pruning_ratio=0.5, kinds=["heads"],
                                 ignored_layers=[model.encoder.layer[0].attention]).step()
    assert model.encoder.layer[0].attention.self.num_attention_heads == 4
    assert model.encoder.layer[1].attention.self.num_attention_heads == 2
    assert model.config.num_attention_heads == 4  # the config cannot say both


def test_unknown_kind_is_rejected():
    model, x = tiny("bert")
    with pytest.raises(ValueError, match="kinds must be among"):
        cleanai.StructuredPruner(model, x, kinds=["mlp"])


def test_head_dims_mode_keeps_head_count():
    model, x = tiny("vit")
    shape = out(model, x).shape
    pruner = prune(model, x, attention="head_dims")
    assert {g.kind for g in pruner.graph.groups} >= {"head_dims"}
    att = model.layers[0].attention
    assert att.num_attention_heads == 4 and att.head_dim == 4
    assert att.q_proj.out_features == 16 and out(model, x).shape == shape


def test_gpt2_head_dims_update_split_size():
    model, x = tiny("gpt2")
    with pytest.warns(UserWarning, match="attention scale"):
        cleanai.StructuredPruner(model, x, pruning_ratio=0.5, attention="head_dims",
                                 kinds=["head_dims"]).step()
    att = model.transformer.h[0].attn
    assert (att.num_heads, att.head_dim, att.split_size) == (4, 4, 16)
    assert att.c_attn.weight.shape == (32, 48)  # Conv1D weight is [in, out]
    assert model.generate(x["input_ids"][:1], max_new_tokens=5, do_sample=False).shape == (1, 13)


class FunctionalLinear(nn.Module):
    """Uses its layer's weights through F.linear, as torchvision's swin attention does."""

    def __init__(self):
        super().__init__()
        self.inp, self.lin, self.out = nn.Linear(3, 8), nn.Linear(8, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = F.linear(self.inp(x).relu(), self.lin.weight, self.lin.bias)
        return self.out(h.relu())


def test_layer_used_through_f_linear_is_pruned_like_a_called_one():
    torch.manual_seed(0)
    model, x = FunctionalLinear().eval(), torch.randn(4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "did not run" warning, no unknown op
        pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    lin_out = pruner.graph.group_of("lin")
    assert any(m.name == "out" and m.kind == "in" for g in lin_out for m in g.members)
    pruner.step()
    assert model.lin.weight.shape == (3, 4) and model.out.in_features == 3
    assert model(x).shape == (4, 2)


def test_gqa_prunes_key_value_groups_with_their_query_heads():
    model, x = tiny("llama")
    pruner = prune(model, x, kinds=["heads"])
    heads = [g for g in pruner.graph.groups if g.kind == "heads"]
    assert len(heads) == 2 and all(g.size == 1 for g in heads)  # 2 KV groups -> 1
    att = model.model.layers[0].self_attn
    assert (att.q_proj.out_features, att.k_proj.out_features) == (16, 8)
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1
    assert att.num_key_value_groups == 2


def test_rotary_head_dims_are_protected_with_a_reason():
    model, x = tiny("llama")
    graph = cleanai.DependencyGraph(model, x, attention="head_dims")
    qk = [g for g in graph.groups if any(m.name.endswith("q_proj") and m.kind == "out"
                                         for m in g.members)]
    assert qk and all(g.protected.all() for g in qk)
    assert any("rotary" in r for g in qk for r in g.reasons)
    # values share head_dim with queries and keys: their dims stay too, with the reason
    vo = [g for g in graph.groups if g.kind == "head_dims" and g not in qk]
    assert vo and all(g.protected.all() and "head_dim it shares" in next(iter(g.reasons))
                      for g in vo)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_causal_lm_generates_after_pruning(name):
    model, x = tiny(name)
    prune(model, x)
    tokens = model.generate(x["input_ids"][:1], max_new_tokens=5, do_sample=False)
    assert tokens.shape == (1, 13)


def test_gpt2_tied_embedding_is_sliced_once():
    model, x = tiny("gpt2")
    prune(model, x, kinds=["hidden"])
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.shape == (100, 16) and model.config.n_embd == 16
    assert model.transformer.h[0].attn.c_attn.weight.shape == (16, 96)


@pytest.mark.parametrize("name,kinds", [("llama", None), ("gpt2", None), ("qwen3", None),
                                        ("bert", ["channels"]), ("vit", ["channels"])])
def test_save_pretrained_round_trip(tmp_path, name, kinds):
    model, x = tiny(name)
    prune(model, x, kinds=kinds)
    expected = out(model, x)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(out(loaded, x), expected)


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_heads_the_config_cannot_describe_round_trip_with_save_pruned(tmp_path, name):
    # BERT's config derives the head size from hidden_size / num_attention_heads, so pruned
    # heads cannot go through save_pretrained (ViT's reads config.head_dim, which the pruner
    # writes); the library's own save/load replays them either way
    model, x = tiny(name)
    config = copy.deepcopy(model.config)
    prune(model, x, kinds=["heads", "channels"])
    cleanai.save_pruned(model, tmp_path)
    build = lambda: type(model)(copy.deepcopy(config)).eval()  # noqa: E731
    loaded = cleanai.load_pruned(build, tmp_path)
    assert loaded.config.num_attention_heads == 2
    assert torch.equal(out(loaded, x), out(model, x))


def test_config_that_cannot_describe_the_model_warns():
    model, x = tiny("bert")  # BERT derives head size from hidden_size / num_attention_heads
    with pytest.warns(UserWarning, match="config .*cannot describe"):
        cleanai.StructuredPruner(model, x, pruning_ratio=0.5, kinds=["heads"]).step()


def test_history_replay_restores_attributes():
    model, x = tiny("gpt2")
    fresh = copy.deepcopy(model)
    pruner = prune(model, x)
    cleanai.replay(fresh, pruner.history[0]["layers"])
    assert fresh.transformer.h[0].attn.split_size == model.transformer.h[0].attn.split_size
    assert fresh.config.n_head == model.config.n_head == 2
    torch.testing.assert_close(out(fresh, x), out(model, x))


def test_removing_heads_that_write_nothing_is_exact():
    model, x = tiny("llama")
    pruner = cleanai.StructuredPruner(model, x, kinds=["heads"])
    group = next(g for g in pruner.graph.groups if g.kind == "heads")
    o_proj = next(m for m in group.members if m.name.endswith("o_proj") and m.kind == "in")
    cols = o_proj.positions[o_proj.channels == 1]  # every query column of KV group 1
    with torch.no_grad():
        model.get_submodule(o_proj.name).weight[:, cols] = 0
    before = out(model, x)
    with pytest.warns(UserWarning, match="unevenly across layers"):
        pruner.apply(PruningPlan(pruner.graph, {group.id: [1]}))
    assert model.get_submodule(o_proj.name).in_features == 16
    torch.testing.assert_close(out(model, x), before)


# --- timm and torchvision ------------------------------------------------------------------

def _vision_step(model, x):
    model.eval()
    with torch.no_grad():
        shape = model(x).shape
    n0 = params(model)
    prune(model, x)
    y = model(x)
    y.sum().backward()
    assert y.shape == shape and params(model) < n0


def test_timm_vit_small_input():  # fused qkv, reshape into [3, heads, head_dim], unbind
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    _vision_step(model, torch.randn(1, 3, 32, 32))
    assert model.blocks[0].attn.num_heads == 2


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["timm:vit_tiny_patch16_224", "timm:deit_tiny_patch16_224",
                                  "timm:convnext_atto", "tv:swin_t", "tv:maxvit_t"])
def test_vision_transformers_prune(name):
    lib, arch = name.split(":")
    torch.manual_seed(0)
    if lib == "timm":
        model = pytest.importorskip("timm").create_model(arch, pretrained=False)
    else:
        model = getattr(pytest.importorskip("torchvision").models, arch)(weights=None)
    size = 64 if arch == "swin_t" else 224
    _vision_step(model, torch.randn(1, 3, size, size))


@pytest.mark.parametrize("family", ["Qwen2", "Phi3", "Mistral"])
def test_configs_that_derive_head_dim_reload_after_pruning_the_hidden_size(family, tmp_path):
    """Qwen2 and Phi-3 derive head_dim from hidden_size // num_attention_heads when the config
    does not set it: after the hidden size is pruned, the config must say head_dim."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=100, pad_token_id=0)
    cls = getattr(transformers, f"{family}ForCausalLM")
    model = cls(config).eval()
    x = torch.randint(1, 100, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "config cannot describe" warning
        cleanai.StructuredPruner(model, x, pruning_ratio=0.25, kinds=["hidden"]).step()
    assert model.config.hidden_size == 48 and model.config.head_dim == 16
    assert model.generate(x, max_new_tokens=3, do_sample=False).shape == (2, 11)
    model.save_pretrained(tmp_path)
    again = cls.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)


def test_a_derived_size_the_modeling_code_ignores_is_not_written():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.StableLmConfig(hidden_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=128, vocab_size=100)
    model = transformers.StableLmForCausalLM(config).eval()
    with pytest.warns(UserWarning, match="cannot describe the pruned shapes"):
        cleanai.StructuredPruner(model, torch.randint(0, 100, (2, 8)), pruning_ratio=0.25,
                                 kinds=["hidden"]).step()
    assert "head_dim" not in model.config.to_dict() or model.config.head_dim is None


def test_vit_heads_reload_through_save_pretrained(tmp_path):
    model, x = tiny("vit")
    prune(model, x, kinds=["heads", "channels"])
    assert model.config.head_dim == 8  # written down: the config derived it before
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(out(loaded, x), out(model, x))
