"""Bad input gives a clear error (what, where, what to do) and leaves the model untouched."""
import math
import warnings

import pytest
import torch
from torch import nn

import cleanai
from cleanai import StructuredPruner
from cleanai.importance import WeightActivationImportance

from conftest import Double


class Net(nn.Module):
    """conv-bn-relu, conv, a residual, pooled into a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + torch.relu(self.conv1(x))
        return self.fc(self.conv2(x).mean((2, 3)))


X = torch.randn(2, 3, 8, 8)


def snapshot(model):
    """Values of the state dict, and the module tree (names, types, identities, attributes)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tree = [(n, type(m), id(m), {k: v for k, v in vars(m).items() if not k.startswith("_")})
            for n, m in model.named_modules()]
    return state, tree


def assert_untouched(model, snap):
    state, tree = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert [(n, type(m), id(m), {k: v for k, v in vars(m).items() if not k.startswith("_")})
            for n, m in model.named_modules()] == tree


def fresh():
    torch.manual_seed(0)
    return Net().eval()


@pytest.mark.parametrize("kwargs, message", [
    ({"pruning_ratio": 1.0}, r"pruning_ratio must be a number in \[0, 1\), got 1.0"),
    ({"pruning_ratio": -0.1}, r"pruning_ratio must be a number in \[0, 1\), got -0.1"),
    ({"pruning_ratio": math.nan}, r"pruning_ratio must be a number in \[0, 1\), got nan"),
    ({"pruning_ratio": "0.5"}, r"pruning_ratio must be a number in \[0, 1\), got '0.5'"),
    ({"pruning_ratio": True}, r"pruning_ratio must be a number"),
    ({"layer_pruning_ratios": {"conv1": 1.0}}, r"layer_pruning_ratios\['conv1'\] must be a number in \[0, 1\)"),
    ({"layer_pruning_ratios": {"conv1": -0.5}}, r"layer_pruning_ratios\['conv1'\] must be a number in \[0, 1\)"),
    ({"max_pruning_ratio": 0.0}, r"max_pruning_ratio must be in \(0, 1\]"),
    ({"max_pruning_ratio": 1.5}, r"max_pruning_ratio must be in \(0, 1\]"),
    ({"max_pruning_ratio": math.nan}, r"max_pruning_ratio must be in \(0, 1\]"),
    ({"layer_pruning_ratios": {"conv": 0.5}}, r"Net has no layer named 'conv'; did you mean .*'conv1'"),
    ({"layer_pruning_ratios": {"stem.3": 0.5}}, r"no layer named 'stem.3'; did you mean .*'stem.2'"),
    ({"ignored_layers": ["fc1"]}, r"ignored_layers: Net has no layer named 'fc1'; did you mean 'fc'"),
    ({"ignored_layers": [nn.Linear(16, 4)]}, r"ignored_layers: the Linear given is not a submodule of this Net"),
    ({"layer_pruning_ratios": {nn.Conv2d(3, 8, 3): 0.5}}, r"layer_pruning_ratios: the Conv2d given is not a submodule"),
    ({"iterative_steps": 0}, r"iterative_steps must be a positive int"),
])
def test_bad_arguments(kwargs, message):
    model = fresh()
    snap = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=message):
        StructuredPruner(model, X, **kwargs)
    assert_untouched(model, snap)


@pytest.mark.parametrize("bad", [1.2, -0.1, math.nan])
def test_schedule_entry_outside_range_is_rejected_before_any_change(bad):
    model = fresh()
    snap = snapshot(model)
    pruner = StructuredPruner(model, X, pruning_ratio=0.5, iterative_steps=2,
                              iterative_schedule=lambda step, steps, ratio: bad)
    with pytest.raises(ValueError, match=r"iterative_schedule returned .* for step 1 of 2; "
                                         r"it must return a ratio in \[0, 1\)"):
        pruner.step()
    assert_untouched(model, snap)
    assert pruner.history == [] and pruner.current_step == 0


@pytest.mark.parametrize("inputs, what", [
    (torch.randn(2, 4, 8, 8), r"\(2, 4, 8, 8\) float32"),
    (torch.randn(2, 3, 8), r"\(2, 3, 8\) float32"),
    (torch.randint(0, 3, (2, 3, 8, 8)), r"\(2, 3, 8, 8\) int64"),
    (torch.randn(2, 3, 8, 8, dtype=torch.float64), r"\(2, 3, 8, 8\) float64"),
])
def test_wrong_example_inputs_name_the_model_and_chain_the_error(inputs, what):
    model = fresh()
    snap = snapshot(model)
    with pytest.raises(cleanai.TraceError, match=r"Net failed on the example inputs \(" + what) as info:
        StructuredPruner(model, inputs)
    assert isinstance(info.value.__cause__, RuntimeError)  # the original error, chained
    assert str(info.value.__cause__) in str(info.value)
    assert_untouched(model, snap)
    assert all(not m.training for m in model.modules())


def test_model_without_prunable_layers_is_a_warned_no_op():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Flatten())  # only output channels
    snap = snapshot(model)
    with pytest.warns(UserWarning, match="Sequential has no channels CleanAI can prune"):
        pruner = StructuredPruner(model, torch.randn(1, 3, 2, 2), pruning_ratio=0.5)
    assert pruner.prune() is model
    assert_untouched(model, snap)
    assert pruner.history == [{"step": 1, "layers": []}]


class Scaled(nn.Module):
    """A custom layer with no LayerPruner whose op CleanAI cannot follow."""

    def forward(self, x):
        return Double.apply(x)


class Mixed(nn.Module):
    """A second custom layer with two different unknown ops."""

    def forward(self, x):
        return torch.special.i0e(Double.apply(x)) + torch.fft.fft(x, dim=1).real


class CustomNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.custom = Scaled()
        self.mixed = Mixed()
        self.c2 = nn.Conv2d(8, 8, 3)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.c1(x)
        x = self.custom(x) + self.mixed(x)
        return self.fc(self.c3(torch.relu(self.c2(x))).mean((2, 3)))


def test_custom_layers_without_pruner_are_protected_with_one_warning():
    model = CustomNet().eval()
    snap = snapshot(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = StructuredPruner(model, torch.randn(1, 3, 8, 8), pruning_ratio=0.5)
    texts = [str(w.message) for w in caught if "channel semantics" in str(w.message)]
    assert len(texts) == 1, texts
    assert "custom" in texts[0] and "mixed" in texts[0] and "protected" in texts[0]
    assert_untouched(model, snap)
    pruner.prune()
    assert model.c1.out_channels == 8  # protected: it feeds the unknown ops
    assert model.c2.out_channels == 4  # the rest is pruned
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 2)


def test_step_after_the_last_step_is_a_clear_error():
    model = fresh()
    pruner = StructuredPruner(model, X, pruning_ratio=0.5, iterative_steps=2)
    pruner.prune()
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="all 2 pruning steps are done; build a new StructuredPruner"):
        pruner.step()
    assert_untouched(model, snap)
    assert len(pruner.history) == 2


@pytest.mark.parametrize("change", ["reshaped", "replaced", "moved"])
def test_plan_for_a_changed_model_is_detected(change):
    model = fresh()
    pruner = StructuredPruner(model, X, pruning_ratio=0.5)
    plan = pruner.plan()
    if change == "reshaped":
        model.conv2 = nn.Conv2d(8, 32, 3, padding=1)
        model.fc = nn.Linear(32, 4)
    elif change == "replaced":  # the same shapes, but not the module that was traced
        model.conv1 = nn.Conv2d(8, 8, 3, padding=1)
    else:  # the traced module now lives under another name
        model.conv1, model.conv2 = nn.Conv2d(8, 8, 3, padding=1), model.conv2
        model.stem[0], model.conv1 = model.conv1, model.stem[0]
    snap = snapshot(model)
    with pytest.raises(cleanai.PruningError, match="model changed since its dependency graph was built"):
        pruner.apply(plan)
    assert_untouched(model, snap)


def _modes(model):
    return [(n, m.training) for n, m in model.named_modules()]


def test_training_modes_are_restored_after_pruning_and_after_errors():
    model = fresh().train()
    model.conv1.eval()  # a mixed state: one layer in eval mode, the BatchNorm training
    modes = _modes(model)
    running = model.stem[1].running_mean.clone()
    pruner = StructuredPruner(model, X, pruning_ratio=0.5)
    assert _modes(model) == modes
    pruner.calibrate([X, X])
    assert _modes(model) == modes
    pruner.prune()
    assert _modes(model) == modes
    keep = next(e["keep"] for e in pruner.history[0]["layers"] if e["name"] == "stem.1")
    assert torch.equal(model.stem[1].running_mean, running[keep])  # calibration left it alone
    with pytest.raises(cleanai.TraceError):
        StructuredPruner(model, torch.randn(2, 5, 8, 8))
    assert _modes(model) == modes
    hybrid = StructuredPruner(model, X, importance=WeightActivationImportance())
    with pytest.raises(RuntimeError):
        hybrid.calibrate([torch.randn(2, 5, 8, 8)])  # calibration runs in eval mode, then fails
    assert _modes(model) == modes


def test_training_modes_are_restored_after_a_failed_validation_forward():
    class Rigid(nn.Module):
        """Reads a channel count of its own: pruning its input breaks it."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            y = self.conv(x)
            return self.fc(y.view(y.shape[0], 8, -1).mean(2))

    model = Rigid().train()
    model.fc.eval()
    modes = _modes(model)
    snap = snapshot(model)
    pruner = StructuredPruner(model, torch.randn(2, 3, 4, 4), pruning_ratio=0.5)
    with pytest.raises(cleanai.PruningError, match=r"Rigid no longer runs after pruning: RuntimeError"):
        pruner.apply(pruner.plan())
    assert _modes(model) == modes
    assert_untouched(model, snap)


def test_hand_made_plans_that_cannot_apply_are_rejected_before_any_change():
    model = fresh()
    pruner = StructuredPruner(model, X, pruning_ratio=0.5)
    snap = snapshot(model)
    group = pruner.graph.group_of("conv2")[0]
    cases = [({group.id: list(range(group.size))}, f"removes all {group.size} channels"),
             ({group.id: [0, 0]}, "removes a channel of group .* twice"),
             ({group.id: [group.size]}, f"group {group.id} has {group.size} channels"),
             ({999: [0]}, "names group 999, which the graph does not have")]
    # a plan as long as the group gets the error of what is wrong with it, not "removes all";
    # with several groups, the error names the group at fault
    n, protected = group.size, next(g for g in pruner.graph.groups if bool(g.protected.all()))
    fine = next(g for g in pruner.graph.groups if g is not group and not bool(g.protected.any()))
    cases += [({group.id: [0] * n}, f"removes a channel of group {group.id} twice"),
              ({group.id: list(range(n - 1)) + [n]}, f"has {n} channels; the plan removes index {n}$"),
              ({group.id: [-1] + list(range(n - 1))}, "the plan removes index -1$"),
              ({fine.id: [0], protected.id: list(range(protected.size))},
               f"removes protected channels of group {protected.id} "),
              ({fine.id: [0, 1], group.id: [1, 1]}, f"removes a channel of group {group.id} twice")]
    for removals, message in cases:
        with pytest.raises(cleanai.PruningError, match=message):
            pruner.apply(cleanai.PruningPlan(pruner.graph, removals))
        assert_untouched(model, snap)
    other = StructuredPruner(fresh(), X, pruning_ratio=0.5)
    with pytest.raises(cleanai.PruningError, match="another pruner's graph"):
        pruner.apply(other.plan())
    assert_untouched(model, snap)
    assert pruner.history == []
