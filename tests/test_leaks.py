"""No leaks: after building a graph, calibrating and pruning, no hook is left on any module,
nothing the library made keeps the model alive, and process memory stays flat over many cycles.

The default run does 10 cycles; ``pytest -m slow tests/test_leaks.py`` does 100.
"""
import copy
import gc
import os
import warnings
import weakref

import pytest
import torch
from torch import nn

import cleanai
from cleanai import StructuredPruner
from cleanai.importance import WeightActivationImportance

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
              "_forward_hooks_always_called", "_state_dict_hooks", "_load_state_dict_pre_hooks")


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class SmallResNet(nn.Module):
    """A ResNet-like model: 8 residual blocks, 4 stages, about 0.7M parameters."""

    def __init__(self, width=16, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        blocks, c = [], width
        for i, w in enumerate((width, width * 2, width * 4, width * 8)):
            blocks += [Block(c, w, 1 if i == 0 else 2), Block(w, w, 1)]
            c = w
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


X = torch.randn(2, 3, 16, 16)
BATCHES = [torch.randn(4, 3, 16, 16) for _ in range(3)]


def hooks_left(model):
    """``module name.hook dict`` for every non-empty hook dict, and PyTorch's global hooks."""
    left = [f"{n}.{d}" for n, m in model.named_modules() for d in HOOK_DICTS
            if len(getattr(m, d, {}))]
    g = torch.nn.modules.module
    for d in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
              "_global_backward_pre_hooks"):
        if len(getattr(g, d, {})):
            left.append(d)
    return left


def cycle(importance=None):
    """Build, calibrate, prune one fresh model; weak references to what should go away."""
    torch.manual_seed(0)
    model = SmallResNet().eval()
    importance = importance or WeightActivationImportance(weight_ratio=0.5, activation_ratio=0.5)
    pruner = StructuredPruner(model, X, importance=importance, pruning_ratio=0.4)
    pruner.calibrate(BATCHES)
    pruner.prune()
    assert model(X).shape == (2, 10)
    assert hooks_left(model) == []
    refs = [weakref.ref(o) for o in (model, pruner, pruner.graph, model.stem[0].weight)]
    return refs


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _tensors():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on some torch modules' deprecated names
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def run_cycles(n):
    shared = WeightActivationImportance(weight_ratio=0.5, activation_ratio=0.5)
    rss, tensors = [], []
    for i in range(n):
        refs = cycle(shared if i % 2 else None)  # an importance reused across models, too
        gc.collect()
        dead = [r() is None for r in refs]
        assert all(dead), f"cycle {i}: model, pruner, graph, weight alive: {dead}"
        rss.append(rss_mb())
        tensors.append(_tensors())
    warm = max(2, n // 5)
    # a generous bound: allocator noise only, never a model per cycle (one model is ~3 MB)
    assert rss[-1] - rss[warm] < 20 + 0.1 * n, rss
    assert tensors[-1] <= tensors[warm], tensors  # no tensor survives its cycle
    return rss


def test_ten_cycles_leave_no_hooks_no_references_flat_memory():
    run_cycles(10)


@pytest.mark.slow
def test_hundred_cycles_leave_no_hooks_no_references_flat_memory():
    run_cycles(100)


def test_a_graph_does_not_keep_its_model_alive():
    model = SmallResNet()
    graph = cleanai.DependencyGraph(model, X)
    assert graph.modules["fc"] is model.fc  # usable while the model lives
    plan_groups = len(graph.groups)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    assert len(graph.groups) == plan_groups and "SmallResNet" in repr(graph)
    with pytest.raises(ReferenceError, match="SmallResNet this DependencyGraph was built for has "
                                             "been garbage collected"):
        graph.modules["fc"]
    with pytest.raises(ReferenceError):
        graph.to_dot()


def test_a_plan_does_not_keep_its_model_alive():
    model = SmallResNet()
    pruner = StructuredPruner(model, X, pruning_ratio=0.3)
    plan = pruner.plan()
    ref = weakref.ref(model)
    del model, pruner
    gc.collect()
    assert ref() is None
    assert plan.num_removed > 0 and "PruningPlan" in plan.summary()


def test_hooks_are_removed_when_calibration_or_tracing_fails():
    model = SmallResNet()
    pruner = StructuredPruner(model, X, importance=WeightActivationImportance(), pruning_ratio=0.3)

    def broken():
        yield BATCHES[0]
        raise RuntimeError("data loader died")

    with pytest.raises(RuntimeError, match="data loader died"):
        pruner.calibrate(broken())
    assert hooks_left(model) == []
    with pytest.raises(RuntimeError):
        pruner.calibrate([torch.randn(2, 5, 16, 16)])  # wrong channels: the forward fails
    assert hooks_left(model) == []
    with pytest.raises(cleanai.TraceError):
        StructuredPruner(model, torch.randn(2, 5, 16, 16))  # every trace attempt fails
    assert hooks_left(model) == []


def test_a_copied_pruner_prunes_its_own_copy():
    model = SmallResNet().eval()
    pruner = StructuredPruner(model, X, pruning_ratio=0.5)
    twin = copy.deepcopy(pruner)
    assert twin.graph.modules["fc"] is twin.model.fc is not model.fc
    twin.prune()
    assert twin.model.stem[0].out_channels == 8 and model.stem[0].out_channels == 16
    pruner.prune()
    assert torch.equal(model.stem[0].weight, twin.model.stem[0].weight)
