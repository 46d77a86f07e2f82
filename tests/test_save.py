"""Saving and loading pruned models: exact round trips, and tampered files rejected cleanly."""
import copy
import json

import pytest
import torch
from torch import nn

import cleanai
from cleanai import StructuredPruner, load_pruned, save_pruned
from cleanai.utils import LoadError, read_pruned_info

tv = pytest.importorskip("torchvision")


def _prune_and_perturb(model, x, **kw):
    pruner = StructuredPruner(model, x, **kw)
    pruner.prune()
    with torch.no_grad():  # weights that differ from a fresh model's, BN statistics included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
    return pruner


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, state, modules):
    assert list(model.modules()) == modules
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert "_cleanai_history" not in model.__dict__


def test_resnet18_round_trip_exact(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = tv.models.resnet18().eval()
    pruner = _prune_and_perturb(model, x, pruning_ratio=0.35)
    save_pruned(pruner, tmp_path, metadata={"model": "torchvision:resnet18"})
    loaded = load_pruned(lambda: tv.models.resnet18().eval(), tmp_path)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert cleanai.utils.count_params(loaded) == cleanai.utils.count_params(model)
    info = read_pruned_info(tmp_path)
    assert info["meta"] == {"model": "torchvision:resnet18"}
    assert info["original"]["params"] == cleanai.utils.count_params(tv.models.resnet18())
    # the files hold no code: the weights load with weights_only and the rest is JSON
    assert isinstance(torch.load(tmp_path / "weights.pt", weights_only=True), dict)


def test_three_iterative_steps_and_two_pruners(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    model = tv.models.resnet18().eval()
    _prune_and_perturb(model, x, pruning_ratio=0.3, iterative_steps=3)
    StructuredPruner(model, x, pruning_ratio=0.2, ignored_layers=["conv1"]).prune()  # a 2nd pruner
    save_pruned(model, tmp_path)  # the model itself carries its history
    assert len(read_pruned_info(tmp_path)["steps"]) == 4
    loaded = load_pruned(tv.models.resnet18().eval(), tmp_path)
    assert torch.equal(loaded(x), model(x))
    # a loaded model can be pruned again and saved again
    StructuredPruner(loaded, x, pruning_ratio=0.1).prune()
    save_pruned(loaded, tmp_path / "again")
    again = load_pruned(tv.models.resnet18().eval(), tmp_path / "again")
    assert torch.equal(again(x), loaded(x))


def test_vit_round_trip(tmp_path):
    torch.manual_seed(0)
    build = lambda: tv.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2,  # noqa: E731
                                                num_heads=2, hidden_dim=32, mlp_dim=64).eval()
    model = build()
    x = torch.randn(1, 3, 32, 32)
    _prune_and_perturb(model, x, pruning_ratio=0.25)
    assert cleanai.utils.count_params(model) < cleanai.utils.count_params(build())
    save_pruned(model, tmp_path)
    assert torch.equal(load_pruned(build, tmp_path)(x), model(x))


def test_huggingface_bert_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=48)
    torch.manual_seed(0)
    # pruning updates model.config in place: each fresh model gets its own copy
    build = lambda: transformers.BertModel(copy.deepcopy(config)).eval()  # noqa: E731
    model = build()
    ids = torch.randint(0, 64, (1, 8))
    pruner = StructuredPruner(model, {"input_ids": ids}, pruning_ratio=0.25,
                              forward_fn=lambda m, x: m(**x).last_hidden_state)
    pruner.prune()
    assert pruner.history, "nothing was pruned in BertModel"
    save_pruned(model, tmp_path)
    loaded = load_pruned(build, tmp_path)
    assert torch.equal(loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)


def test_llama_heads_round_trip_with_attributes_and_config(tmp_path):
    # whole key/value groups leave with their query heads: the history carries the attention
    # modules' attributes and the config fields, and loading replays them
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    build = lambda: transformers.LlamaForCausalLM(copy.deepcopy(config)).eval()  # noqa: E731
    torch.manual_seed(0)
    model = build()
    ids = torch.randint(0, 50, (1, 8))
    StructuredPruner(model, ids, pruning_ratio=0.5, kinds=["heads", "channels"],
                     forward_fn=lambda m, x: m(x).logits).prune()
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1
    kinds = {e["kind"] for e in read_pruned_info_of(model, tmp_path)["steps"][0]["layers"]}
    assert {"attr", "config"} <= kinds
    loaded = load_pruned(build, tmp_path)
    assert loaded.config.num_attention_heads == 2 and loaded.config.num_key_value_heads == 1
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 11)


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(6, 16, num_layers=2, batch_first=True, bidirectional=True)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc = nn.Linear(32, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        out, _ = self.attn(out, out, out)
        return self.fc(out[:, -1])


def test_lstm_and_attention_heads_round_trip(tmp_path):
    # internal dims (attention heads) and recurrent hidden units replay from the history
    torch.manual_seed(0)
    model, x = _Recurrent().eval(), torch.randn(2, 5, 6)
    _prune_and_perturb(model, x, pruning_ratio=0.5)
    assert model.rnn.hidden_size == 8 and model.attn.num_heads == 2
    save_pruned(model, tmp_path)
    loaded = load_pruned(lambda: _Recurrent().eval(), tmp_path)
    assert (loaded.rnn.hidden_size, loaded.attn.num_heads) == (8, 2)
    assert torch.equal(loaded(x), model(x))


def read_pruned_info_of(model, path):
    save_pruned(model, path)
    return read_pruned_info(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved")
    model = tv.models.resnet18().eval()
    StructuredPruner(model, torch.randn(1, 3, 32, 32), pruning_ratio=0.35).prune()
    save_pruned(model, path)
    return path


def _tamper(src, dst, change):
    dst.mkdir()
    info = json.loads((src / "cleanai.json").read_text())
    change(info)
    (dst / "cleanai.json").write_text(json.dumps(info))
    (dst / "weights.pt").write_bytes((src / "weights.pt").read_bytes())
    return dst


def _layer(info, name):
    return next(e for e in info["steps"][0]["layers"] if e["name"] == name)


@pytest.mark.parametrize("change, message", [
    (lambda i: _layer(i, "layer1.0.conv1").update(name="layer1.0.nope"), "no module named 'layer1.0.nope'"),
    (lambda i: _layer(i, "layer1.0.conv1")["keep"].append(999), "index 999 is out of range"),
    (lambda i: _layer(i, "layer1.0.conv1").update(dim=7), "dim must be -1"),
    (lambda i: i.update(version=99), "format version 99"),
    (lambda i: i["original"]["signature"].update({"fc.weight": [10, 512]}), "another architecture"),
    (lambda i: i["steps"][0]["layers"].pop(0), "shapes differ"),
])
def test_tampered_history_is_rejected_and_model_untouched(saved, tmp_path, change, message):
    path = _tamper(saved, tmp_path / "bad", change)
    fresh = tv.models.resnet18().eval()
    state, modules = _state(fresh), list(fresh.modules())
    with pytest.raises(LoadError, match=message) as err:
        load_pruned(fresh, path)
    assert "bad" in str(err.value)  # the message names the file
    _assert_untouched(fresh, state, modules)


def test_wrong_weights_file_is_rejected(saved, tmp_path):
    other = tv.models.resnet18().eval()
    StructuredPruner(other, torch.randn(1, 3, 32, 32), pruning_ratio=0.5).prune()
    save_pruned(other, tmp_path / "other")
    path = _tamper(saved, tmp_path / "bad", lambda i: None)
    (path / "weights.pt").write_bytes((tmp_path / "other" / "weights.pt").read_bytes())
    fresh = tv.models.resnet18().eval()
    state, modules = _state(fresh), list(fresh.modules())
    with pytest.raises(LoadError, match="checksum differs"):
        load_pruned(fresh, path)
    _assert_untouched(fresh, state, modules)
    # without the checksum, the shapes still give it away
    path2 = _tamper(saved, tmp_path / "bad2", lambda i: i["weights"].pop("sha256"))
    (path2 / "weights.pt").write_bytes((tmp_path / "other" / "weights.pt").read_bytes())
    with pytest.raises(LoadError, match="does not match"):
        load_pruned(fresh, path2)
    _assert_untouched(fresh, state, modules)


def test_wrong_architecture_and_not_a_file(saved, tmp_path):
    fresh = tv.models.resnet34().eval()
    with pytest.raises(LoadError, match="another architecture"):
        load_pruned(fresh, saved)
    (tmp_path / "cleanai.json").write_text("{not json")
    with pytest.raises(LoadError, match="not a readable CleanAI file"):
        load_pruned(tv.models.resnet18(), tmp_path)


def test_changing_shapes_outside_cleanai_refuses_to_save(tmp_path):
    model = tv.models.resnet18().eval()
    StructuredPruner(model, torch.randn(1, 3, 32, 32), pruning_ratio=0.2).prune()
    model.fc = nn.Linear(model.fc.in_features, 10)
    with pytest.raises(ValueError, match="changed outside CleanAI"):
        save_pruned(model, tmp_path)


def test_dtype_mismatch_is_named(tmp_path):
    model = tv.models.resnet18().eval()
    StructuredPruner(model, torch.randn(1, 3, 32, 32), pruning_ratio=0.2).prune()
    save_pruned(model.half(), tmp_path)
    fresh = tv.models.resnet18().eval()
    state, modules = _state(fresh), list(fresh.modules())
    with pytest.raises(LoadError, match="saved as torch.float16 but the model holds torch.float32"):
        load_pruned(fresh, tmp_path)
    _assert_untouched(fresh, state, modules)
    loaded = load_pruned(tv.models.resnet18().eval().half(), tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


@pytest.mark.slow
def test_vit_b_16_round_trip(tmp_path):
    torch.manual_seed(0)
    model = tv.models.vit_b_16().eval()
    x = torch.randn(1, 3, 224, 224)
    _prune_and_perturb(model, x, pruning_ratio=0.25)
    save_pruned(model, tmp_path)
    loaded = load_pruned(lambda: tv.models.vit_b_16().eval(), tmp_path)
    assert torch.equal(loaded(x), model(x))
    assert cleanai.utils.count_params(loaded) < cleanai.utils.count_params(tv.models.vit_b_16())
