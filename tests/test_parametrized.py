"""Layers whose weight is computed on every call (``torch.nn.utils.parametrizations`` and the
older hook-based ``weight_norm``): weight norm is sliced through its ``g`` and ``v`` with the
kept weights unchanged; a spectral norm or an orthogonal map keeps the layer's channels."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, weight_norm

from cleanai import PruningPlan, StructuredPruner
from cleanai.pruner.apply import PruningError
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


@pytest.mark.parametrize("form", ["parametrization", "hook"])
def test_compensation_refits_a_weight_normed_consumer_as_a_plain_one(form):
    """The refit is written into g and v: the same numbers as on a plain layer."""
    torch.manual_seed(0)
    plain = _mlp(nn.Linear(16, 16)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        normed = _mlp(nn.Linear(16, 16)).eval()
        normed.load_state_dict(plain.state_dict())
        normed[2] = parametrizations.weight_norm(normed[2]) if form == "parametrization" \
            else weight_norm(normed[2])
    x, batches = torch.randn(64, 8), [torch.randn(64, 8) for _ in range(4)]
    outs = []
    for model in (plain, normed):
        pruner = StructuredPruner(model, x, pruning_ratio=0.5, compensate="lstsq")
        pruner.calibrate(batches)
        pruner.step()
        (report,) = pruner.compensation
        assert "2" in report.compensated and not report.skipped
        with torch.no_grad():
            outs.append(model(x))
    assert normed[2].weight.shape == (8, 8)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


def test_a_row_whose_kept_part_is_zero_stays_zero_not_nan():
    """Weight norm of a row whose only non-zero inputs are removed: 0 / 0 must not appear."""
    torch.manual_seed(0)
    model = _mlp(parametrizations.weight_norm(nn.Linear(16, 16))).eval()
    with torch.no_grad():
        model[2].parametrizations.weight.original1[0, 8:] = 0.0
    x = torch.randn(5, 8)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    first = next(g for g in pruner.graph.groups if any(m.name == "0" for m in g.members))
    plan = PruningPlan(pruner.graph, {first.id: torch.arange(8)})  # inputs 0..7 of layer 2
    hook = model[1].register_forward_hook(lambda mod, inp, out: out.index_fill(-1, torch.arange(8), 0.0))
    with torch.no_grad():
        expected = model(x)
    hook.remove()
    pruner.apply(plan)
    with torch.no_grad():
        got = model(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


class _KeepsItsWidth(nn.Module):
    """A width of its own after the layer: pruning it fails the check and is rolled back."""

    def forward(self, x):
        return x * torch.linspace(0, 1, 16)


def test_a_rolled_back_step_restores_the_hook_based_weight():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), weight_norm(nn.Linear(16, 16)), nn.ReLU(),
                              _KeepsItsWidth(), nn.Linear(16, 3)).eval()
    x = torch.randn(5, 8)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    plan = pruner.plan()
    with pytest.raises(PruningError):
        pruner.apply(plan)
    assert model[2].weight.shape == model[2].weight_v.shape == (16, 16)
    assert torch.equal(pruner.plan().removals[0], plan.removals[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.step()  # the fallback keeps the group that breaks it, prunes the rest
    assert model(x).shape == (5, 3)


@pytest.mark.parametrize("how", ["weight_norm", "spectral_norm"])
def test_attention_with_a_parametrized_out_proj(how):
    """The layer pruned is the attention module; its out_proj holds the computed weight."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 4, batch_first=True)
    getattr(parametrizations, how)(attn.out_proj)
    model = nn.ModuleDict({"inp": nn.Linear(8, 16), "attn": attn, "head": nn.Linear(16, 3)})

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            h = self.m["inp"](x)
            return self.m["head"](self.m["attn"](h, h, h, need_weights=False)[0])

    net, x = Net().eval(), torch.randn(2, 5, 8)
    pruner = StructuredPruner(net, x, pruning_ratio=0.5)
    pruner.step()
    width = attn.out_proj.weight.shape
    if how == "spectral_norm":
        assert width == (16, 16) and attn.in_proj_weight.shape == (48, 16)
    else:
        assert width[0] == 8 and width[1] < 16
    assert net(x).shape == (2, 5, 3)


def test_budgets_copy_a_hook_based_weight_normed_layer():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = _mlp(weight_norm(nn.Linear(16, 16))).eval()
    x = torch.randn(5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        StructuredPruner(model, x, target_params=0.5).step()
    assert sum(p.numel() for p in model.parameters()) < 0.55 * (8 * 16 + 16 + 16 * 16 + 16 + 16 + 16 * 4 + 4 + 4 * 3 + 3)
    assert model(x).shape == (5, 3)


def test_prune_checkpoint_refuses_a_weight_normed_layer(tmp_path):
    pytest.importorskip("safetensors")
    from cleanai import prune_checkpoint

    def build():
        return _mlp(parametrizations.weight_norm(nn.Linear(16, 16)))

    torch.save(build().state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weight is computed"):
        prune_checkpoint(build, tmp_path, tmp_path / "out", torch.randn(2, 8), pruning_ratio=0.5)
    assert not (tmp_path / "out").exists()
