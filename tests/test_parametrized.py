"""Layers whose weight is computed on every call (``torch.nn.utils.parametrizations`` and the
older hook-based ``weight_norm``): weight norm is sliced through its ``g`` and ``v`` with the
kept weights unchanged; a spectral norm or an orthogonal map keeps the layer's channels."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, weight_norm

from cleanai import StructuredPruner
from cleanai.pruner.apply import layer_keeps


def _mlp(middle: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), middle, nn.ReLU(), nn.Linear(16, 4),
                         nn.ReLU(), nn.Linear(4, 3))


def _convs(middle: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(8, 16, 3, padding=1), nn.ReLU(), middle, nn.ReLU(),
                         nn.Conv1d(16, 4, 1), nn.ReLU(), nn.Conv1d(4, 3, 1))


NORMED = {
    "weight_norm": lambda m: parametrizations.weight_norm(m),
    "weight_norm over dim 1": lambda m: parametrizations.weight_norm(m, dim=1),
    "weight_norm over everything": lambda m: parametrizations.weight_norm(m, dim=None),
    "hook-based weight_norm": lambda m: weight_norm(m),
    # wav2vec2's positional conv: grouped, normalised per kernel position
    "grouped conv, weight_norm over the kernel": lambda m: parametrizations.weight_norm(m, dim=2),
}


@pytest.mark.parametrize("how", sorted(NORMED))
def test_weight_normed_layer_prunes_both_sides_exactly(how):
    torch.manual_seed(0)
    conv = "conv" in how
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook-based form is deprecated
        model = (_convs(NORMED[how](nn.Conv1d(16, 16, 3, padding=1, groups=4))) if conv else
                 _mlp(NORMED[how](nn.Linear(16, 16)))).eval()
    x = torch.randn(5, 8, 7) if conv else torch.randn(5, 8)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    plan = pruner.plan()
    groups = [next(g for g in pruner.graph.groups
                   if any(m.name == layer and m.kind == "out" for m in g.members))
              for layer in ("0", "2", "4")]
    assert not any(g.protected.any() for g in groups)
    # the dense model with each layer's removed channels silenced after its ReLU
    keeps = layer_keeps(pruner.graph, plan.removals)
    dim = 1 if conv else -1

    def silence(mod, inp, out, keep):
        removed = torch.ones(out.shape[dim], dtype=torch.bool)
        removed[keep] = False
        return out.index_fill(dim, torch.nonzero(removed).flatten(), 0.0)

    hooks = [model[int(layer) + 1].register_forward_hook(
        lambda mod, inp, out, keep=keeps[(layer, "out", -1)]: silence(mod, inp, out, keep))
        for layer in ("0", "2", "4")]
    with torch.no_grad():
        expected = model(x)
    for h in hooks:
        h.remove()
    pruner.apply(plan)
    assert model[2].weight.shape == ((8, 2, 3) if conv else (8, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["spectral_norm", "orthogonal"])
def test_other_parametrizations_keep_their_channels_with_a_reason(how):
    torch.manual_seed(0)
    model = _mlp(getattr(parametrizations, how)(nn.Linear(16, 16))).eval()
    x = torch.randn(5, 8)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    touching = [g for g in pruner.graph.groups
                if any(m.name == "2" for m in g.members)]
    assert len(touching) == 2 and all(g.protected.all() for g in touching)
    assert all("parametrize" in why for g in touching for why in g.reasons)
    pruner.step()
    assert model[2].weight.shape == (16, 16) and model[4].weight.shape == (2, 16)
    assert model(x).shape == (5, 3)


def test_compensation_skips_a_weight_normed_consumer_and_says_why():
    torch.manual_seed(0)
    model = _mlp(parametrizations.weight_norm(nn.Linear(16, 16))).eval()
    x = torch.randn(64, 8)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5, compensate="lstsq")
    pruner.calibrate([torch.randn(64, 8) for _ in range(4)])
    pruner.step()
    (report,) = pruner.compensation
    assert "computed" in report.skipped["2"] and "4" in report.compensated
    assert model(x).shape == (64, 3)
