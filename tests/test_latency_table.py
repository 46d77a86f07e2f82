"""The latency lookup table of latency budgets: layer grids, predictions, and the budget loop,
on a deterministic clock (no timing is asserted)."""
import pytest
import torch
from torch import nn

from cleanai import StructuredPruner
from cleanai.budget import LatencyTable
from cleanai.pruner.budget import BudgetError

from conftest import model_seconds as _model_seconds


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 96), nn.ReLU(), nn.Linear(96, 128), nn.ReLU(),
                         nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def test_table_predicts_any_plan_exactly_once_fitted(fake_clock):
    rest, _ = fake_clock
    model, x = _mlp(), torch.randn(4, 32)
    pruner = StructuredPruner(model, x, target_latency=0.5)
    table = pruner.latency_table
    assert isinstance(table, LatencyTable)
    grids = table.layers
    assert set(grids) == {"0", "2", "4", "6"}
    assert grids["0"]["in"] == [1.0] and len(grids["0"]["out"]) == 4  # the input is not pruned
    assert len(grids["2"]["in"]) == 4 and len(grids["2"]["out"]) == 4
    assert grids["6"]["out"] == [1.0]  # the model's output keeps its width
    dense_s = _model_seconds(model, rest[0])
    # one timing: proportional to the layers
    table.observe({}, dense_s)
    assert table.predict({}) == pytest.approx(dense_s)
    g = pruner.graph.groups
    plans = [{g[0].id: torch.arange(40)}, {g[1].id: torch.arange(0, 128, 2)},
             {g[0].id: torch.arange(10), g[1].id: torch.arange(77), g[2].id: torch.arange(5)}]
    first = pruner.pruned_copy(cleanai_plan(pruner, plans[0]), compensate=False)
    table.observe(plans[0], _model_seconds(first, rest[0]))
    for removals in plans:  # bilinear grids + a line through two timings: exact
        pruned = pruner.pruned_copy(cleanai_plan(pruner, removals), compensate=False)
        assert table.predict(removals) == pytest.approx(_model_seconds(pruned, rest[0]),
                                                        rel=1e-9)


def cleanai_plan(pruner, removals):
    from cleanai import PruningPlan
    return PruningPlan(pruner.graph, removals, 1)


def test_latency_budget_is_met_with_few_timed_candidates(fake_clock):
    rest, calls = fake_clock
    model, x = _mlp(), torch.randn(4, 32)
    dense_s = _model_seconds(model, rest[0])
    plan = StructuredPruner(model, x, target_latency=0.5).step()
    row = plan.budget.rows["latency"]
    assert row["dense"] == pytest.approx(dense_s)
    assert row["measured"] == pytest.approx(_model_seconds(model, rest[0]))  # what was applied
    assert row["measured"] <= 0.5 * dense_s * 1.03
    assert row["measured"] >= 0.5 * dense_s * 0.97
    assert row["predicted"] == pytest.approx(row["measured"], rel=1e-6)
    assert sum(c is not None for c in calls) <= 2  # the table found it; no search by timing


def test_unreachable_latency_says_so_and_leaves_the_model(fake_clock):
    rest, _ = fake_clock
    rest[0] = 1.0  # a fixed second no channel can save
    model, x = _mlp(), torch.randn(4, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetError, match="latency .* of the model .*as timed on this device"):
        StructuredPruner(model, x, target_latency=0.5).step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_table_times_convs_norms_and_skips_nothing_it_can_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
                          nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    x = torch.randn(2, 3, 8, 8)
    table = LatencyTable(model, StructuredPruner(model, x, target_latency=0.5).cost_model,
                         repeats=1)
    grids = table.layers
    assert set(grids) == {"0", "1", "3", "5", "7"}
    assert grids["1"]["in"] == [1.0] and len(grids["1"]["out"]) == 4  # a norm: one axis
    assert grids["3"]["in"] == [1.0] and len(grids["3"]["out"]) == 4  # depthwise: one axis
    assert len(grids["7"]["in"]) == 4  # the flattened input follows the conv's channels
    assert all(s > 0 for g in grids.values() for row in g["seconds"] for s in row)
    with pytest.raises(ValueError, match="repeats"):
        LatencyTable(model, table.cost_model, repeats=0)


def test_a_grid_point_slowed_by_a_busy_moment_is_timed_again():
    from cleanai.budget.latency import _retime_outliers
    true = [[(i + 1) * (j + 1) * 1e-4 for j in range(4)] for i in range(4)]
    grid = [row[:] for row in true]
    grid[3][3] *= 7  # the corner, measured while something else ran
    grid[0][2] *= 5  # an edge point
    again = []

    def timed(i, j):
        again.append((i, j))
        return true[i][j]

    _retime_outliers(grid, timed)
    assert sorted(again) == [(0, 2), (3, 3)]
    assert sum(grid, []) == pytest.approx(sum(true, []))
