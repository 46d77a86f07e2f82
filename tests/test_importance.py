"""Importances and calibration: statistics, rankings, hooks, memory."""
import pytest
import torch
from torch import nn

import cleanai
from cleanai import StructuredPruner
from cleanai.importance import (ActivationImportance, TaylorImportance, WeightActivationImportance,
                                WeightImportance)
from cleanai.utils import recalibrate_bn


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def batches(n, bs=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 6, generator=g), torch.randint(0, 3, (bs,), generator=g)) for _ in range(n)]


def hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_activation_statistics_match_brute_force():
    model = mlp()
    data = batches(4)
    imp = ActivationImportance(statistic="l2", normalizer=None)
    pruner = StructuredPruner(model, data[0][0], importance=imp)
    pruner.calibrate(data)
    acts = torch.cat([model[1](model[0](x)) for x, _ in data])  # what model[2] reads
    group = pruner.graph.group_of("0")[0]
    torch.testing.assert_close(imp.raw(group, model), acts.pow(2).mean(0).sqrt())
    for stat, expected in [("mean_abs", acts.abs().mean(0)), ("variance", acts.var(0, unbiased=False))]:
        other = ActivationImportance(statistic=stat, normalizer=None)
        other.calibrate(model, pruner.graph, data)
        torch.testing.assert_close(other.raw(group, model), expected, rtol=1e-4, atol=1e-6)


def test_dead_channel_scores_lowest_and_is_pruned_first():
    model = mlp()
    with torch.no_grad():
        model[0].weight[5].zero_()
        model[0].bias[5] = -1.0  # ReLU makes channel 5 always zero
    pruner = StructuredPruner(model, torch.randn(1, 6), importance=ActivationImportance(),
                              pruning_ratio=0.125)
    pruner.calibrate(batches(3))
    group = pruner.graph.group_of("0")[0]
    scores = pruner.importance(group, model)
    assert int(scores.argmin()) == 5 and float(scores[5]) == 0.0
    assert pruner.plan().removals[group.id].tolist() == [5]


def test_hybrid_with_alpha_one_ranks_as_weight_importance():
    model = mlp()
    hybrid = WeightActivationImportance(weight_ratio=1, activation_ratio=0)
    assert not hybrid.requires_data
    weight = WeightImportance()
    pruner = StructuredPruner(model, torch.randn(1, 6), importance=hybrid)
    for g in pruner.graph.groups:
        if g.prunable:
            assert torch.equal(hybrid(g, model).argsort(), weight(g, model).argsort())


def test_hybrid_mixes_normalised_terms():
    model = mlp()
    hybrid = WeightActivationImportance(weight_ratio=0.3, activation_ratio=0.7)
    pruner = StructuredPruner(model, torch.randn(1, 6), importance=hybrid)
    pruner.calibrate(batches(2))
    g = pruner.graph.group_of("2")[0]
    w = WeightImportance()(g, model)
    a = ActivationImportance()
    a.calibrate(model, pruner.graph, batches(2))
    torch.testing.assert_close(hybrid(g, model), 0.3 * w + 0.7 * a(g, model))
    product = WeightActivationImportance(mode="product", normalizer=None)
    product.calibrate(model, pruner.graph, batches(2))
    torch.testing.assert_close(product(g, model),
                               WeightImportance(normalizer=None)(g, model) *
                               ActivationImportance(normalizer=None).__class__.raw(a, g, model))


@pytest.mark.parametrize("imp", [ActivationImportance(), WeightActivationImportance(),
                                 TaylorImportance()], ids=repr)
def test_data_dependent_importance_needs_calibrate(imp):
    pruner = StructuredPruner(mlp(), torch.randn(1, 6), importance=imp)
    with pytest.raises(RuntimeError, match=r"call pruner.calibrate\(data\)"):
        pruner.plan()


def test_no_hooks_left_after_calibrate_even_on_error():
    model = mlp()
    pruner = StructuredPruner(model, torch.randn(1, 6), importance=WeightActivationImportance())
    assert hook_count(model) == 0

    def broken():
        yield batches(1)[0]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        pruner.calibrate(broken())
    assert hook_count(model) == 0
    pruner.calibrate(batches(2), max_batches=1)
    assert hook_count(model) == 0


def test_statistics_memory_does_not_grow_with_batches():
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    model = mlp()
    imp = ActivationImportance()
    pruner = StructuredPruner(model, torch.randn(1, 6), importance=imp)
    data = batches(100, bs=64)
    pruner.calibrate(data[:10])
    size10 = sum(t.numel() for t in imp.stats.sums.values())
    before = rss()
    pruner.calibrate(data)
    size100 = sum(t.numel() for t in imp.stats.sums.values())
    assert size10 == size100
    assert rss() - before < 20 * 2 ** 20


def test_taylor_uses_gradients_and_leaves_grads_alone():
    model = mlp()
    marker = torch.full_like(model[0].weight, 7.0)
    model[0].weight.grad = marker.clone()
    imp = TaylorImportance()
    pruner = StructuredPruner(model, torch.randn(1, 6), importance=imp, pruning_ratio=0.5,
                              iterative_steps=2)
    pruner.calibrate(batches(3))
    assert torch.equal(model[0].weight.grad, marker) and model[2].weight.grad is None
    g = pruner.graph.group_of("0")[0]
    # a channel whose outgoing weights are zero has zero gradient on its incoming weights
    with torch.no_grad():
        model[2].weight[:, 3] = 0
    imp.calibrate(model, pruner.graph, batches(3))
    assert int(imp(g, model).argmin()) == 3
    pruner.step()
    with pytest.raises(RuntimeError, match="calibrate"):
        pruner.plan()


def test_statistics_follow_iterative_steps():
    model = mlp()
    imp = ActivationImportance()
    pruner = StructuredPruner(model, torch.randn(1, 6), importance=imp, pruning_ratio=0.5,
                              iterative_steps=2)
    pruner.calibrate(batches(3))
    pruner.step()
    assert imp.stats.sums["2"].shape[1] == model[2].in_features == 6
    pruner.step()
    assert model[2].in_features == 4


def test_recalibrate_bn_estimates_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    data = [torch.randn(8, 3, 5, 5) * 3 + 1 for _ in range(4)]
    assert recalibrate_bn(model, data) == 4
    feats = torch.cat([model[0](x) for x in data])
    torch.testing.assert_close(model[1].running_mean, feats.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert model[1].momentum == 0.1 and not model.training


def test_recalibrate_bn_with_no_batches_keeps_the_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[1].running_mean.fill_(5)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(model, [])
    assert torch.equal(model[1].running_mean, torch.full((4,), 5.0))


def test_calibration_keeps_only_the_sums_its_statistic_reads():
    from cleanai.importance.stats import ActivationStats
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    data = [torch.randn(8, 4) for _ in range(3)]
    graph = cleanai.DependencyGraph(model, data[0])
    full = ActivationImportance("variance")
    lean = ActivationImportance("l2")
    full.calibrate(model, graph, data)
    lean.calibrate(model, graph, data)
    assert lean.stats.kept == ("sum_sq",) and full.stats.kept == ("sum", "sum_sq")
    group = graph.groups[0]
    # the l2 score is the same whichever sums were kept alongside
    everything = ActivationImportance("l2")
    from cleanai.importance.stats import collect
    assert everything.adopt(collect(model, graph, data))
    torch.testing.assert_close(lean.raw(group, model), everything.raw(group, model))
    with pytest.raises(ValueError, match="'mean_abs' statistic reads .*calibrate again"):
        lean.stats.per_position("2", "mean_abs")
    assert not ActivationImportance("mean_abs").adopt(lean.stats)  # collects its own instead
    with pytest.raises(ValueError, match="moments must be among"):
        ActivationStats(moments=("sum", "cube"))


def test_padded_positions_never_reach_the_sums_and_empty_batches_add_nothing():
    from cleanai.importance.stats import ActivationStats
    stats = ActivationStats()
    x = torch.randn(2, 4, 5)
    x[1, 3] = float("nan")  # a padded position may hold anything
    stats.mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    stats.update("a", x, 2)
    real = x[stats.mask]
    torch.testing.assert_close(stats.sums["a"][0].float(), real.sum(0))
    torch.testing.assert_close(stats.sums["a"][1].float(), (real * real).sum(0))
    assert stats.positions("a") == 7.0
    stats.mask = None
    stats.update("b", torch.randn(0, 3, 4, 4), 1)  # an empty last batch
    assert "b" not in stats.sums
