"""Every torchvision classification model prunes at 0.5 with its classifier kept."""
import warnings

import pytest
import torch
import torchvision

from cleanai import StructuredPruner
from cleanai.utils import count_params

ALL = torchvision.models.list_models(module=torchvision.models)
DEFAULT = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5",
           "squeezenet1_1", "regnet_x_400mf", "googlenet", "densenet121"]
FIXED_SIZE = {"inception_v3": 299, "vit_b_16": 224, "vit_b_32": 224, "vit_l_16": 224,
              "vit_l_32": 224, "vit_h_14": 224, "swin_t": 224, "swin_s": 224, "swin_b": 224,
              "swin_v2_t": 256, "swin_v2_s": 256, "swin_v2_b": 256, "maxvit_t": 224}


def _prune_and_check(name: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    size = FIXED_SIZE.get(name, 128)
    x = torch.randn(1, 3, size, size)
    params = count_params(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        StructuredPruner(model, x, pruning_ratio=0.5).prune()
    assert count_params(model) < params
    out = model(x)
    out = out.logits if hasattr(out, "logits") else out
    assert out.shape == (1, 1000)
    out.sum().backward()
    assert next(model.parameters()).grad is not None
    model.train()  # branches that only run in training (auxiliary heads) were pruned too
    model(torch.cat([x, x]))


@pytest.mark.parametrize("name", DEFAULT)
def test_prune_representative_models(name):
    _prune_and_check(name)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ALL)
def test_prune_every_torchvision_model(name):
    _prune_and_check(name)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0", "densenet121",
                                  "convnext_tiny", "vit_b_16", "swin_t", "googlenet"])
def test_allocation_meets_a_budget_on_torchvision_models(name):
    """``allocation=OutputSensitivity()`` under ``target_macs=0.5``: met, and the model runs."""
    from cleanai.importance import OutputSensitivity
    from cleanai.utils import count_macs

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    size = FIXED_SIZE.get(name, 128)
    x = torch.randn(1, 3, size, size)
    macs = count_macs(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = StructuredPruner(model, x, allocation=OutputSensitivity(), target_macs=0.5)
        pruner.calibrate([torch.randn(2, 3, size, size) for _ in range(2)])
        pruner.step()
    assert 0.49 * macs <= count_macs(model, x) <= 0.5 * macs
    assert model(x).shape == (1, 10)
