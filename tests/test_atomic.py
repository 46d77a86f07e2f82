"""Applying a plan is all or nothing: a failure at any point leaves the model exactly as it was
(values, the same Parameter and buffer objects, grads, attributes, hooks) and the pruner usable.

Pruning slices tensors in place (``param.data``), so a model keeps its ``nn.Parameter`` objects
whether a step succeeds or fails: references a user holds (an optimizer's param groups) stay
attached to the model.
"""
import re
import pytest
import torch
from torch import nn

import cleanai
from cleanai import StructuredPruner
from cleanai.core import layers


class Scale(nn.Module):
    """A custom per-channel layer, pruned by a registered LayerPruner."""

    def __init__(self, c):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, c))
        self.channels = c

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1)


class ScalePruner(cleanai.LayerPruner):
    def coupling(self, m):
        return "same"

    def in_channels(self, m):
        return m.channels

    out_channels = in_channels

    def prune(self, m, in_keep, out_keep):
        keep = in_keep if in_keep is not None else out_keep
        layers._keep(m.scale, 0, keep)
        m.channels = len(keep)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.scale = Scale(8)
        self.blocks = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)])
        self.head = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16 * 4, 5)

    def forward(self, x):
        x = self.scale(self.stem(x))
        for b in self.blocks:
            x = x + torch.relu(b(x))
        return self.fc(self.head(x).flatten(1))


X = torch.randn(2, 3, 2, 2)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(layers._REGISTRY, Scale, ScalePruner())


def _hook(*args):
    return None


def build():
    torch.manual_seed(0)
    model = Net().eval()
    model(X).sum().backward()  # grads a user may hold mid-training
    model.blocks[1].register_forward_hook(_hook)
    model.fc.register_forward_pre_hook(_hook)
    model.register_full_backward_hook(_hook)
    return model


def snapshot(model):
    return {
        "tensors": [(n, t, t.detach().clone(), None if t.grad is None else t.grad.clone())
                    for n, t in list(model.named_parameters()) + list(model.named_buffers())],
        "attrs": {n: {k: v for k, v in vars(m).items() if not k.startswith("_")}
                  for n, m in model.named_modules()},
        "hooks": {n: [dict(getattr(m, h)) for h in ("_forward_hooks", "_forward_pre_hooks",
                                                    "_backward_hooks", "_backward_pre_hooks")]
                  for n, m in model.named_modules()},
        "modules": [(n, m) for n, m in model.named_modules()],
    }


def assert_same(model, snap):
    now = list(model.named_parameters()) + list(model.named_buffers())
    assert [n for n, _ in now] == [n for n, *_ in snap["tensors"]]
    for (n, t), (_, t0, value, grad) in zip(now, snap["tensors"]):
        assert t is t0, f"{n} is a new tensor object"
        assert torch.equal(t, value), n
        assert (t.grad is None and grad is None) or torch.equal(t.grad, grad), n
    assert {n: {k: v for k, v in vars(m).items() if not k.startswith("_")}
            for n, m in model.named_modules()} == snap["attrs"]
    assert {n: [dict(getattr(m, h)) for h in ("_forward_hooks", "_forward_pre_hooks",
                                              "_backward_hooks", "_backward_pre_hooks")]
            for n, m in model.named_modules()} == snap["hooks"]
    assert [(n, m) for n, m in model.named_modules()] == snap["modules"]


def _fail_on_call(monkeypatch, cls, n):
    """Make ``cls.prune`` raise on its n-th call; returns the list of calls made."""
    real = cls.prune
    calls = []

    def flaky(self, module, in_keep, out_keep):
        calls.append(module)
        if len(calls) == n:
            raise RuntimeError(f"injected failure on call {n}")
        return real(self, module, in_keep, out_keep)

    monkeypatch.setattr(cls, "prune", flaky)
    return calls


@pytest.mark.parametrize("cls, n", [
    (layers.ConvPruner, 1), (layers.ConvPruner, 3), (layers.ConvPruner, 5),
    (layers.NormPruner, 2), (layers.LinearPruner, 1), (ScalePruner, 1)])
def test_failing_layer_pruner_leaves_model_exactly_as_before(registered, monkeypatch, cls, n):
    model = build()
    pruner = StructuredPruner(model, X, pruning_ratio=0.5)
    plan = pruner.plan()
    groups = [(g.size, g.protected.clone(), [(m.positions.clone(), m.channels.clone())
                                             for m in g.members]) for g in pruner.graph.groups]
    snap = snapshot(model)
    calls = _fail_on_call(monkeypatch, cls, n)
    with pytest.raises(RuntimeError, match=f"injected failure on call {n}"):
        pruner.apply(plan)
    assert len(calls) == n
    assert_same(model, snap)
    assert pruner.history == [] and pruner.current_step == 0
    for g, (size, protected, members) in zip(pruner.graph.groups, groups):  # graph untouched
        assert g.size == size and torch.equal(g.protected, protected)
        for m, (pos, ch) in zip(g.members, members):
            assert torch.equal(m.positions, pos) and torch.equal(m.channels, ch)

    monkeypatch.undo()
    layers._REGISTRY[Scale] = ScalePruner()
    try:
        pruner.apply(plan)  # the pruner is still usable: the same plan now succeeds
    finally:
        del layers._REGISTRY[Scale]
    assert model.scale.channels == model.stem[0].out_channels == 4
    assert model(X).shape == (2, 5)
    for n_, t, *_ in snap["tensors"]:  # pruned in place: the same Parameter objects
        if isinstance(t, nn.Parameter):
            assert model.get_parameter(n_) is t


def test_failing_registered_pruner_rolls_back(monkeypatch):
    class Broken(ScalePruner):
        def prune(self, m, in_keep, out_keep):
            m.scale.data = m.scale.data[:1]  # half-done work, then a crash
            m.channels = -1
            raise ValueError("cannot prune this scale")

    monkeypatch.setitem(layers._REGISTRY, Scale, Broken())
    model = build()
    pruner = StructuredPruner(model, X, pruning_ratio=0.5)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="cannot prune this scale"):
        pruner.step()
    assert_same(model, snap)
    assert model(X).shape == (2, 5)


class Rigid(nn.Module):
    """Stores a channel count of its own: the validation forward fails after slicing."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.view = View()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.view(self.bn(self.conv(x))).mean(2))


class View(nn.Module):
    def forward(self, y):
        return y.reshape(y.shape[0], 8, y.shape[2] * y.shape[3])


def test_failing_validation_forward_rolls_back_and_names_the_layer():
    model = Rigid().train()
    model.fc.register_forward_hook(_hook)
    x = torch.randn(2, 3, 4, 4)
    model(x).sum().backward()
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    snap = snapshot(model)
    with pytest.raises(cleanai.PruningError, match=r"Rigid no longer runs after pruning: "
                                                   r"RuntimeError in view: .*restored") as info:
        pruner.apply(pruner.plan())
    assert info.value.layer == "view"
    assert isinstance(info.value.__cause__, RuntimeError)
    assert_same(model, snap)
    assert pruner.history == []
    # View keeps a width of its own: step() finds the one group it breaks and keeps it whole
    with pytest.warns(UserWarning) as caught:
        assert pruner.step().num_removed == 0
    said = [str(w.message) for w in caught]
    assert any(re.search(r"group 0 .* RuntimeError in view \(View\) at ", s) for s in said)
    # and the model came out unchanged: the last warning says so, naming the kept groups
    assert "Rigid has no channels CleanAI can prune" in said[-1] and "view" in said[-1]
    assert_same(model, snap)
    StructuredPruner(model, x, pruning_ratio=0.5, ignored_layers=["conv"]).prune()
    assert model.conv.out_channels == 8 and model(x).shape == (2, 2)


def test_keyboard_interrupt_during_slicing_rolls_back(monkeypatch):
    model = build()
    pruner = StructuredPruner(model, X, pruning_ratio=0.5)
    plan = pruner.plan()
    snap = snapshot(model)
    real = layers.LinearPruner.prune

    def interrupted(self, *args):
        real(self, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(layers.LinearPruner, "prune", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pruner.apply(plan)
    assert_same(model, snap)
