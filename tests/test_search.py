"""search_ratios: per-unit ratios that meet the budget, deterministic for a seed, never
behind the uniform allocation on its own data."""
import copy
import math

import pytest
import torch
from torch import nn

from cleanai import StructuredPruner
from cleanai.budget import search_ratios, sensitivity
from cleanai.utils import count_macs


class Net(nn.Module):
    """Convs of different widths and costs, a residual pair and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.a = nn.Conv2d(24, 48, 3, padding=1)
        self.b = nn.Conv2d(48, 24, 3, padding=1)
        self.c = nn.Conv2d(24, 64, 3, stride=2, padding=1)
        self.d = nn.Conv2d(64, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.b(torch.relu(self.a(x)))
        x = self.d(torch.relu(self.c(x)))
        return self.fc(x.mean((2, 3)))


def _setup():
    torch.manual_seed(0)
    model = Net().eval()
    # a model that separates its inputs: the default metric (agreement) means something
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(2.0)
    data = [torch.randn(16, 3, 12, 12) for _ in range(3)]
    return model, torch.randn(1, 3, 12, 12), data


def test_budget_met_deterministic_and_not_behind_uniform():
    model, x, data = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    macs0 = count_macs(model, x)
    twin = copy.deepcopy(model)
    table = sensitivity(model, x, data, ratios=(0.25, 0.5, 0.75), progress=False)
    first = search_ratios(model, x, data, target_macs=0.5, evaluations=6, table=table,
                          progress=False)
    again = search_ratios(model, x, data, target_macs=0.5, evaluations=6, table=table,
                          progress=False)
    assert first.ratios == again.ratios and first.score == again.score
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert first.score >= first.uniform
    assert len(first.history) == 6
    assert 0.45 <= first.cost.macs <= 0.5
    # the ratios reproduce the plan in a pruner of one's own
    own = StructuredPruner(twin, x, pruning_ratio=0.0,
                           layer_pruning_ratios=first.ratios).plan()
    assert {g: i.tolist() for g, i in own.removals.items() if len(i)} == \
        {g: i.tolist() for g, i in first.plan.removals.items() if len(i)}
    first.pruner.apply(first.plan)
    assert count_macs(model, x) == pytest.approx(first.cost.macs * macs0, rel=1e-9)
    assert model(x).shape == (1, 10)


def test_a_user_metric_and_another_seed():
    model, x, data = _setup()
    calls = []

    def wide(m):  # prefers keeping the classifier's input: a metric the default is not
        calls.append(1)
        return float(m.fc.in_features)

    found = search_ratios(model, x, data, target_params=0.6, metric=wide, evaluations=4,
                          seed=3, progress=False, sensitivity_ratios=(0.5,))
    assert found.metric_name == "wide" and found.score == found.history[
        max(range(4), key=lambda i: found.history[i][1])][1]
    assert found.cost.params <= 0.6 and calls


@pytest.mark.parametrize("kwargs, error, message", [
    ({}, ValueError, "needs a budget"),
    ({"target_macs": 0.5, "evaluations": 1}, ValueError, "evaluations"),
    ({"target_macs": 1.5}, ValueError, "whole number"),
    ({"target_macs": 0.5, "iterative_steps": 2}, ValueError, "iterative_steps"),
    ({"target_macs": 0.5, "metric": lambda m: math.nan}, ValueError, "NaN|nan|finite"),
])
def test_bad_input_is_a_clear_error(kwargs, error, message):
    model, x, data = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        search_ratios(model, x, data, progress=False, sensitivity_ratios=(0.5,), **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_no_data_with_the_default_metric():
    model, x, _ = _setup()
    with pytest.raises(ValueError, match="needs data"):
        search_ratios(model, x, None, target_macs=0.5, progress=False)


def test_a_latency_budget_with_a_score_that_needs_data(fake_clock):
    """The latency target is planned by the calibrated pruner (a second, uncalibrated one
    refused to plan), and the result's pruner scores with the caller's importance."""
    from cleanai.importance import ActivationImportance
    model, x, data = _setup()
    result = search_ratios(model, x, data, target_latency=0.8,
                           importance=ActivationImportance(), evaluations=3, progress=False)
    assert isinstance(result.pruner.importance, ActivationImportance)
    assert result.cost.macs < 1.0
