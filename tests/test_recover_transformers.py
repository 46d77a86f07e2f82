"""Recovery on Hugging Face models: GPT-2's transposed Conv1D layers are compensated, and block
reconstruction of a causal LM replays its layers without growing their key/value cache."""
import copy
import warnings

import pytest
import torch

import cleanai

transformers = pytest.importorskip("transformers")


def _pair(cls, cfg):
    torch.manual_seed(0)
    model = cls(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (4, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # one padded sequence
    batch = {"input_ids": ids, "attention_mask": mask}
    dense = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = cleanai.StructuredPruner(model, batch, pruning_ratio=0.25, compensate="lstsq",
                                          kinds=["heads", "channels"])
        pruner.calibrate([batch] * 2)
        pruner.step()
    return model, dense, batch, pruner


def test_gpt2_conv1d_consumers_are_compensated():
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4)
    model, dense, batch, pruner = _pair(transformers.GPT2LMHeadModel, cfg)
    report = pruner.compensation[-1]
    assert {"transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_proj"} <= set(report.compensated)
    assert not report.skipped


def test_block_reconstruction_of_a_causal_lm_with_a_cache():
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64)
    model, dense, batch, _ = _pair(transformers.LlamaForCausalLM, cfg)
    report = cleanai.recover.reconstruct(model, dense, [batch, batch], granularity="block",
                                         steps=3, progress=False)
    assert [u["name"] for u in report.units if u["kind"] == "block"] == \
        ["model.layers.0", "model.layers.1"]
    assert all(u["error_after"] <= u["error_before"] for u in report.units)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
