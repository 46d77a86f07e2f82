"""measure_latency: a positive median time, the model left as it was, errors for people."""
import pytest
import torch
from torch import nn

from cleanai.utils import measure_latency


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
