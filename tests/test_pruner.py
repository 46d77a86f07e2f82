import json

import pytest
import torch
import torchvision
from torch import nn

import cleanai
from cleanai import StructuredPruner
from cleanai.importance import RandomImportance
from cleanai.utils import count_params

from equivalence import check_equivalence


def _tv(name, **kw):
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, **kw).eval()


class ConcatChunkNet(nn.Module):
    """Concat, chunk, a residual add and a flatten into a Linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.mix = nn.Conv2d(24, 24, 1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.res = nn.Conv2d(24, 24, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24 * 4, 5)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        y = torch.relu(self.mix(y))
        parts = [self.shared(p) for p in y.chunk(3, dim=1)]
        y = torch.cat(parts, dim=1) + self.res(y)
        return self.fc(self.pool(y).flatten(1))


def test_resnet18_seed_example():
    model = _tv("resnet18")
    assert count_params(model) == 11_689_512
    pruner = StructuredPruner(model=model, pruning_ratio=0.35)
    pruner.prune()
    assert count_params(model) <= 6_500_000
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    assert model.fc.out_features == 1000


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "googlenet", "mobilenet_v2"])
def test_zero_weight_equivalence_torchvision(name):
    kw = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = _tv(name, **kw)
    x = torch.randn(2, 3, 96, 96)
    pruner = StructuredPruner(model, x, importance=RandomImportance(seed=0), pruning_ratio=0.4)
    check_equivalence(model, pruner, x)


def test_zero_weight_equivalence_concat_chunk_flatten_residual():
    torch.manual_seed(0)
    model = ConcatChunkNet().eval()
    x = torch.randn(2, 3, 8, 8)
    pruner = StructuredPruner(model, x, importance=RandomImportance(seed=1), pruning_ratio=0.5)
    check_equivalence(model, pruner, x)
    assert model.mix.in_channels < 24 and model.fc.in_features < 96


def test_iterative_steps_end_exactly_at_target():
    model = _tv("resnet18")
    pruner = StructuredPruner(model, torch.randn(1, 3, 224, 224), pruning_ratio=0.5,
                              iterative_steps=5)
    widths = []
    for _ in range(5):
        pruner.step()
        widths.append(model.layer1[0].conv1.out_channels)
    assert widths == [58, 52, 45, 39, 32]  # 64 - floor(64 * 0.1 * k) after step k
    assert model.layer3[0].conv1.out_channels == 128
    with pytest.raises(RuntimeError, match="all 5 pruning steps are done"):
        pruner.step()
    assert len(pruner.history) == 5
    json.dumps(pruner.history)


@pytest.mark.parametrize("global_pruning", [False, True])
def test_round_to_gives_multiples(global_pruning):
    model = _tv("resnet18")
    params = count_params(model)
    pruner = StructuredPruner(model, torch.randn(1, 3, 224, 224), pruning_ratio=0.3, round_to=8,
                              global_pruning=global_pruning)
    pruner.prune()
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m is not model.conv1:
            assert m.out_channels % 8 == 0, m
    assert count_params(model) < 0.8 * params


def test_layer_ratios_and_ignored_layers():
    model = _tv("resnet18")
    pruner = StructuredPruner(model, torch.randn(1, 3, 224, 224), pruning_ratio=0.25,
                              layer_pruning_ratios={model.layer4: 0.5, "layer1.0.conv1": 0.75},
                              ignored_layers=["layer2.0.conv1"])
    pruner.prune()
    assert model.layer4[0].conv1.out_channels == 256
    assert model.layer4[1].conv1.out_channels == 256
    assert model.layer1[0].conv1.out_channels == 16
    assert model.layer1[1].conv1.out_channels == 48
    assert model.layer2[0].conv1.out_channels == 128
    assert model.layer3[0].conv1.out_channels == 192


def test_mobilenet_seed_call():
    model = _tv("mobilenet_v2")
    pruner = StructuredPruner(model, layer_pruning_ratios={model.features[0]: 0.2,
                                                           model.features[-1]: 0.6})
    pruner.prune()
    assert model.features[0][0].out_channels == 26  # 32 - floor(32 * 0.2)
    assert model.features[-1][0].out_channels == 512  # 1280 - floor(1280 * 0.6)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_global_pruning_reaches_overall_ratio():
    model = _tv("resnet18")
    pruner = StructuredPruner(model, torch.randn(1, 3, 224, 224), pruning_ratio=0.4,
                              global_pruning=True, max_pruning_ratio=0.9)
    plan = pruner.plan()
    sizes = {g.id: g.size for g in pruner.graph.groups}
    total = sum(int(sizes[g] * 0.4) for g in sizes if pruner.graph.groups[g].prunable)
    assert plan.num_removed == total
    per_group = {g: len(i) / sizes[g] for g, i in plan.removals.items()}
    assert max(per_group.values()) <= 0.9 and len(set(round(v, 2) for v in per_group.values())) > 1
    pruner.apply(plan)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_weight_importance_prunes_smallest_norm_channels():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(6.0).unsqueeze(1).expand(6, 4) + 1)
        model[0].bias.zero_()
        model[2].weight.fill_(1.0)
    pruner = StructuredPruner(model, torch.randn(1, 4), pruning_ratio=0.5)
    plan = pruner.plan()
    assert plan.removals[0].tolist() == [0, 1, 2]
    pruner.apply(plan)
    assert model[0].weight[:, 0].tolist() == [4.0, 5.0, 6.0]


def test_plan_impact_does_not_touch_model():
    model = _tv("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = StructuredPruner(model, torch.randn(1, 3, 224, 224), pruning_ratio=0.5)
    impact = pruner.plan().impact(model)
    assert impact["params_before"] == 11_689_512
    assert impact["params_after"] < impact["params_before"] / 2
    assert impact["macs_after"] < impact["macs_before"] / 2
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    pruner.step()
    assert count_params(model) == impact["params_after"]


def test_injected_failure_restores_model_exactly():
    model = _tv("resnet18")
    x = torch.randn(1, 3, 224, 224)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attrs = {n: dict(vars(m)) for n, m in model.named_modules()}
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    plan = pruner.plan()
    bn = cleanai.core.layers.get_layer_pruner(model.bn1)
    real = type(bn).prune
    calls = []

    def flaky(self, module, in_keep, out_keep):
        calls.append(module)
        if len(calls) == 10:
            raise RuntimeError("injected")
        return real(self, module, in_keep, out_keep)

    type(bn).prune = flaky
    try:
        with pytest.raises(RuntimeError, match="injected"):
            pruner.apply(plan)
    finally:
        type(bn).prune = real
    assert len(calls) == 10
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    for n, m in model.named_modules():
        assert {k: v for k, v in vars(m).items()} == attrs[n], n
    assert pruner.history == []
    pruner.apply(plan)  # still usable
    assert model(x).shape == (1, 1000)


def test_history_replays_on_fresh_model():
    model = _tv("resnet18")
    x = torch.randn(1, 3, 224, 224)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5, iterative_steps=3)
    pruner.prune()
    fresh = _tv("resnet18")
    for entry in json.loads(json.dumps(pruner.history)):
        cleanai.replay(fresh, entry["layers"])
    assert fresh.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


@pytest.mark.parametrize("kwargs, message", [
    ({"pruning_ratio": 1.0}, r"pruning_ratio must be a number in \[0, 1\)"),
    ({"pruning_ratio": -0.1}, r"pruning_ratio must be a number in \[0, 1\)"),
    ({"layer_pruning_ratios": {"layer1.0.conv": 0.5}}, r"no layer named 'layer1.0.conv'; did you mean .*'layer1.0.conv1'"),
    ({"layer_pruning_ratios": {"fc": 1.5}}, r"layer_pruning_ratios\['fc'\] must be a number"),
    ({"ignored_layers": [nn.Linear(2, 2)]}, "not a submodule"),
    ({"iterative_steps": 0}, "iterative_steps must be a positive int"),
    ({"round_to": 0}, "round_to must be a positive int"),
])
def test_bad_arguments_leave_model_untouched(kwargs, message):
    model = _tv("resnet18")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        StructuredPruner(model, torch.randn(1, 3, 224, 224), **kwargs)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_plan_for_changed_model_is_rejected():
    model = _tv("resnet18")
    pruner = StructuredPruner(model, torch.randn(1, 3, 224, 224), pruning_ratio=0.5)
    plan = pruner.plan()
    model.fc = nn.Linear(512, 10)
    with pytest.raises(cleanai.PruningError, match="model changed"):
        pruner.apply(plan)


def test_cannot_infer_inputs_gives_clear_error():
    class NoLayers(nn.Module):
        def forward(self, x):
            return x * 2

    with pytest.raises(ValueError, match="pass example_inputs"):
        StructuredPruner(NoLayers())


class AuxNet(nn.Module):
    """An auxiliary head that runs only in training, with a BatchNorm on a 1x1 map."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, 4)
        self.aux = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8),
                                 nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        y = self.body(x)
        out = self.head(y.mean((2, 3)))
        return (out, self.aux(y)) if self.training else out


def test_training_only_branch_is_pruned_too():
    model = AuxNet().eval()
    x = torch.randn(1, 3, 8, 8)  # batch 1: train mode fails in aux BatchNorm, the tracer retries
    StructuredPruner(model, x, pruning_ratio=0.5).prune()
    assert model.aux[1].in_channels == model.body[0].out_channels == 8
    model.train()
    out, aux = model(torch.cat([x, x]))
    (out.sum() + aux.sum()).backward()  # no stale autograd state from the failed attempt
    assert out.shape == aux.shape == (2, 4)


class TrainScale(nn.Module):
    """A per-channel scale that only training uses: no layer, just a bare parameter."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.b = nn.Conv2d(8, 4, 3)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        y = torch.relu(self.a(x))
        if self.training:
            y = y * self.scale.view(1, -1, 1, 1)
        return self.b(y)


def test_parameter_used_only_in_training_is_pruned_too():
    model = TrainScale().eval()
    StructuredPruner(model, torch.randn(1, 3, 10, 10), pruning_ratio=0.5).prune()
    assert model.a.out_channels == model.scale.numel() == model.b.in_channels == 4
    assert model.train()(torch.randn(2, 3, 10, 10)).shape == (2, 4, 6, 6)


def test_model_with_nothing_to_prune_is_a_warned_no_op():
    model = nn.Sequential(nn.Linear(4, 3))  # its only channels are the model's outputs
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="no channels CleanAI can prune"):
        pruner = StructuredPruner(model, torch.randn(1, 4), pruning_ratio=0.5)
    pruner.prune()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
