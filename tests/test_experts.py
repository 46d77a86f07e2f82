"""Mixture-of-experts layers whose experts are 3-D tensors (Hugging Face's experts modules):
each expert keeps its own neurons, every expert as many; the router and the experts follow a
pruned hidden size; the model generates and reloads. Tiny random configs, nothing downloaded."""
import copy
import warnings

import pytest
import torch
from torch import nn

import cleanai
from cleanai.core.layers_experts import gate_layout
from cleanai.importance import WeightActivationImportance
from cleanai.pruner.apply import layer_keeps
from equivalence import zero_consumers

transformers = pytest.importorskip("transformers")

FAMILIES = {  # gate/up halves; halves with a shared expert; alternating rows, biases, transposed
    "Mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "Qwen2Moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                     shared_expert_intermediate_size=32),
    "GptOss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                   layer_types=["full_attention"] * 2),
}


def tiny(family):
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, pad_token_id=0, bos_token_id=0,
        eos_token_id=0, **FAMILIES[family])
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name and "bias" in name:
                p.normal_()  # zero biases would hide a misplaced bias row
    return model, torch.randint(1, 100, (4, 16))


def experts(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Experts")]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_expert_keeps_its_own_neurons_exactly(family):
    """Pruning only the experts' neurons gives the output of the dense model with the removed
    neurons' down-projection columns zeroed: the right gate, up and bias rows stayed."""
    model, x = tiny(family)
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5, kinds=["channels"],
                                      importance=WeightActivationImportance())
    pruner.calibrate([x, torch.randint(1, 100, (4, 16))])
    plan = pruner.plan()
    reference = copy.deepcopy(model)
    zero_consumers(reference, plan)
    inter = experts(model)[0].down_proj.shape[-1 if not experts(model)[0].is_transposed else 1]
    kept = [keep for (name, kind, _), keep in layer_keeps(plan.graph, plan.removals).items()
            if kind == "internal" and name.endswith("layers.0.mlp.experts")]
    pruner.apply(plan)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference(x).logits, atol=1e-5, rtol=1e-4)
    for m in experts(model):
        assert m.down_proj.shape[-1 if not m.is_transposed else 1] == inter // 2
    # the experts chose different neurons (one tensor, not one choice for all)
    assert len(kept) == 4 and len({tuple(k.tolist()) for k in kept}) > 1


@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_decoder_prunes_its_width_generates_and_reloads(family, tmp_path):
    model, x = tiny(family)
    n0 = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
        held = [g for g in pruner.graph.groups if g.protected.any()]
        # only the logits and the router's scores, one per expert (its bare weight's rows,
        # ranked by topk), are kept
        assert all(set(g.reasons) in ({"model output"}, {"TopkBackward0 reorders channels"})
                   for g in held), [g.reasons for g in held]
        assert all(g.size == model.config.vocab_size or g.size == 4 for g in held)
        pruner.step()
    assert not [str(w.message) for w in caught if "CleanAI" in str(w.message)
                or "config" in str(w.message)]
    assert model.config.hidden_size == 16
    assert sum(p.numel() for p in model.parameters()) < 0.4 * n0
    with torch.no_grad():
        out = model(x).logits
    assert out.shape == (4, 16, 100) and torch.isfinite(out).all()
    assert model.generate(x[:2, :8], max_new_tokens=3, do_sample=False).shape == (2, 11)
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, out)


class _Gate(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def _apply_gate(self, x):
        i = x.shape[-1] // 2
        if self.how == "chunk":
            gate, up = x.chunk(2, dim=-1)
        elif self.how == "interleaved":
            gate, up = x[..., ::2], x[..., 1::2]
        else:  # each neuron reads its neighbour's gate: no pairing CleanAI can keep
            gate, up = x[..., :i].roll(1, -1), x[..., i:]
        return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize("how,expected", [("chunk", "chunk"), ("interleaved", "interleaved"),
                                          ("rolled", None)])
def test_gate_layout_is_found_by_trying_never_assumed(how, expected):
    gate = type(f"Gate_{how}", (_Gate,), {})(how)
    assert gate_layout(gate, 12) == expected


def test_widths_stay_aligned_for_the_grouped_matmul():
    """``grouped_mm`` needs 16-byte strides: at 0.3 the hidden size (32) and each expert's
    neurons (64) keep multiples of 8 (half precision's 16 bytes) instead of 22 and 44 (88
    and 176 bytes in float32, which it refuses)."""
    model, x = tiny("Mixtral")
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.3)
    assert all(g.multiple == 8 for g in pruner.graph.groups
               if any(m.name.endswith("mlp.experts") for m in g.members))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner.step()
    m = experts(model)[0]
    assert model.config.hidden_size == 24 and m.down_proj.shape == (4, 24, 48)
    with torch.no_grad():
        assert model(x).logits.shape == (4, 16, 100)


class _Cfg:
    _experts_implementation = "eager"


def _normed_experts():
    """An experts class that normalises each expert's output (``has_post_expert_norm``, as
    MuseSpark's), in a tiny model with a router."""
    from transformers.integrations.moe import use_experts_implementation

    class Experts(nn.Module):
        def __init__(self, config, e=4, h=32, i=16):
            super().__init__()
            self.num_experts = e
            self.gate_up_proj = nn.Parameter(torch.randn(e, 2 * i, h) / 5)
            self.down_proj = nn.Parameter(torch.randn(e, h, i) / 5)
            self.post_expert_norm, self.act_fn = nn.RMSNorm(h), torch.nn.functional.silu

        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)
            for e in range(self.num_experts):
                tok, slot = torch.where(top_k_index == e)
                h = self._apply_gate(torch.nn.functional.linear(hidden_states[tok],
                                                                self.gate_up_proj[e]))
                d = self.post_expert_norm(torch.nn.functional.linear(h, self.down_proj[e]))
                out.index_add_(0, tok, d * top_k_weights[tok, slot, None])
            return out

    Experts.__module__ = "transformers.models.tiny.modeling_tiny"
    Experts = use_experts_implementation(Experts, has_post_expert_norm=True)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.router = nn.Embedding(50, 32), nn.Linear(32, 4, bias=False)
            self.experts, self.head = Experts(_Cfg()), nn.Linear(32, 50)

        def forward(self, ids):
            h = self.emb(ids)
            w, idx = torch.topk(self.router(h).softmax(-1), 2, dim=-1)
            flat = h.reshape(-1, h.shape[-1])
            return self.head(h + self.experts(flat, idx.reshape(-1, 2), w.reshape(-1, 2))
                             .reshape(h.shape))

    return Model().eval()


def test_a_norm_after_each_expert_follows_the_hidden_size():
    torch.manual_seed(0)
    model, x = _normed_experts(), torch.randint(0, 50, (4, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cleanai.StructuredPruner(model, x, pruning_ratio=0.5).step()
    assert model.experts.post_expert_norm.weight.shape == (16,)
    assert model.experts.down_proj.shape == (4, 16, 8)
    assert model(x).shape == (4, 8, 50)
