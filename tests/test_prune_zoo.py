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


def _recover_and_check(name: str) -> None:
    """``compensate="lstsq"`` and layer reconstruction from a few small images (fewer samples
    than many layers have channels): both run, and the output stays finite and no further
    from the dense model's than plain pruning leaves it (on inputs neither saw)."""
    import copy

    import cleanai

    torch.manual_seed(0)
    dense = torchvision.models.get_model(name, weights=None, num_classes=10)
    size = FIXED_SIZE.get(name, 64)
    calib = [torch.randn(2, 3, size, size) for _ in range(4)]
    dense.train()
    with torch.no_grad():  # BatchNorm statistics of this data, not the initial ones
        for x in calib:
            dense(x)
    dense.eval()
    fresh = torch.randn(4, 3, size, size)
    errors = {}
    for mode in (None, "lstsq"):
        model = copy.deepcopy(dense)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = StructuredPruner(model, calib[0], pruning_ratio=0.3, compensate=mode)
            if mode:
                pruner.calibrate(calib)
            pruner.step()
            if mode:
                cleanai.recover.reconstruct(model, dense, calib, progress=False)
        with torch.no_grad():
            out, ref = model(fresh), dense(fresh)
        out = out.logits if hasattr(out, "logits") else out
        ref = ref.logits if hasattr(ref, "logits") else ref
        assert torch.isfinite(out).all()
        errors[mode] = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
    assert errors["lstsq"] <= errors[None] * 1.05 + 1e-6, errors


def test_recover_a_representative_model():
    _recover_and_check("mobilenet_v3_small")


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["vgg11_bn", "resnet18", "resnext50_32x4d",
                                  "mobilenet_v2", "mobilenet_v3_large",
                                  "mnasnet0_5", "efficientnet_b0", "efficientnet_v2_s",
                                  "densenet121", "regnet_y_400mf", "convnext_tiny",
                                  "shufflenet_v2_x0_5", "squeezenet1_1", "googlenet",
                                  "inception_v3", "swin_t", "vit_b_16", "maxvit_t"])
def test_recover_one_model_of_every_torchvision_family(name):
    _recover_and_check(name)
