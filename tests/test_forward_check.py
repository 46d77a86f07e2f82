"""The forward run after each pruning step: what it catches, and what skipping it means."""
import pytest
import torch
from torch import nn

import cleanai
from cleanai import StructuredPruner
from cleanai.utils import count_params


class CheckedConv(nn.Module):
    """A block that checks the channel count it was built with: autograd cannot see that."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(channels, 8, 3)

    def forward(self, x):
        if x.shape[1] != self.channels:
            raise RuntimeError(f"expected {self.channels} channels, got {x.shape[1]}")
        return self.conv(x)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), CheckedConv(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))


def test_a_layer_that_breaks_is_found_rolled_back_and_protected():
    model, x = net(), torch.randn(1, 3, 12, 12)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    with pytest.warns(UserWarning, match=r"RuntimeError in 2: expected 8 .*CheckedConv"):
        pruner.step()
    # the groups that touch the block keep their channels; the one after it is pruned
    assert model[0].out_channels == model[2].conv.out_channels == 8
    assert model[4].out_channels == 4
    assert model(x).shape == (1, 4, 8, 8)


def test_the_failing_layer_is_named_in_the_error():
    model, x = net(), torch.randn(1, 3, 12, 12)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(cleanai.PruningError) as info:
        pruner.apply(pruner.plan())
    assert info.value.layer == "2" and "expected 8 channels, got 4" in str(info.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_check_forward_false_skips_the_forward_and_prunes_the_same():
    checked, unchecked = net()[2:], net()[2:]
    x = torch.randn(2, 8, 6, 6)
    StructuredPruner(checked, x, pruning_ratio=0.5).prune()
    calls = []
    unchecked.register_forward_hook(lambda *args: calls.append(1))
    pruner = StructuredPruner(unchecked, x, pruning_ratio=0.5, check_forward=False)
    calls.clear()  # the trace runs the model once
    pruner.prune()
    assert calls == []
    assert count_params(unchecked) < count_params(net()[2:])
    assert all(torch.equal(a, b) for a, b in zip(checked.state_dict().values(),
                                                 unchecked.state_dict().values()))


def test_without_the_check_a_breaking_layer_fails_later():
    model, x = net(), torch.randn(1, 3, 12, 12)
    StructuredPruner(model, x, pruning_ratio=0.5, check_forward=False).step()
    with pytest.raises(RuntimeError, match="expected 8 channels, got 4"):
        model(x)
