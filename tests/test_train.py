"""Pruning inside a training loop: optimizer state follows a step exactly, the group-sparsity
penalty is the group norm it claims, gradual pruning keeps its schedule, bad input fails."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cleanai
from cleanai.importance import ActivationImportance
from cleanai.train import (BatchNormScaleSparsity, GradualPruner, GroupSparsity,
                           slice_optimizer_state)
from llama_like import LlamaLike


class Net(nn.Module):
    """conv-BN-ReLU twice with a residual, a flatten into the classifier: ``[N, 3, 8, 8]``."""

    def __init__(self, w=(8, 12)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w[0], 3, padding=1)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.conv2 = nn.Conv2d(w[0], w[0], 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w[0])
        self.conv3 = nn.Conv2d(w[0], w[1], 3, stride=4, padding=1, bias=False)
        self.fc = nn.Linear(w[1] * 4, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.conv3(x), 1))


def batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def train_step(model, opt, seed, reg=None):
    x, y = batch(seed)
    loss = F.cross_entropy(model(x), y) + (reg() if reg is not None else 0)
    opt.zero_grad()
    loss.backward()
    opt.step()


def param_keeps(entry):
    """``{param name: {dim: kept indices}}`` read off a history step (Conv, BN, Linear)."""
    out = {}
    for e in entry["layers"]:
        keep = torch.tensor(e["keep"])
        if e["kind"] == "out":
            for p in ("weight", "bias"):
                out.setdefault(f"{e['name']}.{p}", {})[0] = keep
        elif e["kind"] == "in":
            out.setdefault(f"{e['name']}.weight", {})[1] = keep
    return out


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True),
], ids=["sgd-momentum", "adam", "adamw-amsgrad"])
def test_steps_after_a_prune_equal_a_model_built_at_the_pruned_width(make):
    torch.manual_seed(0)
    model = Net()
    opt = make(model.parameters())
    for s in range(3):
        train_step(model, opt, s)
    old_state = {n: {k: v.clone() for k, v in opt.state[p].items()}
                 for n, p in model.named_parameters()}
    pruner = cleanai.StructuredPruner(model, batch()[0][:1], pruning_ratio=0.4)
    with slice_optimizer_state(opt, model):
        pruner.step()
    entry = pruner.history[-1]

    # built independently: the pruned width from the constructor, state sliced by hand
    kept = {n: p.shape for n, p in model.named_parameters()}
    ref = Net((kept["conv1.weight"][0], kept["conv3.weight"][0]))
    ref.load_state_dict(model.state_dict())
    ref_opt = make(ref.parameters())
    keeps = param_keeps(entry)
    for name in ("bn1", "bn2"):  # the BN layers share conv1's group (the residual)
        keeps[f"{name}.weight"] = keeps[f"{name}.bias"] = {0: keeps["conv1.weight"][0]}
    for name, p in ref.named_parameters():
        state = {}
        for k, v in old_state[name].items():
            if v.dim():  # momentum, moments: cut like the parameter; step counts kept
                for d, keep in keeps.get(name, {}).items():
                    v = v.index_select(d, keep)
            state[k] = v
        ref_opt.state[p] = state
    for s in range(3, 5):
        train_step(model, opt, s)
        train_step(ref, ref_opt, s)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


def mha_model():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 16)
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16))
            self.out = nn.Linear(16, 3)

        def forward(self, x):
            h = self.inp(x)
            h = h + self.attn(h, h, h, need_weights=False)[0]
            return self.out(h + self.mlp(h))
    return M(), torch.randn(2, 5, 6)


def recurrent_model():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(6, 12, num_layers=2, batch_first=True)
            self.head = nn.Linear(12, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])
    return M(), torch.randn(2, 5, 6)


@pytest.mark.parametrize("build", [
    mha_model, recurrent_model,
    lambda: (LlamaLike(layers=2), torch.randint(0, 50, (2, 6))),
], ids=["mha", "lstm", "llama-gqa"])
def test_state_follows_the_values_of_any_layer(build):
    """State set equal to the parameter (and its square) before the step still equals it after:
    every state tensor was cut exactly like its parameter (packed q/k/v, gates, heads)."""
    torch.manual_seed(0)
    model, x = build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(x).float().sum().backward()
    opt.step()
    for p in model.parameters():
        opt.state[p]["exp_avg"] = p.detach().clone()
        opt.state[p]["exp_avg_sq"] = p.detach() ** 2
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    with slice_optimizer_state(opt, model):
        pruner.step()
    assert any(p.shape != shapes[n] for n, p in model.named_parameters())
    held = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.parameters()}
    for n, p in model.named_parameters():
        torch.testing.assert_close(opt.state[p]["exp_avg"], p.detach(), rtol=0, atol=0, msg=n)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], p.detach() ** 2, rtol=0, atol=0)
    model(x).float().sum().backward()
    opt.step()  # and training goes on


def test_reduced_state_and_added_parameters_follow():
    """Adafactor's row/column statistics are cut along their full dims; a bias added by
    compensation joins the optimizer group of its layer's weight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16, bias=False), nn.ReLU(), nn.Linear(16, 12, bias=False),
                          nn.ReLU(), nn.Linear(12, 3))
    x = torch.randn(32, 6)
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    model(x).sum().backward()
    opt.step()
    row = opt.state[model[2].weight]["row_var"].clone()  # [12, 1] for a [12, 16] weight
    pruner = cleanai.StructuredPruner(model, x[:1], pruning_ratio=0.5, compensate="bias")
    pruner.calibrate([x])
    with slice_optimizer_state(opt, model):
        pruner.step()
    rows = [e for e in pruner.history[-1]["layers"] if e["name"] == "2" and e["kind"] == "out"]
    keep = torch.tensor(rows[0]["keep"])
    torch.testing.assert_close(opt.state[model[2].weight]["row_var"], row[keep])
    assert model[2].bias is not None  # compensation gave layer 2 a bias
    assert any(p is model[2].bias for p in opt.param_groups[0]["params"])
    model(x).sum().backward()
    opt.step()


def test_group_sparsity_is_the_group_norm():
    torch.manual_seed(0)
    model = Net()
    for m in model.modules():  # BN scales and shifts away from 1 and 0
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    pruner = cleanai.StructuredPruner(model, batch()[0][:1])
    reg = GroupSparsity(pruner, lam=0.3)
    value = reg()
    # by hand: channel c of conv1's group lives in conv1 rows and bias, bn1, bn2, conv2 rows
    # and columns, conv3 columns; conv3's channel c in its rows and 4 flattened fc columns
    c1, b1, b2, c2, c3, fc = (model.conv1, model.bn1, model.bn2, model.conv2, model.conv3,
                              model.fc)
    g1 = (c1.weight.pow(2).sum((1, 2, 3)) + c1.bias ** 2 + b1.weight ** 2 + b1.bias ** 2
          + b2.weight ** 2 + b2.bias ** 2 + c2.weight.pow(2).sum((1, 2, 3))
          + c2.weight.pow(2).sum((0, 2, 3)) + c3.weight.pow(2).sum((0, 2, 3)))
    g2 = c3.weight.pow(2).sum((1, 2, 3)) + fc.weight.pow(2).sum(0).view(12, 4).sum(1)
    explicit = 0.3 * (g1.sqrt().sum() + g2.sqrt().sum())
    torch.testing.assert_close(value, explicit)
    got = torch.autograd.grad(value, list(model.parameters()), allow_unused=True)
    want = torch.autograd.grad(explicit, list(model.parameters()), allow_unused=True)
    for (n, _), a, b in zip(model.named_parameters(), got, want):
        if b is None:
            assert a is None or not a.any(), n
        else:
            torch.testing.assert_close(a, b, msg=n)
    assert fc.bias.grad is None and got[-1] is None  # the model's outputs are not penalised

    slim = BatchNormScaleSparsity(pruner, lam=0.5)
    torch.testing.assert_close(slim(), 0.5 * (b1.weight.abs().sum() + b2.weight.abs().sum()))
    ignored = GroupSparsity(cleanai.StructuredPruner(model, batch()[0][:1],
                                                     ignored_layers=[model.conv3]), lam=0.3)
    assert len(ignored.groups()) == 1  # conv3's group follows the pruner's ignored_layers


def test_sparse_training_zeroes_whole_channels_and_the_prune_is_then_lossless():
    """Trained with a strong penalty, some channels end near zero in every member; pruning them
    barely moves the outputs. The schedule's factor scales the penalty."""
    torch.manual_seed(0)
    model = Net()
    pruner = cleanai.StructuredPruner(model, batch()[0][:1], pruning_ratio=0.25,
                                      kinds=["channels"])
    reg = GroupSparsity(pruner, lam=0.05, schedule=lambda t: min(1.0, t / 20))
    assert reg().item() == 0.0 and reg.calls == 1
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for s in range(300):
        train_step(model, opt, s % 4, reg)
    model.eval()
    x = batch(7, 32)[0]
    before = model(x).detach()
    pruner.step()
    assert model.conv3.out_channels == 9
    torch.testing.assert_close(model(x), before, atol=1e-2, rtol=0)


def test_a_loop_that_keeps_its_last_loss_alive_trains_on_after_a_step():
    """The last ``loss`` holds its graph, and with it each weight's gradient accumulator; a
    step changes the weights' shapes, and the next backward must not expect the old ones."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = cleanai.StructuredPruner(model, batch()[0][:1], pruning_ratio=0.5)
    for s in range(3):
        x, y = batch(s)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if s == 1:
            with slice_optimizer_state(opt, model):
                pruner.step()
    assert model.conv1.out_channels == 4 and model.conv1.weight.grad.shape == (4, 3, 3, 3)


def test_amp_grad_scaler_and_lr_scheduler_keep_working():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu")
    pruner = cleanai.StructuredPruner(model, batch()[0][:1], pruning_ratio=0.5)
    reg = GroupSparsity(pruner, 1e-3)
    gradual = GradualPruner(pruner, start=2, end=4, every=1, optimizer=opt, total_steps=6)
    for s in range(6):
        x, y = batch(s)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y) + reg()
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        gradual.step()
    assert gradual.done and model.conv1.out_channels == 4
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5 ** 3)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_gradual_pruning_reaches_the_scheduled_widths_at_the_scheduled_iterations():
    torch.manual_seed(0)
    model = Net((32, 12))
    x = batch()[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pruner = cleanai.StructuredPruner(model, x[:1], importance=ActivationImportance(),
                                      pruning_ratio=0.5)
    gradual = GradualPruner(pruner, start=3, end=9, every=2, optimizer=opt,
                            data=[batch(s)[0] for s in range(2)])
    assert gradual.events == [3, 5, 7, 9]
    # cubic: 1 - (1 - k/4)^3 of the ratio 0.5 of 32 channels, removed counts rounded down
    want = {3: 32 - 9, 5: 32 - 14, 7: 32 - 15, 9: 16}
    widths = {}
    for it in range(1, 12):
        train_step(model, opt, it)
        plan = gradual.step()
        assert (plan is not None) == (it in want)
        widths[it] = model.conv1.out_channels
    assert {it: widths[it] for it in want} == want
    assert widths[4] == widths[3] and widths[11] == 16 and gradual.done
    hooks = [h for m in model.modules()
             for h in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks) if h]
    assert not hooks  # calibration before each step left none behind

    linear = GradualPruner(cleanai.StructuredPruner(Net((32, 12)), x[:1], pruning_ratio=0.5),
                           start=1, end=4, every=1, schedule="linear")
    assert linear.fractions == [0.25, 0.5, 0.75, 1.0]


def test_gradual_pruning_to_a_mac_budget():
    torch.manual_seed(0)
    model = Net((32, 24))
    x = batch()[0][:1]
    dense = cleanai.utils.count_macs(model, x)
    pruner = cleanai.StructuredPruner(model, x, target_macs=0.4)
    gradual = GradualPruner(pruner, start=1, end=3, every=1)
    macs = []
    for _ in range(3):
        gradual.step()
        macs.append(cleanai.utils.count_macs(model, x) / dense)
    for got, share in zip(macs, gradual.fractions):  # each step meets its share of the budget
        assert got <= 1 - 0.6 * share + 1e-9
    assert macs[0] > macs[2] and 0.39 <= macs[2] <= 0.4


def test_bad_input_is_refused_with_the_model_untouched():
    model = Net()
    x = batch()[0][:1]
    pruner = cleanai.StructuredPruner(model, x)
    with pytest.raises(ValueError, match="lam"):
        GroupSparsity(pruner, lam=-1e-4)
    with pytest.raises(ValueError, match="norm"):
        GroupSparsity(pruner, lam=1e-4, norm="l3")
    with pytest.raises(TypeError, match="StructuredPruner or a DependencyGraph"):
        GroupSparsity(model, lam=1e-4)
    with pytest.raises(ValueError, match="past the end of training"):
        GradualPruner(pruner, start=10, end=200, every=10, total_steps=100)
    with pytest.raises(ValueError, match="end .* before start"):
        GradualPruner(pruner, start=10, end=5, every=1)
    other = torch.optim.SGD(Net().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="holds none of the Net's parameters"):
        GradualPruner(pruner, start=1, end=5, every=1, optimizer=other)
    with pytest.raises(ValueError, match="holds none"):
        slice_optimizer_state(other, model)
    with pytest.raises(ValueError, match="needs calibration data"):
        GradualPruner(cleanai.StructuredPruner(model, x, importance=ActivationImportance()),
                      start=1, end=5, every=1)
    with pytest.raises(ValueError, match="rise from"):
        GradualPruner(pruner, start=1, end=5, every=1, schedule=lambda p: 0.5)
    shapes = [p.shape for p in model.parameters()]
    assert pruner.current_step == 0 and shapes == [p.shape for p in Net().parameters()]
    pruner.step()
    with pytest.raises(ValueError, match="already took 1 step"):
        GradualPruner(pruner, start=1, end=5, every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(RuntimeError, match="without a recorded CleanAI step"):
        with slice_optimizer_state(opt, model):
            model.fc.weight.data = model.fc.weight.data[:, :4]
