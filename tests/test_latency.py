"""measure_latency and its spread: a positive median time, the model left as it was, errors
for people; two models timed in turns, and the rule that calls a difference "too noisy"."""
import pytest
import torch
from torch import nn

from cleanai.utils import LatencyComparison, LatencyStats, compare_latency, latency_stats, measure_latency
from cleanai.utils import latency as latency_module
from cleanai.utils.latency import MAX_SPREAD, MIN_RUNS


def test_latency_is_a_positive_number_of_seconds():
    seconds = measure_latency(nn.Linear(10, 20), torch.randn(1, 10), warmup=1, repeats=3)
    assert isinstance(seconds, float) and 0 < seconds < 10


def test_latency_leaves_mode_and_buffers_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    before = model[1].running_mean.clone()
    measure_latency(model, torch.randn(2, 3, 8, 8), warmup=1, repeats=2)
    assert model.training and torch.equal(model[1].running_mean, before)


def test_latency_reports_bad_arguments_and_failed_forwards():
    with pytest.raises(ValueError, match="repeats >= 1"):
        measure_latency(nn.Linear(10, 20), torch.randn(1, 10), repeats=0)
    with pytest.raises(RuntimeError, match="Linear"):
        measure_latency(nn.Linear(10, 20), torch.randn(1, 7))


def test_latency_stats_describe_the_runs():
    stats = latency_stats(nn.Linear(10, 20), torch.randn(1, 10), warmup=1, repeats=7)
    assert stats.runs == 7 and 0 < stats.min <= stats.q1 <= stats.median <= stats.q3
    assert stats.spread == pytest.approx((stats.q3 - stats.q1) / stats.median)


def test_stats_of_synthetic_times():
    stats = LatencyStats.from_times([5.0, 1.0, 2.0, 4.0, 3.0])
    assert (stats.median, stats.q1, stats.q3, stats.min, stats.runs) == (3.0, 2.0, 4.0, 1.0, 5)
    assert stats.spread == pytest.approx(2 / 3)
    one = LatencyStats.from_times([0.5])
    assert (one.median, one.q1, one.q3, one.spread) == (0.5, 0.5, 0.5, 0.0)


def _times(center, jitter=0.01, n=10):
    """``n`` times around ``center``, spread evenly over +-``jitter`` of it."""
    return [center * (1 + jitter * (2 * i / (n - 1) - 1)) for i in range(n)]


def test_verdict_clear_speed_up_and_slow_down():
    faster = LatencyComparison.from_times(_times(0.010), _times(0.005))
    assert faster.verdict == "faster" and faster.speedup == pytest.approx(2.0)
    assert str(faster) == "2.00x faster" and faster.reason == ""
    slower = LatencyComparison.from_times(_times(0.010), _times(0.0125))
    assert slower.verdict == "slower" and slower.speedup == pytest.approx(0.8)
    assert str(slower) == "1.25x slower"


def test_verdict_is_too_noisy_when_the_ranges_overlap():
    # medians 5% apart, but each middle half spreads over 10%: the quartile ranges overlap
    c = LatencyComparison.from_times(_times(0.010, 0.1), _times(0.0095, 0.1))
    assert c.verdict == "too noisy" and "overlap" in c.reason
    assert str(c).startswith("too noisy: the interquartile ranges overlap (IQR 10.0% and 10.0%")
    # the same models, same medians, but tight runs: a clear (small) speed-up
    assert LatencyComparison.from_times(_times(0.010), _times(0.0095)).verdict == "faster"


def test_verdict_is_too_noisy_when_a_spread_is_too_large():
    # medians 2x apart and the ranges apart, but one latency wanders over half its median
    noisy = [0.01, 0.012, 0.015, 0.02, 0.02, 0.02, 0.025, 0.03, 0.035, 0.04]
    wide = LatencyStats.from_times(noisy)
    assert wide.spread > MAX_SPREAD
    c = LatencyComparison.from_times(noisy, _times(0.004))
    assert c.verdict == "too noisy" and f"over {MAX_SPREAD:.0%}" in c.reason


def test_verdict_is_too_noisy_with_too_few_runs():
    c = LatencyComparison.from_times(_times(0.01, n=MIN_RUNS - 1), _times(0.001, n=MIN_RUNS - 1))
    assert c.verdict == "too noisy" and f"at least {MIN_RUNS} needed" in c.reason


class _Recorder(nn.Module):
    """A layer that writes its name into a shared log on every forward."""

    def __init__(self, name, log):
        super().__init__()
        self.name, self.log, self.lin = name, log, nn.Linear(4, 4)

    def forward(self, x):
        self.log.append(self.name)
        return self.lin(x)


def test_compare_latency_times_the_models_in_turns():
    log = []
    a, b = _Recorder("a", log).eval(), _Recorder("b", log).train()
    c = compare_latency(a, b, torch.randn(1, 4), warmup=1, repeats=3)
    # warm-up of each, then turns whose order flips every round
    assert "".join(log) == "ab" + "ab" + "ba" + "ab"
    assert c.paired and c.a.runs == c.b.runs == 3
    assert not a.training and b.training  # modes left as they were
    assert c.speedup == pytest.approx(c.a.median / c.b.median)


def test_paired_latency_of_the_budget_uses_the_same_loop(monkeypatch):
    from cleanai.pruner.budget import paired_latency

    calls = []

    def fake(models, inputs, forward_fn, warmup, repeats):
        calls.append((len(models), repeats))
        return [_times(0.002 * (i + 1), n=repeats) for i in range(len(models))]
    monkeypatch.setattr(latency_module, "_time_in_turns", fake)
    model = nn.Linear(4, 4)
    assert paired_latency(model, None, torch.randn(1, 4), None, 6) == (pytest.approx(0.002), None)
    assert paired_latency(model, model, torch.randn(1, 4), None, 6) == \
        (pytest.approx(0.002), pytest.approx(0.004))
    assert calls == [(1, 6), (2, 6)]
