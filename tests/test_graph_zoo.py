"""DependencyGraph on torchvision classifiers: a fast dozen by default, every model with -m zoo."""
import warnings

import pytest
import torch
from torch import nn

import cleanai

from conftest import assert_maps_follow_dataflow, assert_well_formed, producers

torchvision = pytest.importorskip("torchvision")

# name: (input size, the only protected channels are the 1000 logits, check maps by data flow)
FAST = {
    "resnet18": (64, True, True),
    "resnet50": (64, True, True),
    "densenet121": (64, True, True),
    "mobilenet_v2": (64, True, True),
    "mobilenet_v3_small": (64, True, True),
    "efficientnet_b0": (64, True, True),
    "googlenet": (64, True, True),
    "inception_v3": (299, True, False),  # 299x299: the data-flow oracle would be slow
    "squeezenet1_0": (64, True, True),
    "regnet_y_400mf": (64, True, True),  # grouped convs + squeeze-excitation
    "shufflenet_v2_x0_5": (64, False, False),  # chunk + channel shuffle: partly protected
    "convnext_tiny": (64, True, False),  # LayerNorm mixes channels: no data-flow oracle
    "vit_b_16": (224, False, False),  # LayerNorm and attention mix channels: no data-flow oracle
}

EXPECTED_GROUPS = {"resnet18": 13, "resnet50": 38, "densenet121": 121}


def _model(name, aux):
    kw = {}
    if name in ("googlenet", "inception_v3"):
        kw = {"aux_logits": aux, "init_weights": False}
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, **kw).eval()


def _size(name):
    if name in FAST:
        return FAST[name][0]
    return 299 if name == "inception_v3" else 224


def _build(name, aux=False):
    model = _model(name, aux)
    x = torch.randn(1, 3, _size(name), _size(name))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = cleanai.DependencyGraph(model, x)
    return model, x, g, [str(w.message) for w in caught if "CleanAI" in str(w.message)]


def _assert_logits_protected(model, x, g, outputs=1):
    """The 1000 logits (and any auxiliary logits the model returns in train mode) are the
    model's outputs: each is a whole group, fully protected, made by one 1000-way classifier."""
    with torch.no_grad():
        assert model(x).shape == (1, 1000)
    out = [grp for grp in g.groups if "model output" in grp.reasons]
    assert len(out) == outputs if outputs else len(out) >= 1, [grp.reasons for grp in out]
    for logits in out:
        assert logits.size == 1000 and logits.protected.all()
        assert logits.reasons == {"model output": 1000}
        made = producers(g, logits)
        assert len(made) == 1
        classifier = model.get_submodule(made[0])
        assert isinstance(classifier, (nn.Linear, nn.Conv2d))
        assert (getattr(classifier, "out_features", None) or classifier.out_channels) == 1000


def _independent_layers(model):
    """Names of convs and linears whose output channels are their own (not depthwise)."""
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) or (isinstance(m, nn.modules.conv._ConvNd)
                                        and not (m.groups == m.in_channels > 1)):
            out.add(name)
    return out


def _check_vit(g, warned):
    assert not warned
    assert sum(int(grp.protected.sum()) for grp in g.groups) == 1000
    # every attention layer's 12 heads form a group of their own
    heads = [grp for grp in g.groups if any(m.kind == "internal" for m in grp.members)]
    assert len(heads) == 12 and all(grp.size == 12 and len(grp.members) == 1 for grp in heads)
    # the class token and position embedding follow the residual stream's 768 channels
    stream = [grp for grp in g.groups if any(m.name == "class_token" for m in grp.members)]
    assert len(stream) == 1 and stream[0].size == 768
    names = {m.name: m for m in stream[0].members}
    assert names["class_token"].kind == "param" and names["class_token"].dim == 2
    assert "encoder.pos_embedding" in names and "conv_proj" in names




@pytest.mark.parametrize("name", sorted(FAST))
def test_torchvision_graph(name):
    _, clean, oracle = FAST[name]
    model, x, g, warned = _build(name)
    assert_well_formed(g)
    _assert_logits_protected(model, x, g)
    if name in EXPECTED_GROUPS:
        assert len(g.groups) == EXPECTED_GROUPS[name]
    if clean:
        assert not warned
        assert sum(int(grp.protected.sum()) for grp in g.groups) == 1000
        # every conv and linear of the model produces exactly one group
        made = [n for grp in g.groups for n in producers(g, grp)]
        assert len(made) == len(set(made))
        assert set(made) == _independent_layers(model)
    if oracle:
        k = len(g.groups)
        picked = sorted(set(torch.linspace(0, k - 1, min(k, 6)).round().long().tolist()))
        assert_maps_follow_dataflow(model, x, g, groups=picked, channels=2)
    if name == "vit_b_16":
        _check_vit(g, warned)


def _all_models():
    return sorted(torchvision.models.list_models(module=torchvision.models))


@pytest.mark.zoo
@pytest.mark.parametrize("name", _all_models())
def test_every_torchvision_classifier(name):
    model, x, g, _ = _build(name, aux=True)
    assert_well_formed(g)
    _assert_logits_protected(model, x, g, outputs=None)
