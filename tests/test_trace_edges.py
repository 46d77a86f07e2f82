"""Tracer edge cases: a layer error the forward catches, a layer's weight used again after the
layer ran, and the layer lookup cache with torch.fx's per-model classes."""
import gc
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

import cleanai
from cleanai import StructuredPruner


class CaughtError(nn.Module):
    """A probe layer raises on the wrong width and the forward goes on; then a constant
    per-channel offset is added (a plain tensor attribute, not a buffer CleanAI could slice),
    which pins the conv's channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.probe = nn.Linear(5, 2)
        self.b = nn.Conv2d(8, 4, 1)
        self.offset = torch.arange(8.0).view(8, 1, 1)

    def forward(self, x):
        y = self.a(x)
        try:
            self.probe(y)
        except RuntimeError:
            pass
        return self.b(y + self.offset)


def test_a_layer_error_caught_by_the_forward_keeps_operand_shapes_recorded():
    torch.manual_seed(0)
    model, x = CaughtError().eval(), torch.randn(2, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # probe "did not run"
        pruner = StructuredPruner(model, x, pruning_ratio=0.5)
        pruner.step()
    group = next(g for g in pruner.graph.groups if any(m.name == "a" for m in g.members))
    assert group.protected.all() and "AddBackward0" in next(iter(group.reasons))
    assert model.a.out_channels == 8 and model(x).shape == (2, 4, 4, 4)


class RanThenFunctional(nn.Module):
    """``a`` runs, and its weight is used again by ``F.linear`` on another path."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 3), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) + self.c(F.linear(x, self.a.weight))


def test_weight_of_a_layer_that_ran_used_again_keeps_its_outputs():
    torch.manual_seed(0)
    model, x = RanThenFunctional().eval(), torch.randn(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nothing left to prune
        pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    group = next(g for g in pruner.graph.groups if any(m.name == "a" for m in g.members))
    assert group.protected.all()
    pruner.step()
    assert model.a.out_features == 16 and model(x).shape == (2, 3)


def test_layer_lookups_do_not_keep_torch_fx_classes_alive():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    gm = torch.fx.symbolic_trace(model)
    cls = weakref.ref(type(gm))  # torch.fx makes one class per GraphModule
    assert len(cleanai.DependencyGraph(gm, torch.randn(1, 3, 4, 4)).groups) == 2
    del gm
    gc.collect()
    assert cls() is None


class WithBilinear(nn.Module):
    """An unsupported layer (named by its own hooks) and nothing else unknown."""

    def __init__(self):
        super().__init__()
        self.a, self.bil = nn.Linear(4, 6), nn.Bilinear(6, 6, 3)
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        h = self.a(x)
        return self.bil(h, h)


def test_an_unsupported_layer_is_named_without_a_second_forward():
    model = WithBilinear().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = cleanai.DependencyGraph(model, torch.randn(2, 4))
    assert model.forwards == 1
    assert [str(w.message).split(";")[0] for w in caught] == \
        ["CleanAI does not know the channel semantics of Bilinear (in bil)"]
    assert graph.groups[0].protected.all()
