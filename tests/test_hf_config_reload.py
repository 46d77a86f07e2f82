"""Hugging Face decoders whose config derives sizes (``head_dim = hidden_size //
num_attention_heads`` unless set, a shared expert's own intermediate size): after pruning,
``save_pretrained`` -> ``from_pretrained`` rebuilds the same model, or a warning says why it
cannot. Tiny random configs, nothing downloaded."""
import copy
import warnings

import pytest
import torch

import cleanai

transformers = pytest.importorskip("transformers")

EXTRA = {
    "Qwen2Moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                     shared_expert_intermediate_size=32),
    "Gemma": dict(head_dim=8),
    "GraniteMoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "DeepseekV2": dict(moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                       first_k_dense_replace=1, qk_rope_head_dim=4, qk_nope_head_dim=4,
                       v_head_dim=8, kv_lora_rank=8, q_lora_rank=8, n_group=1, topk_group=1),
    # distinct widths, so that each split's sizes name one attribute each
    "DeepseekV3": dict(moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                       first_k_dense_replace=1, qk_rope_head_dim=6, qk_nope_head_dim=8,
                       v_head_dim=8, kv_lora_rank=20, q_lora_rank=16, n_group=1, topk_group=1,
                       num_key_value_heads=4),
    # a Mamba layer, an attention layer; the inner width is mamba_expand * hidden_size
    "Jamba": dict(mamba_d_state=8, mamba_expand=2, num_experts=1, attn_layer_period=2,
                  attn_layer_offset=1, expert_layer_period=2, use_mamba_kernels=False),
    "Mamba": dict(state_size=8, expand=2, time_step_rank=4),
}


def tiny(family):
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**{
        **dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=64, pad_token_id=0, bos_token_id=0,
               eos_token_id=0), **EXTRA.get(family, {})})
    cls = getattr(transformers, f"{family}ForCausalLM")
    return cls(config).eval(), torch.randint(1, 100, (2, 8))


def prune(model, x, ratio, kinds=None):
    """One step; the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cleanai.StructuredPruner(model, x, pruning_ratio=ratio, kinds=kinds).step()
    return [str(w.message) for w in caught]


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def reloaded(model, path):
    model.save_pretrained(path)
    return type(model).from_pretrained(path).eval()


# family, kinds, ratio: every case prunes what the family lets it, generates and reloads
RELOADS = [
    ("Qwen2", None, 0.5),
    ("Qwen2", ["hidden"], 0.25),  # head_dim written down: 24 // 4 would be 6
    ("Qwen2Moe", None, 0.5),  # routed experts, shared expert, heads and width (test below)
    ("Phi3", None, 0.5),  # qkv sliced at config-derived bounds: those follow (test below)
    ("Persimmon", None, 0.5),  # [..., heads, 3, head_dim] read by select; per-head norms
    ("GPTBigCode", None, 0.5),  # split by attributes the split's code names; one kv head
    ("Gemma", ["heads", "channels"], 0.5),
    ("Gemma", None, 0.5),  # embedding scale sqrt(hidden) follows: weights rescaled to match
    ("Gemma", ["hidden"], 0.25),
    ("Mistral", None, 0.5),
    ("StableLm", None, 0.5),  # hidden and heads halve together: head_dim stays 8
    ("Olmo", None, 0.5),  # its parameter-free LayerNorm stores the hidden size
    ("Olmo", ["hidden"], 0.25),
    ("GraniteMoe", None, 0.5),  # its MoE block views its output with a stored input_size
    ("DeepseekV2", None, 0.5),  # the low-rank query and key/value widths: q_lora_rank...
    ("DeepseekV3", None, 0.5),  # keys written into two slices of a fresh tensor (below)
    # the Mamba inner width is "channels" (joined by products): with the hidden size kept or
    # pruned alone, the expand factor follows
    ("Jamba", ["hidden"], 0.5),
    ("Jamba", ["channels"], 0.5),
    ("Mamba", ["channels"], 0.5),
    ("Mamba", None, 0.5),
]


@pytest.mark.parametrize("family,kinds,ratio", RELOADS,
                         ids=[f"{f}-{'+'.join(k or ['all'])}-{r}" for f, k, r in RELOADS])
def test_pruned_decoder_generates_and_reloads(family, kinds, ratio, tmp_path):
    model, x = tiny(family)
    n0 = sum(p.numel() for p in model.parameters())
    shape = logits(model, x).shape
    said = prune(model, x, ratio, kinds)
    assert not [w for w in said if "model.config" in w or "unevenly" in w], said
    assert sum(p.numel() for p in model.parameters()) < n0
    assert logits(model, x).shape == shape
    assert model.generate(x, max_new_tokens=3, do_sample=False).shape == (2, 11)
    again = reloaded(model, tmp_path)
    assert torch.allclose(logits(again, x), logits(model, x), atol=1e-5)


def test_qwen2_moe_config_follows_its_experts_and_shared_expert(tmp_path):
    model, x = tiny("Qwen2Moe")
    prune(model, x, 0.5)
    cfg = model.config
    # the shared expert and the routed experts have size fields of their own
    assert cfg.shared_expert_intermediate_size == 16 and cfg.moe_intermediate_size == 8
    assert cfg.hidden_size == 16 and cfg.num_attention_heads == 2
    mlp = model.model.layers[0].mlp
    assert mlp.experts.gate_up_proj.shape == (4, 16, 16) and mlp.experts.down_proj.shape == (4, 16, 8)
    assert mlp.shared_expert.up_proj.out_features == 16


def test_phi3_fused_qkv_heads_prune_where_the_slice_bounds_follow(tmp_path):
    """Phi-3 slices its fused qkv_proj at ``config.num_attention_heads * head_dim``: the q, k
    and v parts lose whole heads, the config follows, and the checked bounds with it."""
    model, x = tiny("Phi3")
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    assert not any(g.protected.any() for g in pruner.graph.groups if g.kind == "heads")
    said = prune_with(pruner)
    assert not [w for w in said if "no longer runs" in w or "model.config" in w], said
    attn = model.model.layers[0].self_attn
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1
    assert attn.qkv_proj.out_features == (2 + 2 * 1) * 8 and attn.o_proj.in_features == 16
    again = reloaded(model, tmp_path)
    assert torch.allclose(logits(again, x), logits(model, x), atol=1e-5)


def prune_with(pruner):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner.step()
    return [str(w.message) for w in caught]


def test_mla_heads_and_latent_ranks_prune(tmp_path):
    """DeepSeek-V3's multi-head latent attention: keys are the per-head part and a rotary part
    shared by all heads, copied into two slices of a new tensor. Heads, the latent ranks and
    the MoE widths prune; only the rotary channels stay."""
    model, x = tiny("DeepseekV3")
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    held = {tuple(g.reasons): g.size for g in pruner.graph.groups if g.protected.any()}
    # besides the logits and the rotary channels, only the router's scores (one per expert,
    # gathered by the top-k group choice) stay
    assert set(held) <= {("model output",), ("slice of the channel dim",),
                         ("gather along the channel dim",)}, held
    assert held.get(("gather along the channel dim",), 4) == 4
    pruner.step()
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.kv_lora_rank, cfg.q_lora_rank) == (2, 10, 8)
    attn = model.model.layers[0].self_attn
    assert attn.kv_a_proj_with_mqa.out_features == 10 + 6  # the rotary part keeps its 6
    assert attn.o_proj.in_features == 2 * 8
    again = reloaded(model, tmp_path)
    assert torch.allclose(logits(again, x), logits(model, x), atol=1e-5)


def test_llama4_bmm_experts_prune_and_reload(tmp_path):
    """Llama 4's text MoE keeps its experts as bare 3-D parameters run with ``bmm``: the hidden
    size and each expert's neurons prune (only the router's expert scores stay)."""
    torch.manual_seed(0)
    config = transformers.Llama4TextConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=16, intermediate_size_mlp=64,
        num_local_experts=4, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = transformers.Llama4ForCausalLM(config).eval()
    x = torch.randint(1, 100, (2, 8))
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    held = {r for g in pruner.graph.groups if g.protected.any() for r in g.reasons}
    assert held <= {"model output", "TopkBackward0 reorders channels"}, held
    said = prune(model, x, 0.5)
    assert not [w for w in said if "model.config" in w], said
    experts = model.model.layers[0].feed_forward.experts
    assert experts.gate_up_proj.shape == (4, 16, 16) and experts.down_proj.shape == (4, 8, 16)
    assert model.generate(x, max_new_tokens=3, do_sample=False).shape == (2, 11)
    again = reloaded(model, tmp_path)
    assert torch.allclose(logits(again, x), logits(model, x), atol=1e-5)


def test_olmo_parameter_free_norm_follows_the_hidden_size():
    model, x = tiny("Olmo")
    prune(model, x, 0.25, ["hidden"])
    assert model.config.hidden_size == 24
    assert model.model.layers[0].input_layernorm.normalized_shape == (24,)
    assert model.model.norm.normalized_shape == (24,)


def gemma(tied):
    torch.manual_seed(0)
    config = transformers.GemmaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, head_dim=8, pad_token_id=0,
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=tied)
    return transformers.GemmaForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_gemma_embedding_scale_follows_the_pruned_hidden_size(tied, tmp_path):
    # Gemma scales token embeddings by sqrt(config.hidden_size): the pruned model takes the
    # scale the smaller config derives, its embedding weight and (tied) final norm rescaled
    model, x = gemma(tied), torch.randint(1, 100, (2, 8))
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.25, kinds=["hidden"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner.step()
    assert not [str(w.message) for w in caught if "model.config" in str(w.message)]
    emb = model.model.embed_tokens
    assert model.config.hidden_size == 24 and emb.weight.shape == (100, 24)
    assert emb.scalar_embed_scale == 24 ** 0.5
    assert float(emb.embed_scale) == pytest.approx(24 ** 0.5)
    assert (model.lm_head.weight is emb.weight) == tied
    assert [e for e in pruner.history[-1]["layers"] if e["kind"] == "scale"] == [
        {"name": "model.embed_tokens", "kind": "scale", "attr": "scalar_embed_scale",
         "value": 24 ** 0.5}]
    again = reloaded(model, tmp_path / "hf")
    assert torch.allclose(logits(again, x), logits(model, x), atol=1e-5)
    cleanai.save_pruned(model, tmp_path / "cleanai")
    back = cleanai.load_pruned(gemma(tied), tmp_path / "cleanai")
    assert float(back.model.embed_tokens.embed_scale) == pytest.approx(24 ** 0.5)
    assert torch.allclose(logits(back, x), logits(model, x), atol=1e-5)


class OddNorm(torch.nn.Module):
    """An RMSNorm scaled by ``2 + weight``: a form CleanAI does not rescale."""

    def __init__(self, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(dim) * 0.1)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (2 + self.weight)


def test_gemma_scale_stays_with_a_warning_when_the_head_input_cannot_be_rescaled():
    model, x = tiny("Gemma")
    model.model.norm = OddNorm(32)
    said = prune(model, x, 0.25, ["hidden"])
    assert any("scalar_embed_scale" in w and "different outputs" in w for w in said), said
    emb = model.model.embed_tokens
    assert emb.scalar_embed_scale == 32 ** 0.5
    assert float(emb.embed_scale) == pytest.approx(32 ** 0.5)
    assert model.generate(x, max_new_tokens=3, do_sample=False).shape == (2, 11)


def test_stablelm_hidden_alone_warns_with_the_reason():
    # StableLM's attention derives head_dim = hidden_size // num_heads itself: a hidden size
    # pruned apart from the heads has no config that describes it
    model, x = tiny("StableLm")
    said = prune(model, x, 0.25, ["hidden"])
    hit = [w for w in said if "cannot describe the pruned shapes" in w]
    assert hit and "q_proj.weight" in hit[0] and "tried head_dim=8" in hit[0], said
    assert "head_dim" not in model.config.to_dict() or model.config.head_dim is None
    assert model.generate(x, max_new_tokens=3, do_sample=False).shape == (2, 11)


def parallel(family):
    """GPT-NeoX (use_parallel_residual) and GPT-J: attention and MLP read the same input."""
    torch.manual_seed(0)
    if family == "GPTNeoX":
        config = transformers.GPTNeoXConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, use_parallel_residual=True, bos_token_id=0, eos_token_id=0)
    else:
        config = transformers.GPTJConfig(vocab_size=100, n_embd=32, n_layer=2, n_head=4,
                                         rotary_dim=4, n_positions=64, bos_token_id=0,
                                         eos_token_id=0)
    cls = getattr(transformers, f"{family}ForCausalLM")
    return cls(config).eval(), torch.randint(1, 100, (2, 8))


@pytest.mark.parametrize("family", ["GPTNeoX", "GPTJ"])
def test_parallel_blocks_prune_and_reload(family, tmp_path):
    model, x = parallel(family)
    n0 = sum(p.numel() for p in model.parameters())
    said = prune(model, x, 0.5)  # heads and hidden halve together: head size 8 stays
    assert not [w for w in said if "model.config" in w], said
    assert sum(p.numel() for p in model.parameters()) < n0 / 2
    assert model.generate(x, max_new_tokens=3, do_sample=False).shape == (2, 11)
    assert torch.allclose(logits(reloaded(model, tmp_path), x), logits(model, x), atol=1e-5)


def test_neox_hidden_alone_warns_that_its_attention_reads_the_hidden_size():
    model, x = parallel("GPTNeoX")
    said = prune(model, x, 0.25, ["hidden"])
    assert any("query_key_value.weight is (96, 24) in the pruned model, but (72, 24)" in w
               for w in said), said


def falcon():
    """Falcon with multi-query attention and rotary positions (the config's defaults)."""
    torch.manual_seed(0)
    config = transformers.FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, bos_token_id=0, eos_token_id=0)
    return transformers.FalconForCausalLM(config).eval(), torch.randint(1, 100, (2, 8))


def test_falcon_multi_query_heads_stay_its_width_and_mlp_prune(tmp_path):
    # Falcon reads its fused projection as num_heads + 2 slots ([..., :-2, :] the queries,
    # [..., [-2], :] and [..., [-1], :] the key and value): the slots stay, as any fixed
    # positions do; the layers reading them stay connected, so the width prunes too
    model, x = falcon()
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    heads = [g for g in pruner.graph.groups if g.kind == "heads"]
    assert len(heads) == 2 and all(bool(g.protected.all()) for g in heads)
    n0 = sum(p.numel() for p in model.parameters())
    pruner.step()
    attn = model.transformer.h[0].self_attention
    assert attn.num_heads == 4 and attn.query_key_value.out_features == 6 * 8
    assert attn.dense.out_features == 16 and attn.dense.in_features == 32
    assert sum(p.numel() for p in model.parameters()) < 0.5 * n0
    assert model.generate(x, max_new_tokens=3, do_sample=False).shape == (2, 11)
    cleanai.save_pruned(model, tmp_path / "cleanai")
    back = cleanai.load_pruned(falcon()[0], tmp_path / "cleanai")
    assert torch.allclose(logits(back, x), logits(model, x), atol=1e-5)


def test_falcon_hidden_size_prunes_through_its_attention():
    # the attention output used to lose its channel ids at the fixed-slot slices, which left
    # the residual width (and every layer writing it) protected
    model, x = falcon()
    prune(model, x, 0.5, ["hidden"])
    assert model.transformer.h[0].self_attention.dense.out_features == 16
    assert model.config.hidden_size == 16
    assert model.generate(x, max_new_tokens=3, do_sample=False).shape == (2, 11)


def test_a_config_the_step_makes_unbuildable_is_reported():
    # Falcon requires hidden_size % num_heads == 0: 32 -> 23 leaves a config that no copy can
    # be built from; that used to pass without a word
    model, x = falcon()
    said = prune(model, x, 0.3, ["hidden"])
    assert any("a copy built from it fails" in w and "divisible" in w for w in said), said
    assert model.generate(x, max_new_tokens=3, do_sample=False).shape == (2, 11)


def test_per_stage_config_lists_follow_and_reload(tmp_path):
    """A CNN config holds its widths in lists (``hidden_sizes``): scaled like the layers, so
    the copy rebuilt from the config loads the pruned weights."""
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1],
                                    layer_type="bottleneck", num_labels=3)
    fresh = lambda: transformers.ResNetForImageClassification(copy.deepcopy(cfg)).eval()  # noqa: E731
    model, x = fresh(), torch.randn(2, 3, 32, 32)
    said = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cleanai.StructuredPruner(model, {"pixel_values": x}, pruning_ratio=0.5).step()
        said = [str(w.message) for w in caught]
    assert not [w for w in said if "model.config" in w], said
    assert model.config.hidden_sizes == [8, 16] and model.config.embedding_size == 4
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    cleanai.save_pruned(model, tmp_path / "history")
    replayed = cleanai.load_pruned(fresh, tmp_path / "history")  # the lists replayed too
    assert replayed.config.hidden_sizes == [8, 16]
    with torch.no_grad():
        out = model(pixel_values=x).logits
        torch.testing.assert_close(again(pixel_values=x).logits, out)
        torch.testing.assert_close(replayed(pixel_values=x).logits, out)


def test_a_config_that_derives_widths_it_cannot_hold_warns_when_nothing_was_scaled():
    """MobileNetV2's widths come from a depth multiplier: no field CleanAI can write describes
    the pruned model, and the step says so (it was silent when no scalar size changed)."""
    torch.manual_seed(0)
    cfg = transformers.MobileNetV2Config(image_size=32, depth_multiplier=0.35, num_labels=3)
    model, x = transformers.MobileNetV2ForImageClassification(cfg).eval(), torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="model.config of MobileNetV2ForImageClassification "
                                         "cannot describe the pruned shapes"):
        cleanai.StructuredPruner(model, {"pixel_values": x}, pruning_ratio=0.5).step()


def test_a_derived_scalar_buffer_that_cannot_follow_is_warned_about():
    # RecurrentGemma multiplies its embeddings by a 0-dim buffer, sqrt(hidden_size), made in
    # __init__ and never saved: a copy built from the smaller config computes another value
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        "recurrent_gemma", vocab_size=100, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, pad_token_id=0,
        bos_token_id=0, eos_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    x = {"input_ids": torch.randint(1, 100, (2, 8)), "use_cache": False}
    said = prune(model, x, 0.5, ["hidden"])
    hit = [w for w in said if "model.normalizer" in w]
    assert hit and "different outputs" in hit[0], said
    assert float(model.model.normalizer) == pytest.approx(32 ** 0.5, rel=1e-2)  # kept


def test_a_scale_the_config_class_derives_from_a_size_keeps_its_value(tmp_path):
    # MiniCPM3 divides its hidden states by config.logits_scaling = hidden_size /
    # dim_model_base before the head, read in its forward: dim_model_base halves with the
    # hidden size, so the pruned model computes what it did, and a reloaded copy too
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        "minicpm3", vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, qk_rope_head_dim=6, qk_nope_head_dim=8, v_head_dim=8,
        kv_lora_rank=20, q_lora_rank=16, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    x = torch.randint(1, 100, (2, 8))
    scaling = model.config.logits_scaling
    said = prune(model, x, 0.5)
    assert not [w for w in said if "model.config" in w], said
    assert model.config.hidden_size == 16 and model.config.dim_model_base == 128
    assert model.config.logits_scaling == scaling
    again = reloaded(model, tmp_path)
    assert torch.allclose(logits(again, x), logits(model, x), atol=1e-5)


class _ScaleConfig(transformers.PretrainedConfig):
    """A derived scale that two fields could each keep: CleanAI cannot tell which is read."""

    model_type = "cleanai_toy_scale"

    def __init__(self, intermediate_size=16, residual_multiplier=0.5, dim_model_base=4, **kw):
        self.intermediate_size = intermediate_size
        self.residual_multiplier, self.dim_model_base = residual_multiplier, dim_model_base
        super().__init__(**kw)

    @property
    def act_scaling(self):
        return self.intermediate_size / (self.residual_multiplier * self.dim_model_base)


class _ScaledMLP(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.up = torch.nn.Linear(8, config.intermediate_size)
        self.down = torch.nn.Linear(config.intermediate_size, 8)

    def forward(self, x):
        m = torch.relu(self.up(x)) / self.config.act_scaling
        return x + self.down(m) * self.config.residual_multiplier


def test_a_derived_scale_two_fields_could_keep_is_left_with_a_warning():
    torch.manual_seed(0)
    model = _ScaledMLP(_ScaleConfig())
    said = prune(model, torch.randn(3, 8), 0.5, ["channels"])
    assert any("act_scaling" in w and "cannot tell which" in w for w in said), said
    assert (model.config.residual_multiplier, model.config.dim_model_base) == (0.5, 4)


class _GainConfig(transformers.PretrainedConfig):
    model_type = "cleanai_toy_gain"

    def __init__(self, intermediate_size=16, **kw):
        self.intermediate_size = intermediate_size
        super().__init__(**kw)


class _GainMLP(torch.nn.Module):
    """A per-channel gain made from the config in ``__init__`` and never saved."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.up = torch.nn.Linear(8, config.intermediate_size)
        self.down = torch.nn.Linear(config.intermediate_size, 8)
        self.register_buffer("gain", torch.linspace(0.5, 1.5, config.intermediate_size),
                             persistent=False)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)) * self.gain)


def test_a_sliced_buffer_the_model_does_not_save_is_warned_about():
    torch.manual_seed(0)
    model = _GainMLP(_GainConfig())
    said = prune(model, torch.randn(3, 8), 0.5, ["channels"])
    assert model.gain.shape == (8,) and model.config.intermediate_size == 8
    assert any("gain, a buffer it does not save" in w for w in said), said
