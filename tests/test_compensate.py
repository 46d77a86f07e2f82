"""Closed-form compensation (``StructuredPruner(compensate=...)``): exact where the removed
channels are linear in the kept ones, least squares otherwise, atomic, saved and replayed."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cleanai
from cleanai.importance import WeightActivationImportance


def _prune(model, x, removals, mode, **kw):
    """Prune ``removals`` ({group id: channels}) from ``model`` with compensation ``mode``."""
    pruner = cleanai.StructuredPruner(model, x[:1], compensate=mode, **kw)
    pruner.calibrate([x])
    plan = pruner.plan()
    plan.removals = {g: torch.as_tensor(i) for g, i in removals.items()}
    pruner.apply(plan)
    return pruner


def _group_of(pruner_or_model, x, layer):
    graph = cleanai.DependencyGraph(pruner_or_model, x[:1])
    return next(g.id for g in graph.groups if any(m.name == layer and m.kind == "out"
                                                   for m in g.members))


def _mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    with torch.no_grad():  # hidden unit 3 = 2 * unit 0 - unit 1, exactly
        m[0].weight[3] = 2 * m[0].weight[0] - m[0].weight[1]
        m[0].bias[3] = 2 * m[0].bias[0] - m[0].bias[1]
    return m


def test_lstsq_is_exact_when_a_removed_channel_is_a_combination_of_kept_ones():
    m, x = _mlp(), torch.randn(256, 8)
    ref = m(x).detach()
    _prune(m, x, {0: [3]}, "lstsq")
    assert m[1].in_features == 5
    torch.testing.assert_close(m(x), ref, atol=1e-4, rtol=1e-4)


def test_lstsq_is_exact_for_a_3x3_conv_reading_a_combined_channel():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.Conv2d(6, 5, 3, padding=1))
    with torch.no_grad():
        m[0].weight[4] = 0.5 * m[0].weight[0] + 1.5 * m[0].weight[2]
    x = torch.randn(16, 3, 10, 10)
    ref = m(x).detach()
    _prune(m, x, {0: [4]}, "lstsq")
    assert m[1].weight.shape == (5, 5, 3, 3)
    torch.testing.assert_close(m(x), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", [None, "bias", "lstsq"])
def test_removing_a_dead_channel_changes_nothing(mode):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1),
                      nn.Flatten(), nn.Linear(4 * 36, 5))
    with torch.no_grad():
        m[0].weight[2].zero_()
        m[0].bias[2] = -1.0  # ReLU(-1) = 0 everywhere: a dead channel
    x = torch.randn(32, 3, 6, 6)
    ref = m(x).detach()
    pruner = cleanai.StructuredPruner(m, x[:1], compensate=mode)
    pruner.calibrate([x])
    plan = pruner.plan()
    plan.removals = {_group_of(copy.deepcopy(m), x, "0"): torch.tensor([2])}
    pruner.apply(plan)
    assert m[2].in_channels == 7
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)


def test_lstsq_on_a_linear_equals_a_direct_least_squares_fit():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 3))
    x = torch.randn(4000, 10)
    hidden = torch.tanh(m[0](x)).detach()
    target = m[2](hidden).detach()
    kept = [i for i in range(12) if i not in (1, 5, 7)]
    design = torch.cat([hidden[:, kept], torch.ones(len(x), 1)], 1).double()
    solution = torch.linalg.lstsq(design, target.double()).solution  # [10, 3]
    _prune(m, x, {0: [1, 5, 7]}, "lstsq")
    torch.testing.assert_close(m[2].weight.double(), solution[:-1].T, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(m[2].bias.double(), solution[-1], atol=1e-4, rtol=1e-3)


def test_bias_mode_adds_the_removed_mean_and_creates_a_bias_that_saves(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False))
    x = torch.randn(32, 3, 6, 6)
    ref = m(x).detach()
    plain = copy.deepcopy(m)
    gid = _group_of(copy.deepcopy(m), x, "0")
    pruner = _prune(m, x, {gid: [0, 3, 6]}, "bias")
    _prune(plain, x, {gid: [0, 3, 6]}, None)
    assert m[2].bias is not None and m[2].bias.shape == (4,)
    assert pruner.compensation[-1].added_bias == ["2"]
    # the mean of each output is kept: the bias took the removed channels' mean contribution
    torch.testing.assert_close(m(x).mean((0, 2, 3)), ref.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)
    assert (m(x) - ref).pow(2).mean() < (plain(x) - ref).pow(2).mean()
    cleanai.save_pruned(m, tmp_path / "p")
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False))
    loaded = cleanai.load_pruned(fresh, tmp_path / "p")
    torch.testing.assert_close(loaded(x), m(x))


def test_iterative_steps_follow_the_statistics_and_beat_no_compensation():
    torch.manual_seed(0)

    def make():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                             nn.Linear(64, 8))
    x, held_out = torch.randn(2048, 16), torch.randn(512, 16)
    dense = make()
    errors = {}
    for mode in (None, "lstsq"):
        m = make()
        pruner = cleanai.StructuredPruner(m, x[:1], pruning_ratio=0.5, iterative_steps=2,
                                          compensate=mode,
                                          importance=WeightActivationImportance())
        pruner.calibrate([x])
        pruner.prune()
        assert m[2].in_features == 32 and m[4].in_features == 32
        with torch.no_grad():
            errors[mode] = float((m(held_out) - dense(held_out)).pow(2).mean())
        if mode:
            assert len(pruner.compensation) == 2
            assert pruner.input_stats.moments("2")[1].shape == (32, 32)
    assert errors["lstsq"] < 0.5 * errors[None]


def test_attention_heads_and_lstm_inputs_are_compensated():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.up = nn.Linear(16, 24)
            self.lstm = nn.LSTM(24, 8, batch_first=True)

        def forward(self, x):
            h = x + self.attn(x, x, x, need_weights=False)[0]
            return self.lstm(torch.relu(self.up(h)))[0]

    x = torch.randn(64, 5, 16)
    dense = Net()
    errs = {}
    for mode in (None, "lstsq"):
        m = copy.deepcopy(dense)
        pruner = cleanai.StructuredPruner(m, x[:1], pruning_ratio=0.25, compensate=mode,
                                          kinds=["heads", "channels"])
        pruner.calibrate([x])
        pruner.step()
        assert m.attn.num_heads == 3 and m.lstm.input_size == 18
        if mode:
            assert {"attn", "lstm"} <= set(pruner.compensation[-1].compensated)
        with torch.no_grad():
            errs[mode] = float((m(x) - dense(x)).pow(2).mean())
    assert errs["lstsq"] < errs[None]


def test_step_without_calibration_fails_and_leaves_the_model_untouched():
    m, x = _mlp(), torch.randn(8, 8)
    before = copy.deepcopy(m.state_dict())
    pruner = cleanai.StructuredPruner(m, x[:1], compensate="lstsq")
    with pytest.raises(RuntimeError, match="calibrate"):
        pruner.step()
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="compensate"):
        cleanai.StructuredPruner(m, x[:1], compensate="ridge")


def test_failed_step_rolls_back_the_compensated_weights():
    m, x = _mlp(), torch.randn(64, 8)
    before = copy.deepcopy(m.state_dict())
    pruner = cleanai.StructuredPruner(m, x[:1], compensate="lstsq")
    pruner.calibrate([x])
    plan = pruner.plan()
    plan.removals = {0: torch.arange(6)}  # every channel: refused
    with pytest.raises(cleanai.PruningError):
        pruner.apply(plan)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_one_calibration_pass_feeds_the_hybrid_score_and_compensation():
    m, x = _mlp(), torch.randn(64, 8)
    calls = []
    m.register_forward_pre_hook(lambda mod, args: calls.append(1))
    pruner = cleanai.StructuredPruner(m, x[:1], compensate="lstsq",
                                      importance=WeightActivationImportance())
    calls.clear()
    pruner.calibrate([x, x])
    assert len(calls) == 2  # two batches, one pass
    assert pruner.importance.activation.stats is pruner.input_stats
    pruner.step()
    assert all(not mod._forward_pre_hooks for mod in m[0:2])


def test_too_few_samples_are_damped_with_one_warning():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))
    x = torch.randn(6, 4)  # 6 samples for 32 channels: a singular second moment
    pruner = cleanai.StructuredPruner(m, x[:1], compensate="lstsq", pruning_ratio=0.25)
    pruner.calibrate([x])
    with pytest.warns(UserWarning, match="singular") as caught:
        pruner.step()
    assert len([w for w in caught if "singular" in str(w.message)]) == 1
    assert "2" in pruner.compensation[-1].damped
    assert torch.isfinite(m(x)).all()


def test_report_shows_fidelity_to_the_dense_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 5))
    x = torch.randn(64, 8)
    pruner = cleanai.StructuredPruner(m, x[:1], compensate="lstsq", keep_teacher=True)
    before = cleanai.utils.snapshot(m, x[:1], latency=False)
    pruner.calibrate([x])
    pruner.step()
    rep = cleanai.utils.report(before, m, x[:1], latency=False, teacher=pruner.teacher, data=[x])
    f = rep.fidelity
    assert 0 < f["cosine"] < 1 and 0 <= f["agreement"] <= 1
    assert "fidelity to the dense model" in str(rep)
    assert cleanai.utils.Report.from_dict(rep.to_dict()).fidelity == f
    assert pruner.teacher[0].out_features == 32 and m[0].out_features == 16


def test_obs_importance_removes_the_redundant_channel_and_lstsq_makes_it_free():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    with torch.no_grad():  # units 0, 1 and 3 are linearly dependent (3 = 2 * 0 - 1) and large
        m[0].weight[3] = 2 * m[0].weight[0] - m[0].weight[1]
        m[0].bias[3] = 2 * m[0].bias[0] - m[0].bias[1]
        m[1].weight[:, [0, 1, 3]] *= 10
    x = torch.randn(512, 8)
    ref = m(x).detach()
    pruner = cleanai.StructuredPruner(m, x[:1], pruning_ratio=0.2, compensate="lstsq",
                                      importance=cleanai.importance.OBSImportance())
    pruner.calibrate([x])
    assert pruner.importance.stats is pruner.input_stats  # one pass
    plan = pruner.plan()
    assert plan.removals[0].tolist()[0] in (0, 1, 3)  # a redundant one, though the largest
    pruner.apply(plan)
    torch.testing.assert_close(m(x), ref, atol=1e-3, rtol=1e-3)


def test_obs_importance_collects_its_own_statistics_without_compensation():
    m, x = _mlp(), torch.randn(256, 8)
    imp = cleanai.importance.OBSImportance()
    pruner = cleanai.StructuredPruner(m, x[:1], pruning_ratio=0.2, importance=imp)
    with pytest.raises(RuntimeError, match="calibrate"):
        pruner.plan()
    pruner.calibrate([x])
    assert pruner.plan().removals[0].tolist()[0] in (0, 1, 3)


@pytest.mark.filterwarnings("ignore:compensation left some consumers")
def test_multihead_attention_reading_a_pruned_width_is_compensated():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self, cross):
            super().__init__()
            self.cross = cross
            self.up = nn.Linear(8, 16)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.out = nn.Linear(16, 4)

        def forward(self, x):
            h = torch.relu(self.up(x))
            kv = h.flip(1) if self.cross else h
            return self.out(self.attn(h, kv, kv, need_weights=False)[0])

    x = torch.randn(64, 6, 8)
    for cross in (False, True):
        dense = Net(cross)
        with torch.no_grad():  # hidden unit 5 = unit 0 + unit 1 before the ReLU is kept linear
            dense.up.weight[5] = dense.up.weight[0] + dense.up.weight[1]
            dense.up.bias[5] = dense.up.bias[0] + dense.up.bias[1] + 10
            dense.up.bias[:2] += 10  # units 0 and 1 stay positive: the ReLU is the identity
        errors, kv_rows = {}, {}
        for mode in (None, "lstsq"):
            m = copy.deepcopy(dense)
            pruner = _prune(m, x, {_group_of(copy.deepcopy(dense), x, "up"): [5]}, mode)
            assert m.attn.in_proj_weight.shape == (48, 15)
            kv_rows[mode] = m.attn.in_proj_weight[16:].detach().clone()
            with torch.no_grad():
                errors[mode] = float((m(x) - dense(x)).abs().max())
        report = pruner.compensation[-1]
        assert "attn" in report.compensated
        if cross:  # key and value read another tensor: only the query is refit
            assert "self-attention" in report.skipped["attn"]
            assert torch.equal(kv_rows["lstsq"], kv_rows[None])
        else:
            assert "attn" not in report.skipped
            assert errors["lstsq"] < 1e-3 < errors[None]


def test_a_consumer_without_statistics_is_left_as_it_was_and_named():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(128, 4)
    pruner = cleanai.StructuredPruner(m, x[:1], compensate="lstsq", pruning_ratio=0.25)
    pruner.calibrate([x])
    del pruner.input_stats.grams["2"]  # as if calibration never reached layer "2"
    del pruner.input_stats.sums["2"]
    plan = pruner.plan()
    kept = [i for i in range(16) if i not in plan.removals[0].tolist()]
    expected = m[2].weight[:, kept].detach().clone()
    with pytest.warns(UserWarning, match="no calibration statistics"):
        pruner.apply(plan)
    assert "no calibration statistics" in pruner.compensation[-1].skipped["2"]
    assert torch.equal(m[2].weight, expected)  # sliced, not refit


def test_a_tied_consumer_is_left_alone_so_the_embedding_it_shares_stays():
    torch.manual_seed(0)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.mid = nn.Linear(8, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            h = self.emb(ids)
            return self.head(h + torch.relu(self.mid(h)))

    m, ids = LM(), torch.randint(0, 20, (64, 10))
    kept = [0, 1, 2, 4, 5, 6, 7]
    before = m.emb.weight[:, kept].detach().clone()
    pruner = cleanai.StructuredPruner(m, ids[:1], compensate="lstsq")
    pruner.calibrate([ids])
    plan = pruner.plan()
    plan.removals = {next(g.id for g in pruner.graph.groups
                          if any(x.name == "emb" for x in g.members)): torch.tensor([3])}
    with pytest.warns(UserWarning, match="tied"):
        pruner.apply(plan)
    assert m.head.weight is m.emb.weight and torch.equal(m.emb.weight, before)
    assert "tied" in pruner.compensation[-1].skipped["head"]


def test_a_consumer_without_a_bias_is_refit_without_the_constant():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.RNN(6, 5, bias=False, batch_first=True))
    with torch.no_grad():  # unit 3 = 10 - unit 0: only a constant separates them
        m[0].weight[3] = -m[0].weight[0]
        m[0].bias[3] = 10 - m[0].bias[0]
        m[0].bias[0] += 5
    x = torch.randn(64, 7, 4)
    with torch.no_grad():
        ref = m(x)[0]
    errors = {}
    for mode in (None, "lstsq"):
        pruned = copy.deepcopy(m)
        _prune(pruned, x, {0: [3]}, mode)
        with torch.no_grad():
            errors[mode] = float((pruned(x)[0] - ref).pow(2).mean())
    assert errors["lstsq"] < 0.5 * errors[None]


def test_a_consumer_too_wide_for_second_moments_gets_its_mean_only():
    from cleanai.importance.stats import MAX_GRAM_CHANNELS
    torch.manual_seed(0)
    wide = MAX_GRAM_CHANNELS + 8
    m = nn.Sequential(nn.Linear(4, wide), nn.ReLU(), nn.Linear(wide, 2))
    x = torch.randn(16, 4)
    pruner = cleanai.StructuredPruner(m, x[:1], compensate="lstsq", pruning_ratio=0.25)
    pruner.calibrate([x])
    assert not pruner.input_stats.grams  # never built: O(C^2) memory
    with pytest.warns(UserWarning, match="too wide"):
        pruner.step()
    assert "only the removed channels' mean" in pruner.compensation[-1].skipped["2"]
    assert m[2].in_features == wide - wide // 4


def test_padded_token_positions_do_not_count_in_the_statistics():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x, attention_mask):
            return self.down(torch.relu(self.up(x)))

    m = Net()
    x = torch.randn(3, 5, 4)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    x[0, 3:] = 1e3  # padding that would dominate every statistic
    pruner = cleanai.StructuredPruner(m, {"x": x[:1], "attention_mask": mask[:1]},
                                      compensate="lstsq")
    pruner.calibrate([{"x": x, "attention_mask": mask}])
    mean, second, count = pruner.input_stats.moments("down")
    with torch.no_grad():
        real = torch.relu(m.up(x[mask.bool()])).double()  # the 13 real tokens
    assert count == 13
    torch.testing.assert_close(mean, real.mean(0))
    torch.testing.assert_close(second, real.T @ real / 13)


def _independent(n, width=48, seed=0):
    """Four batches of ``n`` rows whose ``width`` channels are independent (not centred)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, width, generator=g) * 2 for _ in range(4)]


def _wide_head(seed=0, independent=False):
    """48 hidden channels read by a 5-output layer; ``independent``: the hidden layer passes
    its input through, so no kept channel says anything about a removed one."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(48, 48), nn.Linear(48, 5))
    if independent:
        with torch.no_grad():
            m[0].weight.copy_(torch.eye(48))
            m[0].bias.zero_()
    return m


def test_statistics_keep_two_halves_of_the_batches_that_add_up_to_the_whole():
    m = _wide_head()
    data = _independent(5)
    pruner = cleanai.StructuredPruner(m, data[0][:1], compensate="lstsq", pruning_ratio=0.25)
    pruner.calibrate(data)
    stats = pruner.input_stats
    key = next(k for k in stats.grams if k.startswith("1"))
    (m_even, s_even, n_even), (m_odd, s_odd, n_odd) = stats.held_out(key)
    x_even, x_odd = torch.cat(data[0::2]).double(), torch.cat(data[1::2]).double()
    h_even, h_odd = (m[0].double()(x) for x in (x_even, x_odd))
    assert (n_even, n_odd) == (10, 10)
    torch.testing.assert_close(s_even, h_even.T @ h_even / 10, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m_odd, h_odd.mean(0), rtol=1e-5, atol=1e-6)
    # one batch: nothing to hold out
    pruner = cleanai.StructuredPruner(_wide_head(), data[0][:1], compensate="lstsq")
    pruner.calibrate(data[:1])
    assert pruner.input_stats.held_out(key) is None


def _fresh_error(dense, data, mode):
    """Mean squared output error on new rows after pruning 25% of the hidden channels with
    compensation ``mode``, calibrated on ``data``; and the step's compensation report."""
    m = copy.deepcopy(dense)
    pruner = cleanai.StructuredPruner(m, data[0][:1], compensate=mode, pruning_ratio=0.25,
                                      importance=WeightActivationImportance())
    pruner.calibrate(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.step()
    fresh = torch.rand(512, 48, generator=torch.Generator().manual_seed(9)) * 2
    with torch.no_grad():
        return float((m(fresh) - dense(fresh)).pow(2).mean()), \
            pruner.compensation[-1] if pruner.compensation else None


def test_lstsq_damping_is_chosen_on_held_out_batches():
    """20 rows for 36 kept channels that say nothing about the removed ones: a fit with a
    light damping learns noise; the held-out halves see it and choose a strong damping or the
    constant alone. One batch (no halves) falls back to a fixed damping and is worse."""
    dense, data = _wide_head(independent=True), _independent(5)
    plain, _ = _fresh_error(dense, data, None)
    chosen, report = _fresh_error(dense, data, "lstsq")
    fixed, fixed_report = _fresh_error(dense, [torch.cat(data)], "lstsq")
    assert report.chosen and all(c in ("mean only", "none") or float(c) >= 0.5
                                 for c in report.chosen.values())
    assert "chosen on held-out batches" in str(report) and not fixed_report.chosen
    assert chosen < 0.5 * plain and chosen < 0.7 * fixed
    # where kept channels do predict the removed ones, the choice is a real fit
    dense = _wide_head()
    plain, _ = _fresh_error(dense, _independent(20), None)
    fitted, report = _fresh_error(dense, _independent(20), "lstsq")
    assert set(report.chosen.values()) - {"mean only", "none"} and fitted < 0.5 * plain


def test_channels_whose_mean_dwarfs_their_spread_are_compensated_without_failing():
    """Centring such inputs leaves rounding noise larger than their variance (pooled features
    of a few images): the damping never goes below that noise, so the step works."""
    dense = _wide_head(independent=True)
    for seed in range(6):  # rows that differ by 1e-7: the centred second moment is rounding
        g = torch.Generator().manual_seed(seed)
        row = torch.rand(1, 48, generator=g)
        data = [row.repeat(4, 1) + 1e-7 * torch.rand(4, 48, generator=g) for _ in range(4)]
        _step_with(dense, data)
        _step_with(dense, [torch.cat(data)])


def _step_with(dense, batches):
    """Prune a copy of ``dense`` with lstsq compensation calibrated on ``batches``."""
    model = copy.deepcopy(dense)
    step = cleanai.StructuredPruner(model, batches[0][:1], compensate="lstsq",
                                    pruning_ratio=0.25)
    step.calibrate(batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step.step()
    assert torch.isfinite(model(batches[0])).all()
    assert bool(step.compensation[-1].chosen) == (len(batches) > 1)


def test_padded_batches_count_their_real_tokens_in_both_halves():
    """Counts of padded batches are tensors on the device: the odd half's count is its own,
    not the total's, whichever batch reached a layer first."""
    from cleanai.importance.stats import ActivationStats
    for shard in ((0, 1), (1, 2)):  # one process; the second rank of two (odd batches first)
        stats = ActivationStats(grams=["L"], shard=shard, halves=True)
        g = torch.Generator().manual_seed(0)
        real = []
        for b in range(4):
            mask = torch.ones(2, 5, dtype=torch.bool)
            mask[1, 3:] = False
            stats.mask = mask
            stats.update("L", torch.randn(2, 5, 3, generator=g), 2)
            stats.batches += 1
            real.append(int(mask.sum()))
        odd = sum(n for i, n in enumerate(real) if (i * shard[1] + shard[0]) % 2)
        assert stats.positions("L") == sum(real)
        assert float(stats.half_count["L"]) == odd
        if odd < sum(real):
            assert stats.held_out("L")[0][2] == sum(real) - odd


def test_timm_linear_is_compensated_as_a_linear_and_a_custom_subclass_says_why():
    """timm's Linear (its own forward, the same product) is known by name; a Linear subclass
    with a forward of its own is left alone, with what to do about it."""
    timm_layers = pytest.importorskip("timm.layers")

    class Custom(nn.Linear):
        def forward(self, x):
            return F.linear(x, self.weight, self.bias)

    torch.manual_seed(0)
    outs, reports = {}, {}
    for cls in (nn.Linear, timm_layers.Linear, Custom):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                              nn.Linear(16, 4)).eval()
        head = cls(16, 4)
        head.load_state_dict(model[4].state_dict())
        model[4] = head
        batches = [torch.randn(32, 8) for _ in range(4)]
        pruner = cleanai.StructuredPruner(model, batches[0], pruning_ratio=0.5,
                                          compensate="lstsq")
        pruner.calibrate(batches)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner.step()
        (reports[cls],) = pruner.compensation
        with torch.no_grad():
            outs[cls] = model(batches[0])
    assert "4" in reports[timm_layers.Linear].compensated
    torch.testing.assert_close(outs[timm_layers.Linear], outs[nn.Linear])
    assert "overrides forward" in reports[Custom].skipped["4"]
