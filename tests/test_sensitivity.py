"""Sensitivity analysis (``cleanai.budget.sensitivity``): each unit pruned alone on a copy,
measured, the model untouched."""
import copy
import json
import logging
import math
import sys

import pytest
import torch
from torch import nn

import cleanai
from cleanai.budget import SensitivityTable, measure, prunable_units, sensitivity
from cleanai.importance import WeightActivationImportance


class Block(nn.Module):
    def __init__(self, c, hidden):
        super().__init__()
        self.conv1 = nn.Conv2d(c, hidden, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyRes(nn.Module):
    """A stem, two residual blocks, a classifier: three prunable groups (the residual width
    and each block's inner width)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(Block(8, 16), Block(8, 16))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def tiny_res():
    torch.manual_seed(0)
    model = TinyRes()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode differs from train
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


X = torch.randn(1, 3, 12, 12)


def batches(n=2, size=16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, 12, 12, generator=g), torch.randint(0, 10, (size,), generator=g))
            for _ in range(n)]


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [id(p) for p in model.parameters()], [m.training for m in model.modules()])


def assert_untouched(model, snap):
    state, ids, modes = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), f"{k} changed"
    assert [id(p) for p in model.parameters()] == ids
    assert [m.training for m in model.modules()] == modes


def agreement(model, dense, data):
    with torch.no_grad():
        same = sum(int((model(x).argmax(-1) == dense(x).argmax(-1)).sum()) for x, _ in data)
    return same / sum(len(x) for x, _ in data)


def test_one_row_per_group_exact_values_and_the_model_untouched():
    model = tiny_res().train()  # train mode: a forward here would move the BatchNorm statistics
    snap = snapshot(model)
    data = batches()
    table = sensitivity(model, X, data, ratios=(0.75, 0.25, 0.5), progress=False)
    assert_untouched(model, snap)

    assert [u.name for u in table.units] == ["stem.0", "blocks.0.conv1", "blocks.1.conv1"]
    pruner = cleanai.StructuredPruner(copy.deepcopy(model), X, pruning_ratio=0.0)
    prunable = [g.id for g in pruner.graph.groups if g.prunable and g.size > 1]
    assert sorted(gid for u in table.units for gid in u.groups) == prunable
    assert all(len(u.groups) == 1 for u in table.units)
    assert table.ratios == [0.25, 0.5, 0.75]
    assert (table.metric_name, table.dense) == ("agreement", 1.0)
    for u in table.units:
        assert all(0.0 <= v <= 1.0 for v in table.values[u.name])
        p, m = table.params[u.name], table.macs[u.name]
        assert 1.0 > p[0] > p[1] > p[2] > 0 and 1.0 > m[0] > m[1] > m[2] > 0

    # a point is exactly the model pruned by hand with that one layer ratio: its metric, and
    # its size (read off the plan by the cost model) as the counters count the pruned model
    dense = copy.deepcopy(model).eval()
    for name, i in [("blocks.0.conv1", 1), ("stem.0", 2)]:
        by_hand = copy.deepcopy(model)
        cleanai.StructuredPruner(by_hand, X, pruning_ratio=0.0,
                                 layer_pruning_ratios={name: table.ratios[i]}).step()
        by_hand.eval()
        assert table.values[name][i] == agreement(by_hand, dense, data)
        assert table.params[name][i] == (cleanai.utils.count_params(by_hand)
                                         / cleanai.utils.count_params(dense))
        assert table.macs[name][i] == pytest.approx(cleanai.utils.count_macs(by_hand, X)
                                                    / cleanai.utils.count_macs(dense, X),
                                                    rel=1e-9)


def test_a_user_metric_sees_eval_mode_and_scores_the_dense_model_once():
    model = tiny_res().train()
    snap = snapshot(model)
    data = batches(1)
    seen = []

    def accuracy(m):
        seen.append((m is model, m.training))
        with torch.no_grad():
            return float((m(data[0][0]).argmax(-1) == data[0][1]).float().mean())

    table = sensitivity(model, X, None, metric=accuracy, ratios=[0.5], progress=False)
    assert_untouched(model, snap)
    assert table.metric_name == "accuracy"
    assert seen[0] == (True, False) and all(s == (False, False) for s in seen[1:])
    assert len(seen) == 1 + len(table.units)
    assert table.dense == accuracy(copy.deepcopy(model).eval())


def test_a_ratio_that_removes_nothing_gives_the_dense_row_without_a_copy(monkeypatch):
    def no_copy(self, plan):
        raise AssertionError("no copy should be built for an empty plan")
    monkeypatch.setattr(cleanai.StructuredPruner, "pruned_copy", no_copy)
    table = sensitivity(tiny_res(), X, batches(1), ratios=[0.05], progress=False)
    assert len(table.units) == 3  # 8 and 16 channels: 5% of them is no channel
    for u in table.units:
        assert (table.values[u.name], table.params[u.name], table.macs[u.name]) == \
            ([table.dense], [1.0], [1.0])


def test_resnet18_units_by_block_and_layer():
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18()
    snap = snapshot(model)
    table = sensitivity(model, torch.randn(1, 3, 32, 32), [torch.randn(2, 3, 32, 32)],
                        ratios=[0.5], by="block", progress=False)
    assert_untouched(model, snap)
    assert [u.name for u in table.units] == ["conv1"] + [f"layer{i}.{j}" for i in range(1, 5)
                                                         for j in range(2)]
    pruner = cleanai.StructuredPruner(model, torch.randn(1, 3, 32, 32), pruning_ratio=0.0)
    layers = [u.name for u in prunable_units(pruner, "layer")]
    # a downsample shares its group with the block's conv2: one unit for both, named first
    assert "layer2.0.conv2" in layers and "layer2.0.downsample.0" not in layers
    assert len(layers) == 12 and "fc" not in layers


@pytest.mark.parametrize("build", ["resnet18", "vit"])
def test_a_unit_name_as_the_only_layer_ratio_prunes_exactly_its_groups(build):
    tv = pytest.importorskip("torchvision")
    if build == "resnet18":
        model = tv.models.resnet18()
    else:
        model = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                            num_heads=2, hidden_dim=32, mlp_dim=64)
    pruner = cleanai.StructuredPruner(model, torch.randn(1, 3, 32, 32), pruning_ratio=0.0)
    for by in ("group", "layer", "block"):
        units = prunable_units(pruner, by)
        assert units and len({frozenset(u.groups) for u in units}) == len(units)
        for u in units:
            pruner.layer_ratios = {u.name: 0.5}
            removed = {g for g, idx in pruner.plan().removals.items() if len(idx)}
            assert removed == set(u.groups), (by, u.name)
    if build == "vit":  # out_proj lives inside the attention module: heads come with the width
        heads = [u for u in prunable_units(pruner, "group") if u.name.endswith("self_attention")]
        assert len(heads) == 2 and all(len(u.groups) == 2 for u in heads)


def _forward_counter(model):
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("kwargs, match", [
    (dict(ratios=0), "ratios"), (dict(ratios=[]), "ratios"), (dict(ratios="x"), "ratios"),
    (dict(ratios=[0.5, 1]), "ratios"), (dict(ratios=[0.0, 0.5]), "ratios"),
    (dict(ratios=[True]), "ratios"), (dict(by="channel"), "by must be"),
    (dict(iterative_steps=2), "iterative_steps"), (dict(global_pruning=True), "global_pruning"),
    (dict(layer_pruning_ratios={"stem.0": 0.5}), "layer_pruning_ratios"),
    (dict(pruning_ratio=0.3), "pruning_ratio"), (dict(target_macs=1e6), "target_macs"),
    (dict(max_batches=0), "max_batches"), (dict(allocation=object()), "allocation"),
])
def test_bad_arguments_fail_before_any_work(kwargs, match):
    model = tiny_res()
    snap, calls = snapshot(model), _forward_counter(model)
    with pytest.raises(ValueError, match=match):
        sensitivity(model, X, batches(1), progress=False, **kwargs)
    assert not calls
    assert_untouched(model, snap)


def test_data_is_needed_for_the_default_metric_and_a_data_importance():
    model = tiny_res()
    snap, calls = snapshot(model), _forward_counter(model)
    with pytest.raises(ValueError, match="needs data"):
        sensitivity(model, X, None, progress=False)
    with pytest.raises(ValueError, match="needs data"):
        sensitivity(model, X, None, metric=lambda m: 1.0, progress=False,
                    importance=WeightActivationImportance(weight_ratio=0.5, activation_ratio=0.5))
    with pytest.raises(ValueError, match="needs data"):
        sensitivity(model, X, None, metric=lambda m: 1.0, compensate="bias", progress=False)
    assert not calls
    assert_untouched(model, snap)


def test_a_metric_returning_nan_is_reported_with_its_unit_and_ratio():
    model = tiny_res()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"unit 'stem.0' at ratio 0.5.*finite"):
        sensitivity(model, X, None, metric=lambda m: 1.0 if m is model else float("nan"),
                    ratios=[0.5], progress=False)
    with pytest.raises(ValueError, match="the dense model"):
        sensitivity(model, X, None, metric=lambda m: "good", ratios=[0.5], progress=False)
    assert_untouched(model, snap)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 8))


def test_lstsq_compensation_calibrates_and_improves_the_points():
    model = mlp()
    data = [torch.randn(64, 16) for _ in range(2)]
    x = torch.randn(1, 16)
    plain = sensitivity(model, x, data, ratios=(0.25, 0.5, 0.75), progress=False)
    snap = snapshot(model)
    fixed = sensitivity(model, x, data, ratios=(0.25, 0.5, 0.75), compensate="lstsq",
                        progress=False)
    assert_untouched(model, snap)
    assert [u.name for u in fixed.units] == ["0"] and fixed.metric_name == "agreement"
    a, b = plain.values["0"], fixed.values["0"]
    assert a != b and sum(b) > sum(a)  # least squares refits the last layer on this very data


def test_a_data_dependent_importance_is_calibrated_once():
    model = tiny_res()
    imp = WeightActivationImportance(weight_ratio=0.5, activation_ratio=0.5)
    table = sensitivity(model, X, iter(batches(3)), importance=imp, ratios=[0.5],
                        max_batches=2, progress=False)  # a generator: read once, kept
    assert imp.ready and len(table.units) == 3
    assert all(0 <= v[0] <= 1 for v in table.values.values())


def test_markdown_dict_and_plot(tmp_path):
    table = sensitivity(tiny_res(), X, batches(1), ratios=[0.25, 0.5], progress=False)
    text = table.to_markdown()
    assert str(table) == text
    header = next(line for line in text.splitlines() if line.startswith("| unit"))
    assert "| 0.25 | 0.5 |" in header
    for u in table.units:
        assert f"| {u.name} |" in text
    d = json.loads(json.dumps(table.to_dict()))
    assert d["ratios"] == [0.25, 0.5] and [u["name"] for u in d["units"]] == \
        [u.name for u in table.units]
    assert d["units"][0]["values"] == table.values[table.units[0].name]
    pytest.importorskip("matplotlib")
    out = table.plot(tmp_path / "s.png")
    assert out.stat().st_size > 0


def test_a_tiny_bert_by_block_with_padded_dict_batches():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    snap = snapshot(model)
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[1, 5:] = 0
    data = [{"input_ids": torch.randint(0, 64, (4, 8)), "attention_mask": mask}
            for _ in range(2)]
    table = sensitivity(model, data[0], data, by="block", ratios=[0.5, 0.75], progress=False)
    assert_untouched(model, snap)
    # the hidden width is the model's output: only the layers' heads and neurons can go
    assert [u.name for u in table.units] == ["encoder.layer.0", "encoder.layer.1"]
    assert table.metric_name == "cosine" and math.isclose(table.dense, 1.0, abs_tol=1e-5)
    for u in table.units:
        assert all(-1.0 <= v <= 1.0 for v in table.values[u.name])
        assert table.params[u.name][1] < table.params[u.name][0] < 1.0


def test_progress_is_a_tqdm_bar_or_log_lines_without_tqdm(monkeypatch, caplog, capsys):
    pytest.importorskip("tqdm")
    sensitivity(tiny_res(), X, batches(1), ratios=[0.25, 0.5], progress=True)
    assert "sensitivity" in capsys.readouterr().err  # the bar
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # importing it now fails
    with caplog.at_level(logging.INFO, logger="cleanai.budget"):
        sensitivity(tiny_res(), X, batches(1), ratios=[0.25, 0.5], progress=True)
    assert "sensitivity: 6/6 points" in caplog.text
    assert not capsys.readouterr().err


def test_table_is_a_plain_dataclass():
    table = SensitivityTable(units=[], ratios=[0.5], values={}, params={}, macs={}, dense=1.0,
                             metric_name="m")
    assert table.to_dict() == {"metric": "m", "dense": 1.0, "ratios": [0.5], "units": []}


def _bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[0, 6:] = 0
    return (transformers.BertModel(cfg).eval(),
            [{"input_ids": torch.randint(0, 64, (4, 8)), "attention_mask": mask}],
            "embeddings.word_embeddings")


def _vision(name):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(tv.models, name)()
    with torch.no_grad():  # BatchNorm statistics of a trained model, roughly
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
    first = "layer1.0.conv1" if name == "resnet18" else "features.1.conv.0.0"
    return model.eval(), [torch.randn(4, 3, 32, 32)], first


@pytest.mark.parametrize("build", ["resnet18", "mobilenet_v2", "bert"])
def test_replaying_the_dense_blocks_before_a_unit_changes_no_value(build, monkeypatch):
    # a copy pruned from some layer on replays the dense outputs of the blocks before it
    model, data, first = _bert() if build == "bert" else _vision(build)
    calls = []  # of a layer inside an early block: not called where the block is replayed
    handle = model.get_submodule(first).register_forward_hook(lambda *a: calls.append(1))
    # vision: logits as [batch, 1, classes], so the metric is a cosine, sharper than agreement
    fn = None if build == "bert" else (lambda m, x: m(x)[:, None])
    fast = sensitivity(model, data[0], data, ratios=[0.5], by="block", forward_fn=fn,
                       progress=False)
    replayed = len(calls)
    monkeypatch.setattr(measure, "_REPLAY_BYTES", 0)  # no room for any block: every copy runs whole
    slow = sensitivity(model, data[0], data, ratios=[0.5], by="block", forward_fn=fn,
                       progress=False)
    handle.remove()
    assert fast.metric_name == "cosine" and len({v[0] for v in fast.values.values()}) > 1
    assert fast.values == slow.values and fast.params == slow.params and fast.macs == slow.macs
    assert replayed < len(calls) - replayed
