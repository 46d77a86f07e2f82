"""Budgets: the cost model equals the counters after pruning, and a budgeted pruner meets
its MACs / params target or says why not."""
import datetime
import warnings

import pytest
import torch
import torchvision
from torch import nn

from cleanai import StructuredPruner
from cleanai.budget import CostModel
from cleanai.pruner.budget import BudgetError
from cleanai.utils import count_macs, count_params
from llama_like import LlamaLike

from test_prune_zoo import ALL, FIXED_SIZE


class Rnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.lstm = nn.LSTM(32, 48, num_layers=2, batch_first=True)
        self.gru = nn.GRU(48, 40, batch_first=True, bidirectional=True)
        self.head = nn.Linear(80, 5)

    def forward(self, x):
        return self.head(self.gru(self.lstm(self.inp(x))[0])[0])


class Grouped(nn.Module):
    """A grouped conv between plain ones, a depthwise conv and a GroupNorm."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.g = nn.Conv2d(32, 64, 3, padding=1, groups=4)
        self.n = nn.GroupNorm(8, 64)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.b = nn.Conv2d(64, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.b(self.dw(torch.relu(self.n(self.g(torch.relu(self.a(x)))))))
        return self.fc(x.mean((2, 3)))


def _tiny_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                                num_heads=4, hidden_dim=32, mlp_dim=64)


def _bert():
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, vocab_size=100))


def _ids(n=2, t=12):
    return {"input_ids": torch.randint(0, 100, (n, t)),
            "attention_mask": torch.ones(n, t, dtype=torch.long)}


MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(), lambda: torch.randn(1, 3, 32, 32)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(),
                           lambda: torch.randn(1, 3, 32, 32)),
    "vit": (_tiny_vit, lambda: torch.randn(2, 3, 32, 32)),
    "bert": (_bert, _ids),
    "llama_gqa": (lambda: LlamaLike(layers=2, dim=64, heads=4, kv_heads=2, hidden=96, vocab=100),
                  lambda: torch.randint(0, 100, (2, 10))),
    "rnn": (Rnn, lambda: torch.randn(3, 7, 8)),
    "grouped": (Grouped, lambda: torch.randn(2, 3, 16, 16)),
}


def _check_cost_model(model, x, steps=2, **options):
    """The cost model's prediction of each step equals the counters after it, also on a
    model pruned before."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = StructuredPruner(model, x, pruning_ratio=0.5, iterative_steps=steps, **options)
        cm = CostModel(model, pruner.graph)
        assert cm.dense.macs == count_macs(model, x)
        assert cm.dense.params == count_params(model)
        for _ in range(steps):
            plan = pruner.plan()
            predicted = cm.evaluate(plan.removals)
            pruner.apply(plan)
            assert predicted.params == count_params(model)
            assert predicted.macs == pytest.approx(count_macs(model, x), rel=1e-9)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cost_model_equals_the_counters_after_pruning(name):
    torch.manual_seed(0)
    build, inputs = MODELS[name]
    _check_cost_model(build().eval(), inputs())


def test_cost_model_with_head_dims():
    torch.manual_seed(0)
    _check_cost_model(_bert().eval(), _ids(), attention="head_dims")


def test_channel_costs_are_what_one_channel_saves():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    pruner = StructuredPruner(model, torch.randn(1, 3, 32, 32))
    cm = CostModel(model, pruner.graph)
    costs = cm.channel_costs()
    for g in pruner.graph.groups[:6]:
        one = cm.evaluate({g.id: torch.tensor([0])})
        assert costs[g.id].params == pytest.approx(cm.dense.params - one.params, rel=1e-9)
        assert costs[g.id].macs == pytest.approx(cm.dense.macs - one.macs, rel=0.02)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ALL)
def test_cost_model_on_every_torchvision_model(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    size = FIXED_SIZE.get(name, 128)
    x = torch.randn(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = StructuredPruner(model, x, pruning_ratio=0.5)
        cm = CostModel(model, pruner.graph)
        plan = pruner.step()  # the plan after any protection the step needed
    # the plan was applied: predict it again from the dense lengths it had
    macs, params = count_macs(model, x), count_params(model)
    kept = cm.lengths()  # the graph follows the step: current widths
    after = cm.cost_at(kept)
    assert after.params == pytest.approx(params, rel=0.005)
    assert after.macs == pytest.approx(macs, rel=0.005)
    assert plan.num_removed > 0


# --- budgets -------------------------------------------------------------------------


def _resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32)


@pytest.mark.parametrize("metric", ["macs", "params"])
def test_budget_is_met_within_one_percent(metric):
    model, x = _resnet()
    dense = {"macs": count_macs(model, x), "params": count_params(model)}
    plan = StructuredPruner(model, x, **{f"target_{metric}": 0.5}).step()
    got = {"macs": count_macs(model, x), "params": count_params(model)}[metric]
    assert 0.49 * dense[metric] <= got <= 0.5 * dense[metric]
    assert plan.budget.rows[metric]["planned"] == got
    assert "budget" in plan.summary()
    assert model(x).shape == (1, 1000)


def test_absolute_and_joint_budgets():
    model, x = _resnet()
    macs0, params0 = count_macs(model, x), count_params(model)
    StructuredPruner(model, x, target_macs=int(0.6 * macs0), target_params=0.4).step()
    assert count_macs(model, x) <= 0.6 * macs0 and count_params(model) <= 0.4 * params0
    # the tighter of the two binds, within about one channel
    assert count_params(model) >= 0.39 * params0


def test_budget_on_the_iterative_schedule():
    model, x = _resnet()
    macs0 = count_macs(model, x)
    pruner = StructuredPruner(model, x, target_macs=0.4, iterative_steps=2)
    pruner.step()
    assert 0.69 * macs0 <= count_macs(model, x) <= 0.7 * macs0
    pruner.step()
    assert 0.39 * macs0 <= count_macs(model, x) <= 0.4 * macs0


def test_budget_respects_the_pruner_options():
    model, x = _resnet()
    pruner = StructuredPruner(model, x, target_macs=0.5, round_to=8, ignored_layers=["layer4"],
                              max_pruning_ratio=0.7, layer_pruning_ratios={"layer1.0.conv1": 0.25})
    sizes = {g.id: g.size for g in pruner.graph.groups}
    pruner.step()
    assert model.layer1[0].conv1.out_channels == 48  # its fixed ratio
    for g in pruner.graph.groups:
        if any(m.name.startswith("layer4.") and m.kind == "out" for m in g.members) and \
                all(m.name.startswith("layer4") for m in g.members if m.kind == "out"):
            assert g.size == sizes[g.id]
        assert g.size >= sizes[g.id] * 0.3 - 1e-9
        assert g.size % 8 == 0 or g.size == sizes[g.id]
    assert count_macs(model, x) <= 0.5 * pruner.cost_model.dense.macs


def test_unreachable_budget_says_why_and_leaves_the_model():
    model, x = _resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = StructuredPruner(model, x, target_macs=0.1, max_pruning_ratio=0.3)
    with pytest.raises(BudgetError, match="cannot be met.*macs 0.*max_pruning_ratio=0.3"):
        pruner.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kwargs, message", [
    ({"target_macs": 0}, "target_macs must be"),
    ({"target_params": -3}, "target_params must be"),
    ({"target_macs": 1}, "target_macs must be"),
    ({"target_macs": 1.5}, "whole number"),
    ({"target_macs": float("nan")}, "target_macs must be"),
    ({"target_macs": True}, "target_macs must be"),
    ({"target_macs": 10 ** 12}, "is not below"),
    ({"target_latency": 0.5, "target_macs": 0.5}, "cannot be combined"),
    ({"target_latency": 1.5}, "target_latency must be"),
    ({"target_latency": datetime.timedelta(0)}, "must be positive"),
])
def test_bad_budgets_are_clear_errors(kwargs, message):
    model, x = _resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        StructuredPruner(model, x, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_latency_budget_times_candidates():
    torch.manual_seed(0)
    # wide enough that compute, not per-call overhead, sets the latency: 0.5 is reachable
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                          nn.Linear(1024, 10)).eval()
    x = torch.randn(64, 256)
    pruner = StructuredPruner(model, x, target_latency=0.5)
    plan = pruner.step()
    row = plan.budget.rows["latency"]
    assert row["measured"] > 0 and row["predicted"] > 0 and row["dense"] > 0
    assert row["target"] == pytest.approx(0.5 * row["dense"])
    assert plan.budget.rows["macs"]["planned"] < pruner.cost_model.dense.macs
    assert "latency" in plan.summary()
