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


class Branches(nn.Module):
    """Four hidden layers of 48 read into one output; branch 0 is read out quietly."""

    def __init__(self) -> None:
        super().__init__()
        self.hid = nn.ModuleList(nn.Linear(8, 48) for _ in range(4))
        self.outs = nn.ModuleList(nn.Linear(48, 4) for _ in range(4))
        with torch.no_grad():
            self.outs[0].weight.mul_(1e-3)

    def forward(self, x):
        return sum(o(torch.relu(h(x))) for h, o in zip(self.hid, self.outs))


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_every_step_keeps_the_total_and_round_to_keeps_multiples(steps):
    data = _data()
    for round_to in (None, 16):
        torch.manual_seed(0)
        model = Branches()
        pruner = _pruner(model, allocation=OutputSensitivity(), pruning_ratio=0.5,
                         max_pruning_ratio=0.9, iterative_steps=steps, round_to=round_to)
        for _ in range(steps):
            pruner.calibrate(iter(data))  # a one-shot iterator is read once
            pruner.step()
        widths = [h.out_features for h in model.hid]
        # what one ratio keeps: 4 x 24, or 4 x 32 once 24 is rounded to a multiple of 16
        assert sum(widths) == (96 if round_to is None else 128), (round_to, widths)
        assert widths[0] < min(widths[1:])  # the quiet branch gave most
        if round_to:
            assert all(w % 16 == 0 for w in widths), widths


def test_channels_the_allocation_cannot_tell_apart_go_by_importance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight[:, 6:] = 0  # channels 6-15 move nothing: equal (zero) sensitivity
        model[0].weight[12:] *= 1e-2  # and the weight score ranks 12-15 lowest
    pruner = _pruner(model, allocation=OutputSensitivity(), pruning_ratio=0.25)
    pruner.calibrate(_data())
    assert sorted(pruner.plan().removals[0].tolist()) == [12, 13, 14, 15]


def test_a_loss_in_the_outputs_and_recomputed_blocks_change_nothing():
    from torch.utils.checkpoint import checkpoint

    class Model(nn.Module):
        def __init__(self, recompute=False):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
            self.recompute = recompute

        def forward(self, x, labels=None):
            h = checkpoint(self.a, x, use_reentrant=False) if self.recompute else self.a(x)
            logits = self.b(torch.relu(h))
            loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
            return {"loss": loss, "logits": logits}

    data = _data(3)
    labelled = [{"x": x, "labels": torch.randint(0, 4, (16,))} for x in data]
    scores = []
    for recompute, batches in ((False, [{"x": x} for x in data]), (False, labelled),
                               (True, labelled)):
        torch.manual_seed(0)
        model = Model(recompute)
        sens = OutputSensitivity()
        pruner = cleanai.StructuredPruner(model, {"x": torch.randn(2, 8)}, allocation=sens)
        pruner.calibrate(batches)
        scores.append(sens(next(g for g in pruner.graph.groups if g.size == 16), model))
    torch.testing.assert_close(scores[1], scores[0])
    torch.testing.assert_close(scores[2], scores[0])


def test_groups_tied_to_equal_counts_rank_as_one_unit():
    class Gated(nn.Module):  # the halves of a chunk lose as many channels as each other
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 64)
            self.la, self.lb = nn.Linear(32, 4), nn.Linear(32, 4)
            self.other, self.lo = nn.Linear(8, 32), nn.Linear(32, 4)
            with torch.no_grad():
                self.la.weight.mul_(1e-3)

        def forward(self, x):
            a, b = torch.relu(self.lin(x)).chunk(2, -1)
            return self.la(a) + self.lb(b) + self.lo(torch.relu(self.other(x)))

    torch.manual_seed(0)
    model = Gated()
    pruner = _pruner(model, allocation=OutputSensitivity(), pruning_ratio=0.5)
    pruner.calibrate(_data())
    pruner.step()
    assert model.la.in_features == model.lb.in_features
    removed = 96 - model.lin.out_features - model.other.out_features
    assert abs(removed - 48) <= 1  # the ratio's total, to the nearest step of the tie (2)
    assert model(torch.randn(2, 8)).shape == (2, 4)
