"""count_params and count_macs: the numbers users compare before and after pruning."""
import pytest
import torch
from torch import nn

from cleanai.utils import count_macs, count_params

torchvision = pytest.importorskip("torchvision")


def test_resnet18_params_match_torchvision():
    model = torchvision.models.resnet18()
    assert count_params(model) == 11_689_512


def test_resnet18_macs_about_1_82_g():
    model = torchvision.models.resnet18().eval()
    macs = count_macs(model, torch.randn(1, 3, 224, 224))
    assert abs(macs - 1.82e9) / 1.82e9 < 0.02


def test_linear_macs_are_exact():
    assert count_macs(nn.Linear(10, 20), torch.randn(1, 10)) == 200


def test_macs_grow_with_batch():
    layer = nn.Linear(10, 20)
    assert count_macs(layer, torch.randn(4, 10)) == 4 * 200


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.head = nn.Linear(16, 100, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.embed(ids))


def test_tied_weights_counted_once():
    assert count_params(Tied()) == 100 * 16


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(10, 20)
        self.b = nn.Linear(5, 20)

    def forward(self, x, y=None):
        return self.a(x) + self.b(y)


def test_dict_inputs_are_keywords():
    macs = count_macs(TwoInputs(), {"x": torch.randn(1, 10), "y": torch.randn(1, 5)})
    assert macs == 200 + 100


def test_tuple_inputs_are_positional():
    assert count_macs(TwoInputs(), (torch.randn(1, 10), torch.randn(1, 5))) == 300


def test_forward_fn_is_used():
    model = TwoInputs()
    inputs = [torch.randn(1, 10), torch.randn(1, 5)]
    macs = count_macs(model, inputs, forward_fn=lambda m, xs: m(xs[0], y=xs[1]))
    assert macs == 300


def test_mode_and_buffers_left_as_they_were():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout(0.5)).train()
    before = model[1].running_mean.clone()
    count_macs(model, torch.randn(2, 3, 8, 8))
    assert model.training and model[1].training
    assert torch.equal(model[1].running_mean, before)
    assert int(model[1].num_batches_tracked) == 0
    model.eval()
    count_macs(model, torch.randn(2, 3, 8, 8))
    assert not model.training and not model[2].training


def test_failed_forward_names_the_model_and_the_error():
    with pytest.raises(RuntimeError, match=r"Linear.*mat1 and mat2"):
        count_macs(nn.Linear(10, 20), torch.randn(1, 7))


def test_lazy_parameters_are_reported():
    with pytest.raises(ValueError, match="forward pass"):
        count_params(nn.LazyLinear(4))
