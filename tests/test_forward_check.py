"""The forward run after each pruning step: what it catches, and what skipping it means."""
import warnings

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
    with pytest.warns(UserWarning, match=r"group 0 \(8 channels: 0 and 1 more layer\) loses "
                                         r"channels: RuntimeError in 2 \(CheckedConv\) at "
                                         r"test_forward_check.py:\d+ `raise .*: expected 8 "
                                         r"channels, got 4\. CleanAI keeps its channels"):
        pruner.step()
    # only the group the block checks keeps its channels; the block's own output is pruned
    assert model[0].out_channels == 8
    assert model[2].conv.out_channels == model[4].out_channels == 4
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


# --- "auto": the check runs only where code outside the known layers could hold a width ---

class Masked(nn.Module):
    """Multiplies by a constant kept in a plain attribute (no buffer: nothing slices it)."""

    def __init__(self) -> None:
        super().__init__()
        self.mask = torch.ones(1, 8, 1, 1)

    def forward(self, x):
        return torch.relu(x) * self.mask


class Viewed(nn.Module):
    def forward(self, x):
        return torch.relu(x).view(1, 8, 10, 10)  # a width written in the code


def counting_forwards(model):
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_auto_skips_the_check_where_all_code_outside_layers_is_width_free():
    model, x = net()[3:], torch.randn(1, 8, 6, 6)  # ReLU, convs: nothing holds a width
    calls = counting_forwards(model)  # (a hook added after the trace would be checked)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    assert pruner.graph.check_reason is None
    calls.clear()
    pruner.step()
    assert calls == [] and model[1].out_channels == 4
    assert model(x).shape == (1, 4, 6, 6)


@pytest.mark.parametrize("block, found", [
    (Viewed(), "view()"),
    (Masked(), "mul()"),  # the mask is no part of the graph
])
def test_auto_checks_where_code_may_hold_a_width(block, found):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), block, nn.Conv2d(8, 4, 1))
    x = torch.randn(1, 3, 12, 12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    assert found in pruner.graph.check_reason
    with pytest.raises(cleanai.PruningError, match="in 1: "):
        pruner.apply(pruner.plan())  # the check forward fails in the block: rolled back
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # step() finds the one group the block breaks and keeps it: nothing is left to prune
    with pytest.warns(UserWarning, match=rf"group 0 .* in 1 \({type(block).__name__}\) at "
                                         rf"test_forward_check.py:\d+"):
        plan = pruner.step()
    assert plan.num_removed == 0 and bool(pruner.graph.groups[0].protected.all())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model(x).shape == (1, 4, 10, 10)


def test_a_forward_hook_on_a_layer_is_code_the_trace_cannot_see():
    model, x = net()[3:], torch.randn(1, 8, 6, 6)
    model[1].register_forward_hook(  # a width written in the hook
        lambda m, args, out: out + out.view(1, 8, -1).mean(-1)[..., None, None] * 0)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    assert pruner.graph.check_reason == "a forward hook on 4"  # model[1] is net()'s layer 4
    with pytest.raises(cleanai.PruningError, match="in 4: "):
        pruner.apply(pruner.plan())
    with pytest.warns(UserWarning, match=r"in 4 \(Conv2d\) at test_forward_check.py:\d+ "
                                         r"`lambda m, args, out"):
        pruner.step()
    assert model[1].out_channels == 8 and model(x).shape == (1, 4, 6, 6)


@pytest.mark.parametrize("bad", ["always", 1, None])
def test_check_forward_must_be_a_bool_or_auto(bad):
    with pytest.raises(ValueError, match="check_forward must be True, False or 'auto'"):
        StructuredPruner(net(), torch.randn(1, 3, 12, 12), check_forward=bad)


def test_a_hook_on_a_stock_activation_is_still_watched():
    # the trace steps aside inside PyTorch's activation layers, never around their hooks
    model, x = net()[3:], torch.randn(1, 8, 6, 6)
    model[0].register_forward_hook(lambda m, args, out: out.view(1, 8, -1).reshape(out.shape))
    assert StructuredPruner(model, x).graph.check_reason == "view() outside the known layers"


# --- code "auto" must not miss: each case keeps a width the walk cannot see -----------------

class _CheckedConv(nn.Conv2d):  # PyTorch's forward, but a helper of its own
    def _conv_forward(self, input, weight, bias):
        if input.shape[1] != 8:
            raise RuntimeError("this conv needs 8 channels")
        return super()._conv_forward(input, weight, bias)


def _pool_to_eight(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], 8, -1).mean(2)


class _Scripted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 4)
        with warnings.catch_warnings():  # (TorchScript is deprecated, still used)
            warnings.simplefilter("ignore")
            self.pool = torch.jit.script(_pool_to_eight)  # calls the function mode cannot see

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))))


class _Stale(nn.Module):  # a tensor computed from a parameter once, in __init__
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)
        self.log_scale = nn.Parameter(torch.zeros(1, 8, 1, 1))
        self.scale = self.log_scale.exp()

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)) * self.scale)


class _Clamped(nn.Module):  # a tensor bound: clamp ties nothing to it
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(torch.clamp(self.a(x), min=self.b(x)))


class _EvalReshape(nn.Module):  # traced in train mode (a head runs only there)
    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.aux = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        if self.training:
            return self.c(y) + self.aux(y)
        return self.c(y.reshape(1, 8, 10, 10))


def _instance_forward():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    plain = model[2].forward

    def forward(x):
        if x.shape[1] != 8:
            raise RuntimeError("needs 8 channels")
        return plain(x)
    model[2].forward = forward
    return model


def _weight_norm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    torch.nn.utils.parametrizations.weight_norm(model[0])
    return model


@pytest.mark.parametrize("make, found", [
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), _CheckedConv(8, 4, 1)), "_CheckedConv"),
    (_instance_forward, "a forward set on the layer 2"),
    (_weight_norm, "ParametrizedConv2d"),
    (_Scripted, "made by code the trace could not watch"),
    (_Stale, "made by code the trace could not watch"),
    (_Clamped, "clamp()"),
    (lambda: _EvalReshape().eval(), "traced in train mode"),
])
def test_auto_checks_code_the_walk_cannot_see(make, found):
    torch.manual_seed(0)
    model, x = make(), torch.randn(1, 3, 12, 12)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    assert found in pruner.graph.check_reason
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pruner.step()  # the failing layer is protected, or the step rolled back
        except cleanai.PruningError:
            pass
    model(x)  # either way the model still runs


def test_a_hook_added_after_the_trace_brings_the_check_back():
    model, x = net()[3:], torch.randn(1, 8, 6, 6)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    assert pruner.graph.check_reason is None

    def needs_eight(module, args):
        if args[0].shape[1] != 8:
            raise RuntimeError("needs 8 channels")
    model[3].register_forward_pre_hook(needs_eight)
    with pytest.raises(cleanai.PruningError, match="needs 8 channels"):
        pruner.apply(pruner.plan())
    with pytest.warns(UserWarning, match="needs 8 channels"):
        assert pruner.step().num_removed == 0  # the only group is the one the hook checks
    assert model[1].out_channels == 8 and model(x).shape == (1, 4, 6, 6)
