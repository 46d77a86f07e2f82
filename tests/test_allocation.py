"""OutputSensitivity and the pruner's ``allocation``: how many channels each group loses comes
from one ranking of the output's change, which channels from the importance."""
import logging

import pytest
import torch
from torch import nn

import cleanai
from cleanai.importance import OutputSensitivity, WeightImportance
from cleanai.utils import count_macs


class TwoBranches(nn.Module):
    """Two hidden layers summed into the output; ``quiet`` scales branch b's read-out, so its
    neurons move the output little."""

    def __init__(self, quiet: float = 1e-3) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(8, 32)
        self.out_a, self.out_b = nn.Linear(32, 4), nn.Linear(32, 4)
        with torch.no_grad():
            self.out_b.weight.mul_(quiet)

    def forward(self, x):
        return self.out_a(torch.relu(self.a(x))) + self.out_b(torch.relu(self.b(x)))


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 8, generator=g) for _ in range(n)]


def _pruner(model, **kw):
    return cleanai.StructuredPruner(model, torch.randn(1, 8), **kw)


def test_scores_are_the_squared_mask_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight[:, 3] = 0  # hidden neuron 3 is read by nobody
    data = _data(2)
    sens = OutputSensitivity(seed=5)
    pruner = _pruner(model, allocation=sens, pruning_ratio=0.25)
    pruner.calibrate(data)
    group = next(g for g in pruner.graph.groups if g.size == 16)
    # by hand: d <r, W2 (m * h) + b> / d m_c = h_c * (W2^T r)_c per sample, squared and summed
    gen = torch.Generator().manual_seed(5)
    want = torch.zeros(16, dtype=torch.float64)
    with torch.no_grad():
        for x in data:
            h = torch.relu(model[0](x))
            r = torch.randn(16, 4, generator=gen)
            want += ((h * (r @ model[2].weight)).double() ** 2).sum(0)
    got = sens(group, model)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-9)
    assert got[3] == 0
    assert all(p.grad is None for p in model.parameters())  # the model's grads untouched
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_counts_follow_sensitivity_and_the_importance_picks():
    torch.manual_seed(0)
    model = TwoBranches()
    importance = WeightImportance()
    pruner = _pruner(model, importance=importance, allocation=OutputSensitivity(),
                     pruning_ratio=0.5)
    pruner.calibrate(_data())
    plan = pruner.plan()
    groups = {g.members[0].name: g for g in pruner.graph.groups if g.size == 32}
    lost = {name: len(plan.removals.get(g.id, ())) for name, g in groups.items()}
    assert lost["a"] + lost["b"] == 32  # the kind's total is what the ratio gives
    assert lost["b"] > 24 and lost["a"] < 8  # the quiet branch gives most
    for name, g in groups.items():  # within a group, the lowest importance goes
        if lost[name]:
            low = importance(g, model).argsort(stable=True)[:lost[name]]
            assert sorted(plan.removals[g.id].tolist()) == sorted(low.tolist())
    # without an allocation each loses its own half
    plain = _pruner(TwoBranches(), pruning_ratio=0.5).plan()
    assert sorted(len(v) for v in plain.removals.values()) == [16, 16]


def test_budget_with_an_allocation_is_met_and_untouched_model_on_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    model.eval()
    example = torch.randn(1, 3, 16, 16)
    dense = count_macs(model, example)
    pruner = cleanai.StructuredPruner(model, example, allocation=OutputSensitivity(),
                                      target_macs=0.5)
    pruner.calibrate([torch.randn(8, 3, 16, 16) for _ in range(3)])
    plan = pruner.plan()
    assert plan.budget.rows["macs"]["planned"] <= 0.5 * dense * (1 + 1e-9)
    pruner.apply(plan)
    assert 0.49 * dense <= count_macs(model, example) <= 0.5 * dense
    assert model(example).shape == (1, 10)


def test_unmeasured_groups_keep_their_own_ratio(caplog):
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 16)
            self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
            self.out = nn.Linear(16, 3)

        def forward(self, x):
            h = self.inp(x)
            return self.out(self.mha(h, h, h, need_weights=False)[0])

    torch.manual_seed(0)
    model = Attention().eval()
    pruner = cleanai.StructuredPruner(model, torch.randn(2, 5, 8), kinds=["heads"],
                                      allocation=OutputSensitivity(), pruning_ratio=0.5)
    pruner.calibrate([torch.randn(4, 5, 8) for _ in range(2)])
    with caplog.at_level(logging.WARNING, logger="cleanai"):
        pruner.step()
    assert model.mha.num_heads == 2
    assert "measured no sensitivity" in caplog.text
    assert model(torch.randn(2, 5, 8)).shape == (2, 5, 3)


def test_bad_use_is_refused():
    model = TwoBranches()
    with pytest.raises(TypeError, match="allocation must be callable"):
        _pruner(model, allocation="sensitivity")
    with pytest.raises(TypeError, match="output_fn"):
        OutputSensitivity(output_fn=3)
    pruner = _pruner(model, allocation=OutputSensitivity())
    with pytest.raises(RuntimeError, match="OutputSensitivity scores channels from data"):
        pruner.plan()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def broken(outputs, inputs):
        raise ValueError("no output here")

    pruner = _pruner(model, allocation=OutputSensitivity(output_fn=broken))
    with pytest.raises(ValueError, match="no output here"):
        pruner.calibrate(_data(1))
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_iterative_steps_measure_again():
    torch.manual_seed(0)
    model = TwoBranches()
    pruner = _pruner(model, allocation=OutputSensitivity(), pruning_ratio=0.5,
                     iterative_steps=2)
    data = _data()
    pruner.calibrate(data)
    pruner.step()
    with pytest.raises(RuntimeError, match="calibrate"):
        pruner.plan()
    pruner.calibrate(data)
    pruner.step()
    assert model.a.out_features + model.b.out_features == 32
    assert model(torch.randn(2, 8)).shape == (2, 4)
