"""Model outputs pruned on request: a backbone whose outputs feed a head the user retrains or
replaces. Outputs stay protected by default; ``prune_outputs`` (all, or named layers) or a
layer named in ``layer_pruning_ratios`` lets them narrow, and the plan and history say so."""
import warnings

import pytest
import torch
from torch import nn

import cleanai
from cleanai import PruningPlan, StructuredPruner, load_pruned, save_pruned
from cleanai.utils import read_pruned_info


class Pyramid(nn.Module):
    """An FPN-style backbone: three feature maps, one per stage."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.c4 = nn.Conv2d(32, 64, 3, stride=2, padding=1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        a = torch.relu(self.c2(x))
        b = torch.relu(self.c3(a))
        return [a, b, torch.relu(self.c4(b))]


X = torch.randn(1, 3, 32, 32)


def _pyramid():
    torch.manual_seed(0)
    return Pyramid().eval()


def _widths(model):
    return [t.shape[1] for t in model(X)]


def test_outputs_stay_by_default():
    model = _pyramid()
    pruner = StructuredPruner(model, X, pruning_ratio=0.5)
    plan = pruner.step()
    assert _widths(model) == [16, 32, 64] and model.stem.out_channels == 8
    assert plan.outputs == [] and "outputs" not in pruner.history[0]
    assert "model outputs" not in plan.summary()


def test_prune_outputs_true_narrows_every_output_and_says_so(tmp_path):
    model = _pyramid()
    pruner = StructuredPruner(model, X, pruning_ratio=0.5, prune_outputs=True)
    assert "output 16: model output, prunable on request" in repr(pruner.graph.group_of("c2")[1])
    plan = pruner.step()
    assert _widths(model) == [8, 16, 32]
    assert plan.summary().splitlines()[-1] == (
        "  model outputs narrowed on request: c2 16 -> 8, c3 32 -> 16, c4 64 -> 32")
    assert pruner.history[0]["outputs"] == [{"layer": "c2", "before": 16, "after": 8},
                                            {"layer": "c3", "before": 32, "after": 16},
                                            {"layer": "c4", "before": 64, "after": 32}]
    save_pruned(model, tmp_path)
    assert read_pruned_info(tmp_path)["steps"][0]["outputs"] == pruner.history[0]["outputs"]
    loaded = load_pruned(Pyramid, tmp_path).eval()
    for a, b in zip(loaded(X), model(X)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["prune_outputs", "module", "layer_pruning_ratios"])
def test_one_named_output_narrows_and_the_others_stay(how):
    model = _pyramid()
    kw = {"prune_outputs": ["c3"] if how == "prune_outputs" else [model.c3]} \
        if how != "layer_pruning_ratios" else {"layer_pruning_ratios": {"c3": 0.25}}
    pruner = StructuredPruner(model, X, pruning_ratio=0.5, **kw)
    plan = pruner.step()
    c3 = 24 if how == "layer_pruning_ratios" else 16
    assert _widths(model) == [16, c3, 64]
    assert model.stem.out_channels == 8  # the inner group is pruned as usual
    assert plan.outputs == [{"layer": "c3", "before": 32, "after": c3}]


def test_naming_a_container_in_layer_pruning_ratios_does_not_free_outputs():
    """Only the output's own layer, named exactly, is an explicit request: a ratio for a
    container (or the whole model) keeps meaning its inside."""
    model = nn.Sequential(_pyramid())
    pruner = StructuredPruner(model, X, pruning_ratio=0.2, layer_pruning_ratios={"0": 0.5})
    pruner.step()
    assert _widths(model) == [16, 32, 64] and model[0].stem.out_channels == 8


def test_a_hand_made_plan_on_an_output_is_refused_unless_asked():
    model = _pyramid()
    pruner = StructuredPruner(model, X)
    group = pruner.graph.group_of("c4")[1]
    with pytest.raises(cleanai.PruningError, match=r"protected channels of group \d+ "
                                                   r"\(model output\)"):
        pruner.apply(PruningPlan(pruner.graph, {group.id: [0, 1]}))
    pruner = StructuredPruner(model, X, prune_outputs=[model.c4])
    group = pruner.graph.group_of("c4")[1]
    plan = PruningPlan(pruner.graph, {group.id: [0, 1]})
    pruner.apply(plan)
    assert _widths(model) == [16, 32, 62] and plan.outputs[0]["after"] == 62


def test_prune_outputs_is_checked():
    model = _pyramid()
    with pytest.raises(TypeError, match="prune_outputs must be True, False or a list"):
        StructuredPruner(model, X, prune_outputs=3)
    with pytest.raises(ValueError, match="prune_outputs: Pyramid has no layer named 'c5'"):
        StructuredPruner(model, X, prune_outputs=["c5"])


def test_a_classifier_head_to_be_replaced():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 10))
    x = torch.randn(2, 8)
    StructuredPruner(model, x, pruning_ratio=0.5, layer_pruning_ratios={"2": 0.5}).step()
    assert model(x).shape == (2, 5) and model[0].out_features == 16


def test_timm_features_only_backbone_with_prune_outputs_round_trips(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", features_only=True, pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    dense = [t.shape[1] for t in model(x)]
    assert dense == [64, 64, 128, 256, 512]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to fall back on
        pruner = StructuredPruner(model, x, pruning_ratio=0.5, prune_outputs=True)
        pruner.step()
    assert [t.shape[1] for t in model(x)] == [32, 32, 64, 128, 256]
    assert {o["layer"] for o in pruner.history[0]["outputs"]} == {
        "conv1", "layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2"}
    save_pruned(model, tmp_path)
    loaded = load_pruned(lambda: timm.create_model("resnet18", features_only=True,
                                                   pretrained=False).eval(), tmp_path)
    for a, b in zip(loaded(x), model(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
