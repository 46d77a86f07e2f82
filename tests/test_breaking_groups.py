"""Widths written in code that belongs to no layer (``gate.view(-1, 16, 1, 1)`` in a model's
own forward): step() finds by bisection exactly the groups whose removal breaks the model,
keeps those, says where it failed, and prunes the rest as planned."""
import math
import re
import warnings

import pytest
import torch
from torch import nn

import cleanai
from cleanai import StructuredPruner, load_pruned, replay, save_pruned
from cleanai.pruner import apply as apply_module
from cleanai.pruner.fallback import protect_breaking


class SENet(nn.Module):
    """An SE-style gate computed from a pooled 16-channel map by two Linears, reshaped with a
    width written in the model's own forward."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(16, 4), nn.Linear(4, 16)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Conv2d(32, 10, 1)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3))))))
        y = y * gate.view(-1, 16, 1, 1)
        return self.head(torch.relu(self.conv(y)))


def _se():
    torch.manual_seed(0)
    return SENet().eval(), torch.randn(1, 3, 8, 8)


def _warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught]


def test_se_gate_with_a_fixed_view_keeps_its_group_and_prunes_the_rest_exactly():
    model, x = _se()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    gate = pruner.graph.group_of("stem")[0]
    first = pruner.plan()  # what the plan takes from every group, the gate's included
    assert len(first.removals) == 3 and gate.id in first.removals
    plan, said = _warnings(pruner.step)
    assert said == [
        f"SENet no longer runs when group {gate.id} (16 channels: stem and 3 more layers) loses "
        f"channels: RuntimeError in SENet's own forward at test_breaking_groups.py:"
        f"{_line('y = y * gate.view(-1, 16, 1, 1)')} `y = y * gate.view(-1, 16, 1, 1)`: "
        f"shape '[-1, 16, 1, 1]' is invalid for input of size 8. CleanAI keeps its channels "
        f"and prunes the rest."]
    assert bool(gate.protected.all()) and "RuntimeError in SENet's own forward" in \
        next(iter(gate.reasons))
    # the 16-channel gate keeps its width; the other groups lose what the first plan said
    assert model.stem.out_channels == model.fc2.out_features == model.conv.in_channels == 16
    assert sorted(plan.removals) == sorted(g for g in first.removals if g != gate.id)
    for gid, idx in plan.removals.items():
        assert torch.equal(idx, first.removals[gid])
    fc1_keep = _kept(4, first.removals[_out_group(pruner.graph, "fc1").id])
    conv_keep = _kept(32, first.removals[_out_group(pruner.graph, "conv").id])
    assert model.fc1.out_features == 2 and model.conv.out_channels == 16
    assert torch.equal(model.fc1.weight, dense["fc1.weight"][fc1_keep])
    assert torch.equal(model.fc2.weight, dense["fc2.weight"][:, fc1_keep])
    assert torch.equal(model.conv.weight, dense["conv.weight"][conv_keep])
    assert torch.equal(model.head.weight, dense["head.weight"][:, conv_keep])
    assert torch.equal(model.stem.weight, dense["stem.weight"])
    assert model(x).shape == (1, 10, 8, 8)
    model(torch.randn(3, 3, 8, 8)).sum().backward()


def _out_group(graph, layer):
    return next(g for g in graph.group_of(layer)
                if any(m.name == layer and m.kind == "out" for m in g.members))


def _kept(size, removed):
    keep = torch.ones(size, dtype=torch.bool)
    keep[removed] = False
    return torch.nonzero(keep).flatten()


def _line(code):
    """The line number of ``code`` in this file (the warning quotes it)."""
    with open(__file__) as f:
        return next(i for i, line in enumerate(f, 1) if line.strip() == code)


class TwoGates(nn.Module):
    """Two independent widths fixed in code: a gate viewed as 8 channels, and a pooled map
    read as 12 features; the layers between them are free to lose channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.g = nn.Linear(8, 8)
        self.b = nn.Conv2d(8, 24, 3, padding=1)
        self.c = nn.Conv2d(24, 12, 1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = y * torch.sigmoid(self.g(y.mean((2, 3)))).view(-1, 8, 1, 1)
        y = torch.relu(self.c(torch.relu(self.b(y))))
        return self.fc(y.mean((2, 3)).reshape(-1, 12))


def test_two_independent_fixed_widths_keep_two_groups_with_two_warnings():
    torch.manual_seed(0)
    model, x = TwoGates().eval(), torch.randn(1, 3, 6, 6)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    _, said = _warnings(pruner.step)
    assert len(said) == 2
    assert re.search(r"group \d+ \(8 channels: a and 2 more layers\) loses channels: "
                     r"RuntimeError in TwoGates's own forward at test_breaking_groups.py:\d+ "
                     r"`y = y \* torch.sigmoid", said[0])
    assert re.search(r"group \d+ \(12 channels: c and 1 more layer\) loses channels: "
                     r"RuntimeError in TwoGates's own forward at test_breaking_groups.py:\d+ "
                     r"`return self.fc\(y.mean\(\(2, 3\)\).reshape\(-1, 12\)\)`", said[1])
    assert model.a.out_channels == model.g.out_features == 8
    assert model.c.out_channels == 12
    assert model.b.out_channels == 12  # the one group between them is pruned
    assert model(x).shape == (1, 5)


class Chain(nn.Module):
    """``n`` convs in a row, each its own group; one of them is viewed with a fixed width."""

    def __init__(self, n, bad):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 8, 8, 1) for i in range(n))
        self.bad = bad

    def forward(self, x):
        for i, conv in enumerate(self.convs):
            x = torch.relu(conv(x))
            if i == self.bad:
                x = x.view(-1, 8, 2, 2)
        return x


@pytest.mark.parametrize("bad", [0, 17, 38])
def test_bisection_costs_log_n_forwards_not_n(monkeypatch, bad):
    n = 40
    torch.manual_seed(0)
    model, x = Chain(n, bad).eval(), torch.randn(1, 3, 2, 2)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    groups = len(pruner.plan().removals)
    assert groups == n - 1  # the last conv is the model's output
    calls = []
    real = apply_module.run_forward

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(apply_module, "run_forward", counted)
    _, said = _warnings(pruner.step)
    assert len(said) == 1 and f"convs.{bad}" in said[0]
    # the failing check, log2(groups) tries, one try of the rest, the final check
    assert len(calls) <= math.ceil(math.log2(groups)) + 3 < groups // 3
    assert [c.out_channels for c in model.convs] == \
        [8 if i in (bad, n - 1) else 4 for i in range(n)]
    assert model(x).shape == (1, 8, 2, 2)


def _snapshot(model):
    return [(t, t.detach().clone(), None if t.grad is None else t.grad.clone())
            for t in list(model.parameters()) + list(model.buffers())]


def _same(model, snap):
    now = list(model.parameters()) + list(model.buffers())
    assert len(now) == len(snap)
    for t, (old, data, grad) in zip(now, snap):
        assert t is old and torch.equal(t, data)
        assert (t.grad is None and grad is None) or torch.equal(t.grad, grad)


def test_the_search_leaves_the_model_exactly_as_it_was():
    model, x = _se()
    model.train()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    plan = pruner.plan()
    snap = _snapshot(model)
    with pytest.raises(cleanai.PruningError) as info:
        pruner.apply(plan)
    assert info.value.failure is not None and info.value.failure.layer == ""
    _same(model, snap)
    with pytest.warns(UserWarning, match="gate.view"):
        assert protect_breaking(model, pruner.graph, plan.removals, info.value)
    _same(model, snap)  # every try was rolled back: same tensors, data and gradients
    assert pruner.history == [] and model.training


def test_the_history_holds_only_what_was_applied_and_replays(tmp_path):
    model, x = _se()
    pruner = StructuredPruner(model, x, pruning_ratio=0.5, iterative_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.prune()
    assert len(pruner.history) == 2
    named = {e["name"] for step in pruner.history for e in step["layers"]}
    assert "stem" not in named and "fc2" in named  # the kept gate never entered the history
    fresh = SENet().eval()
    for step in pruner.history:
        replay(fresh, step["layers"])
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    save_pruned(model, tmp_path)
    loaded = load_pruned(lambda: SENet().eval(), tmp_path)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.stem.out_channels == 16 and loaded.conv.out_channels == model.conv.out_channels


def test_an_interrupt_during_the_search_leaves_the_model_as_it_was(monkeypatch):
    torch.manual_seed(0)
    model, x = Chain(8, 3).eval(), torch.randn(1, 3, 2, 2)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    snap = _snapshot(model)
    calls = []
    real = apply_module.run_forward

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the failing check, one try, then the user presses Ctrl-C
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(apply_module, "run_forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pruner.step()
    _same(model, snap)
    assert [c.out_channels for c in model.convs] == [8] * 8 and pruner.history == []
    monkeypatch.setattr(apply_module, "run_forward", real)
    assert model(x).shape == (1, 8, 2, 2)
