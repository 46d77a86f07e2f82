"""reconstruct(): refit a pruned model against its dense teacher, unit by unit."""
import copy
import json
import math

import pytest
import torch
from torch import nn

import cleanai
from cleanai.recover.common import RecoveryError, kept_indices
from cleanai.recover.reconstruction import ReconstructionReport, reconstruct


# --- models -----------------------------------------------------------------------------------

class Res(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Sep(nn.Module):
    """Depthwise 3x3 (stride 1) then a grouped 1x1 conv, with a residual add."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.gc = nn.Conv2d(c, c, 1, groups=4)

    def forward(self, x):
        return x + self.gc(torch.relu(self.dw(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(Res(16), Sep(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln(x))))


class Tiny(nn.Module):
    """A transformer-like stack: blocks in an nn.ModuleList."""

    def __init__(self, d=16):
        super().__init__()
        self.inp = nn.Linear(6, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(2)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h))


class Gate(nn.Module):
    """Scales its input by a learned gate: its output channels are its input's, and no layer
    inside produces them, so a block reconstruction cannot map them."""

    def __init__(self, c):
        super().__init__()
        self.fc = nn.Linear(c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x))


def mlp():
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4))


def conv1d_net():
    """Dilation, reflect padding, stride."""
    return nn.Sequential(nn.Conv1d(4, 16, 3, padding=2, dilation=2, padding_mode="reflect"),
                         nn.ReLU(), nn.Conv1d(16, 12, 5, stride=2, padding=1), nn.ReLU(),
                         nn.Conv1d(12, 6, 1))


def conv3d_net():
    """A 3d kernel, then a strided 1x3x3 kernel with 'valid' padding and no bias."""
    return nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv3d(8, 4, (1, 3, 3), stride=(1, 2, 2), padding="valid",
                                   bias=False))


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model


def pruned_pair(make, example, seed=0):
    """(pruned model, dense teacher) at pruning ratio 0.4."""
    torch.manual_seed(seed)
    teacher = _randomize_bn(make())
    model = copy.deepcopy(teacher)
    cleanai.StructuredPruner(model, example, pruning_ratio=0.4).step()
    return model.eval(), teacher.eval()


def batches(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def rel_err(model, teacher, xs):
    with torch.no_grad():
        num = sum(float(((model(x) - teacher(x)) ** 2).sum()) for x in xs)
        den = sum(float((teacher(x) ** 2).sum()) for x in xs)
    return num / den


def direct_error(model, teacher, name, xs):
    """A layer's relative error measured by running it: its input from ``model``, its target
    from ``teacher`` (kept output channels only)."""
    s_mod, t_mod = model.get_submodule(name), teacher.get_submodule(name)
    keep = kept_indices(model).get((name, "out", -1))
    dim = -1 if isinstance(s_mod, nn.Linear) else 1
    got = {}
    hs = [s_mod.register_forward_hook(lambda m, a, o: got.__setitem__("s", o)),
          t_mod.register_forward_hook(lambda m, a, o: got.__setitem__("t", o))]
    num = den = 0.0
    try:
        with torch.no_grad():
            for x in xs:
                model(x)
                teacher(x)
                t = got["t"] if keep is None else got["t"].index_select(dim, keep)
                num += float(((got["s"].double() - t.double()) ** 2).sum())
                den += float((t.double() ** 2).sum())
    finally:
        for h in hs:
            h.remove()
    return num / den


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_values(model, snap):
    state = model.state_dict()
    return state.keys() == snap.keys() and all(torch.equal(state[k], snap[k]) for k in snap)


def no_hooks(*models):
    return all(not m._forward_hooks and not m._forward_pre_hooks
               for model in models for m in model.modules())


# --- closed form ------------------------------------------------------------------------------

def test_closed_form_equals_lstsq():
    model, teacher = pruned_pair(lambda: nn.Sequential(nn.Linear(8, 32), nn.ReLU(),
                                                       nn.Linear(32, 4)), torch.randn(1, 8))
    assert model[2].in_features < 32  # the last layer's input was pruned
    xs = batches((64, 8), 4, seed=1)
    report = reconstruct(model, teacher, xs, damping=0.0, progress=False)
    assert [u["name"] for u in report.units] == ["0", "2"]
    with torch.no_grad():  # the inputs the last layer was solved on: the refit first layer's
        X = torch.cat([torch.relu(model[0](x)) for x in xs]).double()
        Y = torch.cat([teacher(x) for x in xs]).double()
    A = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    sol = torch.linalg.lstsq(A, Y).solution  # (in + 1, out)
    torch.testing.assert_close(model[2].weight.double(), sol[:-1].T, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model[2].bias.double(), sol[-1], atol=1e-6, rtol=1e-6)
    resid = float(((A @ sol - Y) ** 2).sum() / (Y ** 2).sum())
    assert report.units[1]["error_after"] == pytest.approx(resid, rel=1e-6)


@pytest.mark.parametrize("make,shape,example", [
    (ConvNet, (8, 3, 8, 8), torch.randn(1, 3, 8, 8)),
    (mlp, (64, 8), torch.randn(1, 8)),
])
def test_layer_mode_lowers_every_unit_and_held_out_error(make, shape, example):
    model, teacher = pruned_pair(make, example)
    calib, held_out = batches(shape, 6, seed=1), batches(shape, 4, seed=2)
    before = rel_err(model, teacher, held_out)
    report = reconstruct(model, teacher, calib, progress=False)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert [u["name"] for u in report.units] == names  # every layer, in forward order
    for u in report.units:
        assert u["kind"] == "layer" and u["method"] == "closed form"
        assert u["error_after"] <= u["error_before"]
    assert any(u["error_after"] < 0.5 * u["error_before"] for u in report.units)
    after = rel_err(model, teacher, held_out)
    assert after < 0.7 * before, (before, after)
    for u in report.units:  # the reported error is the one the layer really has
        assert direct_error(model, teacher, u["name"], calib) == \
            pytest.approx(u["error_after"], rel=1e-3, abs=1e-9)


def test_grouped_and_depthwise_convs_are_solved_in_closed_form():
    model, teacher = pruned_pair(ConvNet, torch.randn(1, 3, 8, 8))
    dw, gc = model.blocks[1].dw, model.blocks[1].gc
    assert dw.groups == dw.in_channels == dw.out_channels < 16 and gc.groups == 4
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    xs = batches((8, 3, 8, 8), 6, seed=1)
    # their channels were only sliced (their error is small): disturb their weights
    with torch.no_grad():
        for conv in (dw, gc):
            conv.weight.add_(0.3 * torch.randn_like(conv.weight))
    report = {u["name"]: u for u in reconstruct(model, teacher, xs, progress=False).units}
    for name in ("blocks.1.dw", "blocks.1.gc"):
        u = report[name]
        assert u["method"] == "closed form" and u["error_after"] < 0.1 * u["error_before"]
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert (dw.groups, gc.groups) == (dw.in_channels, 4)


@pytest.mark.parametrize("make,shape", [(conv1d_net, (8, 4, 20)),
                                        (conv3d_net, (4, 2, 3, 6, 6))])
def test_conv1d_and_conv3d_closed_form_error_is_the_real_one(make, shape):
    """The error the closed form computes from X^T X equals the error measured by running
    the refit layer: the unfolding matches the conv (dilation, stride, padding modes)."""
    model, teacher = pruned_pair(make, torch.randn(1, *shape[1:]))
    calib = batches(shape, 4, seed=1)
    report = reconstruct(model, teacher, calib, damping=1e-3, progress=False)
    assert [u["name"] for u in report.units] == [n for n, m in model.named_modules()
                                                 if isinstance(m, nn.modules.conv._ConvNd)]
    pruned_inputs = [u for u in report.units if u["name"] != "0"]
    assert all(u["error_after"] < u["error_before"] for u in pruned_inputs)
    for u in report.units:
        assert direct_error(model, teacher, u["name"], calib) == \
            pytest.approx(u["error_after"], rel=1e-3, abs=1e-9)


def test_damping_chosen_on_held_out_batches_beats_a_fixed_one_on_new_inputs():
    """96 rows per half for 45 unknowns: a lightly damped refit fits noise. Cross-validation
    over the even and odd batches pulls the refit towards the present weights as much as the
    held-out half asks, and does better on new inputs than both the fixed damping and no
    refit."""
    model, teacher = pruned_pair(conv3d_net, torch.randn(1, 2, 3, 6, 6))
    calib, fresh = batches((4, 2, 3, 6, 6), 4, seed=1), batches((4, 2, 3, 6, 6), 8, seed=2)
    plain = rel_err(model, teacher, fresh)
    fixed = copy.deepcopy(model)
    reconstruct(fixed, teacher, calib, damping=1e-3, progress=False)
    reconstruct(model, teacher, calib, progress=False)
    assert rel_err(model, teacher, fresh) < 0.9 * min(plain, rel_err(fixed, teacher, fresh))


def test_weights_that_already_fit_are_kept_when_a_refit_only_learns_noise():
    """Targets that are the present weights' output plus noise: the held-out halves keep the
    weights (``None``) or pull the refit all the way back to them."""
    from cleanai.recover.least_squares import choose_damping, squared_error
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(1, 30, 3, generator=g, dtype=torch.float64)
    sums = []
    for _ in range(2):
        x = torch.randn(40, 30, generator=g, dtype=torch.float64)
        y = x @ w0[0] + torch.randn(40, 3, generator=g, dtype=torch.float64)
        sums.append(((x.T @ x)[None], (x.T @ y)[None], (y * y).sum()))
    grams, xtys, yys = zip(*sums)
    kept = choose_damping(grams, xtys, yys, w0)
    assert kept is None or kept >= 10
    # a poor w0 is refit: the chosen damping's solve beats it on both halves together
    worse = w0 + 0.5 * torch.randn(w0.shape, generator=g, dtype=torch.float64)
    assert choose_damping(grams, xtys, yys, worse) < 1
    assert squared_error(w0, grams[0], xtys[0], yys[0]) < \
        squared_error(worse, grams[0], xtys[0], yys[0])


class _ScaledLinear(nn.Linear):
    """A Linear subclass with a forward of its own (as timm's ``Linear``), here not the plain
    product: a closed-form solve would fit the wrong function."""

    def forward(self, x):
        return 2.0 * nn.functional.linear(x, self.weight, self.bias)


def test_a_linear_subclass_with_its_own_forward_is_trained_through_that_forward():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                            _ScaledLinear(16, 3)).eval()
    model = copy.deepcopy(teacher)
    cleanai.StructuredPruner(model, torch.randn(1, 6), pruning_ratio=0.5).step()
    assert model[4].in_features == 8
    calib = batches((64, 6), 4, seed=1)
    before = rel_err(model, teacher, calib)
    report = reconstruct(model, teacher, calib, progress=False)
    assert {u["name"]: u["method"] for u in report.units}["4"] == "adam"
    assert rel_err(model, teacher, calib) < before


# --- blocks -----------------------------------------------------------------------------------

def test_block_mode_on_modulelist_blocks():
    model, teacher = pruned_pair(Tiny, torch.randn(1, 5, 6))
    assert model.blocks[0].fc1.out_features < 64
    calib, held_out = batches((16, 5, 6), 4, seed=1), batches((16, 5, 6), 4, seed=2)
    before = rel_err(model, teacher, held_out)
    report = reconstruct(model, teacher, calib, granularity="block", steps=150, lr=3e-3,
                         progress=False)
    kinds = {u["name"]: (u["kind"], u["method"]) for u in report.units}
    assert kinds == {"inp": ("layer", "closed form"), "blocks.0": ("block", "adam"),
                     "blocks.1": ("block", "adam"), "head": ("layer", "closed form")}
    for u in report.units:
        assert u["error_after"] <= u["error_before"]
    for u in report.units[1:3]:
        assert u["error_after"] < 0.7 * u["error_before"]
    assert rel_err(model, teacher, held_out) < before
    # the whole model's output, on the held-out batch (the 4th), as one measures it
    assert report.output_error_before == pytest.approx(rel_err(
        pruned_pair(Tiny, torch.randn(1, 5, 6))[0], teacher, calib[3:]), rel=1e-5)
    assert report.output_error_after == pytest.approx(rel_err(model, teacher, calib[3:]),
                                                      rel=1e-5)
    assert report.output_error_after < 0.7 * report.output_error_before
    assert not report.reverted and "model output error" in str(report)
    assert all(p.requires_grad for p in model.parameters())  # flags back as they were
    assert all(p.grad is None for p in model.parameters())


def test_block_mode_on_residual_convnet_keeps_batchnorm_statistics():
    model, teacher = pruned_pair(ConvNet, torch.randn(1, 3, 8, 8))
    bn_stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    report = reconstruct(model, teacher, batches((8, 3, 8, 8), 4, seed=1), granularity="block",
                         steps=40, lr=1e-2, progress=False)
    assert [(u["name"], u["kind"]) for u in report.units] == [
        ("stem.0", "layer"), ("blocks.0", "block"), ("blocks.1", "block"), ("head", "layer")]
    assert not report.notes  # both blocks' output channels mapped (through bn2 / gc)
    assert report.units[1]["error_after"] < report.units[1]["error_before"]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in bn_stats.items())


def test_block_without_channel_map_falls_back_to_its_layers():
    model, teacher = pruned_pair(lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), Gate(16),
                                                       nn.Linear(16, 4)), torch.randn(1, 8))
    assert model[3].in_features < 16
    report = reconstruct(model, teacher, batches((64, 8), 4, seed=1), granularity="block",
                         progress=False)
    assert [(u["name"], u["kind"]) for u in report.units] == [
        ("0", "layer"), ("2.fc", "layer"), ("3", "layer")]
    assert any(n.startswith("2:") and "one by one" in n for n in report.notes)


# --- what the user keeps ----------------------------------------------------------------------

def test_shapes_history_and_save_load_round_trip(tmp_path):
    model, teacher = pruned_pair(ConvNet, torch.randn(1, 3, 8, 8))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    count = sum(p.numel() for p in model.parameters())
    reconstruct(model, teacher, batches((8, 3, 8, 8), 4, seed=1), progress=False)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert sum(p.numel() for p in model.parameters()) == count
    cleanai.save_pruned(model, tmp_path / "m")
    loaded = cleanai.load_pruned(lambda: _randomize_bn(ConvNet()), tmp_path / "m").eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_modes_restored_and_no_hooks_left():
    model, teacher = pruned_pair(ConvNet, torch.randn(1, 3, 8, 8))
    model.train()
    teacher.blocks.train()
    report = reconstruct(model, teacher, batches((8, 3, 8, 8), 2, seed=1), progress=False)
    assert len(report.units) == 6
    assert all(m.training for m in model.modules())
    assert all(m.training == (n.startswith("blocks")) for n, m in teacher.named_modules())
    assert no_hooks(model, teacher)


def test_failure_half_way_leaves_model_unchanged_and_no_hooks():
    model, teacher = pruned_pair(ConvNet, torch.randn(1, 3, 8, 8))
    model.train()
    snap = snapshot(model)
    calls = []

    def flaky(m, x):  # runs a while (units get refit), then breaks
        calls.append(1)
        if len(calls) > 20:
            raise RuntimeError("device lost")
        return m(x)

    with pytest.raises(RecoveryError, match="does not run through the .*device lost"):
        reconstruct(model, teacher, batches((8, 3, 8, 8), 3, seed=1), forward_fn=flaky,
                    progress=False)
    assert same_values(model, snap)
    assert no_hooks(model, teacher)
    assert all(m.training for m in model.modules())


BAD = {  # name: (what to change, given model and teacher; the message expected)
    "data None": (lambda m, t: dict(data=None), "needs data"),
    "data empty": (lambda m, t: dict(data=[]), "no batches"),
    "batch does not run": (lambda m, t: dict(data=[torch.randn(4, 7)]),
                           "batch 0 does not run through the model"),
    "NaN in data": (lambda m, t: dict(data=[torch.randn(4, 8), torch.full((4, 8), math.nan)]),
                    "NaN"),
    "other teacher": (lambda m, t: dict(teacher=nn.Sequential(nn.Linear(8, 4))),
                      "not the architecture"),
    "not pruned": (lambda m, t: dict(model=copy.deepcopy(t)), "not pruned"),
    "granularity": (lambda m, t: dict(granularity="channel"), "granularity"),
    "steps": (lambda m, t: dict(steps=0), "steps"),
    "lr": (lambda m, t: dict(lr=0.0), "lr"),
    "damping": (lambda m, t: dict(damping=-1.0), "damping"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_and_leaves_model_unchanged(case):
    model, teacher = pruned_pair(mlp, torch.randn(1, 8))
    change, match = BAD[case]
    kw = dict(model=model, teacher=teacher, data=batches((16, 8), 2, seed=1))
    kw.update(change(model, teacher))
    snaps = {id(m): (m, snapshot(m)) for m in (model, teacher, kw["model"], kw["teacher"])}
    with pytest.raises(RecoveryError, match=match):
        reconstruct(kw.pop("model"), kw.pop("teacher"), kw.pop("data"), progress=False, **kw)
    assert all(same_values(m, snap) for m, snap in snaps.values())
    assert no_hooks(model, teacher)


def test_report_prints_and_is_json():
    model, teacher = pruned_pair(mlp, torch.randn(1, 8))
    report = reconstruct(model, teacher, batches((32, 8), 3, seed=1), progress=False)
    assert isinstance(report, ReconstructionReport) and report.batches == 3
    lines = str(report).splitlines()
    assert lines[0].split() == ["unit", "kind", "method", "error", "before", "error", "after"]
    assert [l.split()[0] for l in lines[2:5]] == ["0", "2", "4"]
    assert len({len(l) for l in lines[2:5]}) == 1  # aligned columns
    data = json.loads(json.dumps(report.to_dict()))
    assert [u["name"] for u in data["units"]] == ["0", "2", "4"]
    assert data["batches"] == 3 and data["seconds"] >= 0


def test_wide_layers_use_adam_and_offload(monkeypatch):
    import cleanai.recover.reconstruction as rec
    monkeypatch.setattr(rec, "MAX_CLOSED_FORM_DIM", 8)  # every layer here is wider
    model, teacher = pruned_pair(mlp, torch.randn(1, 8))
    report = reconstruct(model, teacher, batches((64, 8), 4, seed=1), steps=100, lr=1e-2,
                         offload=True, progress=True)
    assert [u["method"] for u in report.units] == ["adam"] * 3
    assert all(u["error_after"] <= u["error_before"] for u in report.units)
    assert report.units[-1]["error_after"] < 0.5 * report.units[-1]["error_before"]


def test_singular_gram_raises_damping_with_a_warning():
    model, teacher = pruned_pair(mlp, torch.randn(1, 8))
    xs = batches((64, 8), 2, seed=1)
    for x in xs:
        x[:, 1] = x[:, 0]  # two equal input features: X^T X is singular
    with pytest.warns(RuntimeWarning, match="singular"):
        report = reconstruct(model, teacher, xs, damping=0.0, progress=False)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert report.units[-1]["error_after"] < report.units[-1]["error_before"]


def test_a_layer_whose_weight_is_rebuilt_or_whose_output_is_hooked_is_trained_not_solved():
    """A parametrized weight is recomputed on every call (a solve written into it is lost) and
    a forward hook changes what the layer returns: both go to Adam, through the real call,
    and the model's own error drops."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    for change in ("parametrized", "hooked"):
        torch.manual_seed(0)
        teacher = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                                nn.Linear(16, 3)).eval()
        if change == "parametrized":
            parametrize.register_parametrization(teacher[4], "weight", Doubled())
        else:
            teacher[4].register_forward_hook(lambda m, a, out: 2 * out)
        model = copy.deepcopy(teacher)
        cleanai.StructuredPruner(model, torch.randn(1, 6), pruning_ratio=0.5).step()
        calib = batches((64, 6), 4, seed=1)
        before = rel_err(model, teacher, calib)
        report = reconstruct(model, teacher, calib, progress=False)
        assert {u["name"]: u["method"] for u in report.units}["4"] == "adam", change
        assert rel_err(model, teacher, calib) < before, change


class TwoOut(nn.Module):
    """Two residual streams sharing one pruned hidden layer: training it on one output alone
    would be free to spoil the other."""

    def __init__(self, da, db):
        super().__init__()
        self.fc1 = nn.Linear(da + db, 32)
        self.fc2 = nn.Linear(32, da)
        self.fc3 = nn.Linear(32, db)

    def forward(self, ab):
        a, b = ab
        h = torch.relu(self.fc1(torch.cat([a, b], -1)))
        return [a + self.fc2(h), b + self.fc3(h)]


class TwoStream(nn.Module):
    def __init__(self, da=8, db=12):
        super().__init__()
        self.inp_a, self.inp_b = nn.Linear(6, da), nn.Linear(6, db)
        self.blocks = nn.Sequential(TwoOut(da, db), TwoOut(da, db))
        self.head = nn.Linear(da + db, 3)

    def forward(self, x):
        return self.head(torch.cat(self.blocks([self.inp_a(x), self.inp_b(x)]), -1))


def _outputs_error(model, teacher, name, xs):
    """Relative error of each of the two output tensors of ``name``, the teacher's channels
    mapped through the kept ones of the layer that feeds each (``fc2``, ``fc3``)."""
    keep = kept_indices(model)
    maps = [keep.get((f"{name}.fc{k}", "out", -1)) for k in (2, 3)]
    got = {}
    hooks = [model.get_submodule(name).register_forward_hook(
                 lambda m, a, o: got.__setitem__("s", o)),
             teacher.get_submodule(name).register_forward_hook(
                 lambda m, a, o: got.__setitem__("t", o))]
    num, den = [0.0, 0.0], [0.0, 0.0]
    try:
        with torch.no_grad():
            for x in xs:
                model(x)
                teacher(x)
                for k, kept in enumerate(maps):
                    t = got["t"][k] if kept is None else got["t"][k][..., kept]
                    num[k] += float(((got["s"][k] - t) ** 2).sum())
                    den[k] += float((t ** 2).sum())
    finally:
        for h in hooks:
            h.remove()
    return [n / d for n, d in zip(num, den)]


def test_block_with_several_outputs_is_fit_on_all_of_them():
    model, teacher = pruned_pair(TwoStream, torch.randn(1, 6))
    assert model.blocks[0].fc2.out_features < 8 and model.blocks[0].fc3.out_features < 12
    calib = batches((64, 6), 4, seed=1)
    before = _outputs_error(model, teacher, "blocks.1", calib)
    report = reconstruct(model, teacher, calib, granularity="block", steps=200, lr=3e-3,
                         progress=False)
    assert [(u["name"], u["kind"]) for u in report.units] == [
        ("inp_a", "layer"), ("inp_b", "layer"), ("blocks.0", "block"), ("blocks.1", "block"),
        ("head", "layer")]
    after = _outputs_error(model, teacher, "blocks.1", calib)
    assert after[0] < 0.7 * before[0] and after[1] < 0.7 * before[1]


def test_block_whose_outputs_cannot_be_told_apart_falls_back_to_its_layers():
    """Both streams narrowed to the same width by different channels: which layer's kept
    channels belong to which output is not known, so the block is not guessed."""
    model, teacher = pruned_pair(lambda: TwoStream(8, 8), torch.randn(1, 6))
    report = reconstruct(model, teacher, batches((64, 6), 4, seed=1), granularity="block",
                         progress=False)
    assert all(u["kind"] == "layer" for u in report.units)
    assert any(n.startswith("blocks.0:") and "one by one" in n for n in report.notes)


class Tanh(nn.Module):
    def __init__(self, d=16, h=64):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


def test_block_refit_is_judged_on_held_out_batches(monkeypatch):
    """A block already close to the teacher (lstsq on plenty of data), refit on 8 batches of
    one row: fit to those rows alone, Adam makes new rows worse for some seeds; with every
    fourth batch held out it never does."""
    fit_all, held_out = [], []
    for seed in range(6):
        torch.manual_seed(seed)
        teacher = nn.Sequential(nn.Linear(16, 16), nn.Sequential(Tanh()),
                                nn.Linear(16, 4)).eval()
        pruned = copy.deepcopy(teacher)
        pruner = cleanai.StructuredPruner(pruned, torch.randn(1, 16), pruning_ratio=0.5,
                                          compensate="lstsq",
                                          ignored_layers=[pruned[0], pruned[2]])
        g = torch.Generator().manual_seed(1)
        pruner.calibrate([torch.randn(256, 16, generator=g) for _ in range(4)])
        pruner.step()
        calib = [torch.randn(1, 16, generator=g) for _ in range(8)]
        new = [torch.randn(512, 16, generator=g)]
        before = direct_error(pruned, teacher, "1.0", new)
        for every, errors in ((10 ** 9, fit_all), (4, held_out)):
            monkeypatch.setattr("cleanai.recover.reconstruction.HELD_OUT_EVERY", every)
            model = copy.deepcopy(pruned)
            reconstruct(model, teacher, calib, granularity="block", steps=300, lr=1e-2,
                        progress=False)
            errors.append(direct_error(model, teacher, "1.0", new) / before)
    assert sum(r > 2 for r in fit_all) >= 2
    assert max(held_out) < 1.05


class Extra(nn.Module):
    """A block that also returns a mask, the indices it kept and an input it hands on (as T5
    hands on its position bias): none of them is a target (nothing to fit, or nothing the
    block computes)."""

    def __init__(self, d=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 64), nn.Linear(64, d)

    def forward(self, x, bias):
        h = x + self.fc2(torch.relu(self.fc1(x)))
        return h, h[..., 0] > 0, torch.arange(x.shape[0]), bias


class ExtraNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.blocks = nn.ModuleList([Extra(), Extra()])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        # as wide as nothing the pruned model has: were it a target, no layer's kept
        # channels would map it to the teacher's, and the blocks would go layer by layer
        bias = torch.ones(h.shape[-1] + 1, 5)
        for b in self.blocks:
            h, _, _, bias = b(h, bias)
        return self.head(h)


def test_block_outputs_that_are_not_targets_are_left_out():
    model, teacher = pruned_pair(ExtraNet, torch.randn(1, 6))
    calib = batches((32, 6), 4, seed=1)
    report = reconstruct(model, teacher, calib, granularity="block", steps=50, lr=3e-3,
                         progress=False)
    assert [(u["name"], u["kind"]) for u in report.units] == [
        ("inp", "layer"), ("blocks.0", "block"), ("blocks.1", "block"), ("head", "layer")]
    assert report.units[1]["error_after"] < report.units[1]["error_before"]


@pytest.mark.parametrize("fail_at", ["first", "last"])
def test_a_forward_failing_in_the_output_check_raises_and_leaves_the_model(fail_at):
    """The whole-model check runs the model and the teacher on held-out batches before and
    after the units: a forward failing there is a RecoveryError, the model as it was."""
    model, teacher = pruned_pair(Tiny, torch.randn(1, 5, 6))
    state = copy.deepcopy(model.state_dict())
    calib = batches((16, 5, 6), 4, seed=1)
    calls = []

    def count(m, x):
        calls.append(1)
        return m(x)
    reconstruct(copy.deepcopy(model), teacher, calib, forward_fn=count, progress=False)
    fail = {"first": 3, "last": len(calls)}[fail_at]  # after the model's and teacher's probe
    calls.clear()

    def flaky(m, x):
        calls.append(1)
        if len(calls) == fail:
            raise RuntimeError("device lost")
        return m(x)
    with pytest.raises(RecoveryError, match="does not run through"):
        reconstruct(model, teacher, calib, forward_fn=flaky, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_units_that_fit_but_spoil_the_output_are_all_put_back(monkeypatch):
    """Each unit is judged alone; when the refit units together leave the model's output
    further from the teacher's on held-out batches, every unit gets its weights back."""
    import cleanai.recover.reconstruction as rec
    real = rec._reconstruct_unit

    def spoil(run, unit):  # a refit as reported, then the unit's weights scaled up
        row = real(run, unit)
        with torch.no_grad():
            for p in unit.module.parameters():
                p.mul_(3.0)
        return row

    monkeypatch.setattr(rec, "_reconstruct_unit", spoil)
    model, teacher = pruned_pair(Tiny, torch.randn(1, 5, 6))
    state = copy.deepcopy(model.state_dict())
    report = reconstruct(model, teacher, batches((16, 5, 6), 4, seed=1), progress=False)
    assert report.reverted
    assert report.output_error_after > report.output_error_before
    assert any("every unit was put back" in n for n in report.notes)
    assert "every unit put back" in str(report)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert json.loads(json.dumps(report.to_dict()))["reverted"] is True
