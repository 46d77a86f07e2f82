"""distill: a pruned model trained to match its dense teacher, values only, all or nothing."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import cleanai
from cleanai.recover.common import RecoveryError, kept_indices
from cleanai.recover.distillation import DistillationReport, distill


def make_classifier():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


class Encoder(nn.Module):
    """Token features (N, L, 16) -> {"last_hidden_state": (N, L, 16)}, or the bare 3-D tensor."""

    def __init__(self, as_dict=True):
        super().__init__()
        self.up = nn.Linear(16, 48)
        self.down = nn.Linear(48, 16)
        self.norm = nn.LayerNorm(16)
        self.as_dict = as_dict

    def forward(self, x):
        h = self.norm(x + self.down(F.gelu(self.up(x))))
        return {"last_hidden_state": h} if self.as_dict else h


def pruned(factory, example):
    model = factory()
    teacher = copy.deepcopy(model)
    cleanai.StructuredPruner(model, example, pruning_ratio=0.4).step()
    return model, teacher


def images(n, seed, labels=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    return (x, torch.randint(0, 10, (n,), generator=g)) if labels else x


def image_batches(k, seed=1, labels=True, size=16):
    return [images(size, seed + i, labels) for i in range(k)]


def tokens(k, seed=100):
    return [torch.randn(8, 6, 16, generator=torch.Generator().manual_seed(seed + i)) for i in range(k)]


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def kl(student, teacher, x, T=2.0):
    with torch.no_grad():
        s, t = student.eval()(x), teacher.eval()(x)
    return float(F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1),
                          log_target=True, reduction="batchmean"))


def cos_err(student, teacher, x):
    with torch.no_grad():
        s = student.eval()(x)["last_hidden_state"]
        t = teacher.eval()(x)["last_hidden_state"]
    return float(1 - F.cosine_similarity(s, t, dim=-1).mean())


@pytest.fixture
def classifier():
    return pruned(make_classifier, torch.randn(1, 3, 8, 8))


# ---- it recovers -------------------------------------------------------------------------

def test_classifier_kl_to_teacher_drops_on_held_out_data(classifier):
    model, teacher = classifier
    held_out = images(64, seed=999, labels=False)
    before = kl(model, teacher, held_out)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())

    report = distill(model, teacher, image_batches(8), epochs=6, lr=1e-2, progress=False)

    assert report.loss == "kl" and report.steps == 48 and report.epochs_seen == 6.0
    assert report.loss_end < report.loss_start
    assert kl(model, teacher, held_out) < 0.6 * before
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_encoder_cosine_error_drops_and_auto_picks_cosine():
    model, teacher = pruned(Encoder, torch.randn(2, 6, 16))
    assert model.up.out_features < 48
    held_out = torch.randn(32, 6, 16, generator=torch.Generator().manual_seed(7))
    before = cos_err(model, teacher, held_out)
    report = distill(model, teacher, tokens(6), epochs=8, lr=1e-2, progress=False)
    assert report.loss == "cosine"
    assert cos_err(model, teacher, held_out) < 0.6 * before

    bare, bare_teacher = pruned(lambda: Encoder(as_dict=False), torch.randn(2, 6, 16))
    assert distill(bare, bare_teacher, tokens(2), steps=1, progress=False).loss == "cosine"


def test_pruned_and_distilled_model_saves_and_loads(classifier, tmp_path):
    model, teacher = classifier
    distill(model, teacher, image_batches(2), steps=3, lr=1e-2, progress=False)
    cleanai.save_pruned(model, tmp_path / "m")
    loaded = cleanai.load_pruned(make_classifier, tmp_path / "m")
    x = images(4, seed=5, labels=False)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


# ---- deterministic, and the caller's RNG untouched ---------------------------------------

def test_same_seed_gives_identical_weights_and_caller_rng_is_untouched(classifier):
    model, teacher = classifier
    x, y = images(48, seed=3)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)  # shuffle draws from torch's RNG
    runs = []
    for seed in (0, 0, 1):
        student = copy.deepcopy(model)
        torch.manual_seed(1234)
        rng = torch.get_rng_state()
        distill(student, teacher, loader, steps=9, lr=1e-2, seed=seed, progress=False)
        assert torch.equal(torch.get_rng_state(), rng)
        runs.append(state(student))
    assert same(runs[0], runs[1])
    assert not same(runs[0], runs[2])


# ---- intermediate layers -----------------------------------------------------------------

def test_layer_matching_maps_the_pruned_channels_and_lowers_that_layers_error(classifier):
    model, teacher = classifier
    # conv "3" lost input and output channels: its output differs from the teacher's kept ones
    kept = kept_indices(model)[("3", "out", -1)]
    assert model[3].out_channels == len(kept) < teacher[3].out_channels
    x = images(16, seed=1, labels=False)
    feature = {}
    model[3].register_forward_hook(lambda m, a, out: feature.update(s=out))
    teacher[3].register_forward_hook(lambda m, a, out: feature.update(t=out))

    def layer_err():
        with torch.no_grad():
            model.train()(x), teacher.eval()(x)
            t = feature["t"].index_select(1, kept)
            return float(F.mse_loss(feature["s"], t) / t.pow(2).mean())

    before = layer_err()
    assert before > 0.05
    report = distill(model, teacher, [x], steps=20, lr=1e-2, layers=["3"],
                     loss=lambda s, t: s.sum() * 0, progress=False)
    # the first step's loss is exactly the teacher's kept channels against the model's
    assert report.losses[0] == pytest.approx(before, rel=1e-5)
    assert layer_err() < 0.5 * before


def test_unknown_layer_name_suggests_close_matches(classifier):
    model, teacher = classifier
    before = state(model)
    with pytest.raises(ValueError, match=r"no layer named '30'.*'3'"):
        distill(model, teacher, image_batches(1), layers=["30"], progress=False)
    assert same(state(model), before)



class MaskedEncoder(nn.Module):
    """Dict batches {"x": (N, L, 16), "attention_mask": (N, L)} -> last_hidden_state."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 48)
        self.down = nn.Linear(48, 16)

    def forward(self, x, attention_mask):
        return {"last_hidden_state": self.down(F.gelu(self.up(x)))}


def test_layer_matching_leaves_padded_tokens_out():
    torch.manual_seed(0)
    model = MaskedEncoder()
    teacher = copy.deepcopy(model)
    x = torch.randn(4, 6, 16)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1:, 3:] = 0
    cleanai.StructuredPruner(model, {"x": x, "attention_mask": mask}, pruning_ratio=0.5).step()
    with torch.no_grad():  # padded positions get a huge error that must not count
        x_pad = x.clone()
        x_pad[mask == 0] = 1e3
        model.eval()(x_pad, mask)
        s, t = model.down(F.gelu(model.up(x_pad))), teacher.down(F.gelu(teacher.up(x_pad)))
        real = mask.bool()
        expected = float((s[real] - t[real]).pow(2).mean() / t[real].pow(2).mean())
    report = distill(model, teacher, [{"x": x_pad, "attention_mask": mask}], steps=1,
                     layers=["down"], loss=lambda s, t: s.sum() * 0, progress=False)
    assert report.losses[0] == pytest.approx(expected, rel=1e-5)

# ---- labels ------------------------------------------------------------------------------

def test_label_weight_mixes_cross_entropy_on_labelled_batches(classifier):
    model, teacher = classifier
    (x, y), = image_batches(1)
    with torch.no_grad():
        ce = float(F.cross_entropy(copy.deepcopy(model).train()(x), y))
        kd = distill(  # under no_grad on purpose: distill turns grad on itself
copy.deepcopy(model), teacher, [(x, y)], steps=1, progress=False).losses[0]
    only_labels = distill(copy.deepcopy(model), teacher, [(x, y)], steps=1, label_weight=1.0,
                          progress=False)
    assert only_labels.losses[0] == pytest.approx(ce, rel=1e-5)
    half = distill(copy.deepcopy(model), teacher, [(x, y)], steps=1, label_weight=0.5,
                   progress=False)
    assert half.losses[0] == pytest.approx(0.5 * ce + 0.5 * kd, rel=1e-5)


def test_label_weight_without_labels_is_a_clear_error(classifier):
    model, teacher = classifier
    before = state(model)
    with pytest.raises(ValueError, match=r"needs \(inputs, labels\) batches"):
        distill(model, teacher, image_batches(2, labels=False), label_weight=0.3, progress=False)
    assert same(state(model), before)


# ---- what it leaves behind ---------------------------------------------------------------

def test_modes_flags_hooks_and_grads_are_restored(classifier):
    model, teacher = classifier
    model.eval()
    model[3].train()
    teacher.train()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.clone()
    modes = [m.training for m in model.modules()] + [m.training for m in teacher.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    teacher_before = state(teacher)

    distill(model, teacher, image_batches(2), steps=3, lr=1e-2, layers=["0", "3"], progress=False)

    assert [m.training for m in model.modules()] + [m.training for m in teacher.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(model[0].weight, frozen)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not m._forward_hooks for m in list(model.modules()) + list(teacher.modules()))
    assert same(state(teacher), teacher_before)


def test_user_optimizer_is_used_as_given(classifier):
    model, teacher = classifier
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    before = state(model)
    distill(model, teacher, image_batches(2), steps=2, optimizer=opt, progress=False)
    assert not same(state(model), before)
    assert len(opt.state) > 0  # its momentum buffers: this optimizer took the steps
    assert opt.param_groups[0]["lr"] == 0.05  # no schedule on a user optimizer
    stale = torch.optim.SGD(teacher.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not parameters of the pruned model"):
        distill(model, teacher, image_batches(1), optimizer=stale, progress=False)


def test_generators_are_cycled_and_max_batches_bounds_a_pass(classifier):
    model, teacher = classifier
    report = distill(model, teacher, (b for b in image_batches(3)), steps=7, progress=False)
    assert report.steps == 7 and report.epochs_seen == pytest.approx(7 / 3)
    report = distill(model, teacher, image_batches(5), epochs=2, max_batches=2, progress=False)
    assert report.steps == 4 and report.epochs_seen == 2.0


# ---- bad input: a clear error, the model untouched ---------------------------------------

def _nan_batches():
    good, (x, y) = image_batches(2)
    return [good, (x.fill_(float("nan")), y)]


BAD = {
    "no data": (dict(data=None), RecoveryError, "needs data"),
    "empty data": (dict(data=[]), RecoveryError, "yielded no batches"),
    "steps 0": (dict(steps=0), ValueError, "steps must be a positive int"),
    "epochs 0": (dict(epochs=0), ValueError, "epochs must be a positive int"),
    "both": (dict(steps=2, epochs=1), ValueError, "not both"),
    "temperature": (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    "loss name": (dict(loss="hinge"), ValueError, "unknown loss 'hinge'"),
    "batch does not run": (dict(data=[torch.randn(2, 4, 8, 8)]), RecoveryError,
                           "batch 0 does not run through the teacher"),
    "output shapes": (dict(forward_fn=lambda m, x: m[0](x)), RecoveryError,
                      r"model's output has shape \(16, 5, 8, 8\) but the teacher's has \(16, 8, 8, 8\)"),
    "nan after a step": (dict(data=_nan_batches(), lr=1e-1), RecoveryError, "loss at step 1 holds NaN"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_and_leaves_the_model_bit_identical(classifier, case):
    model, teacher = classifier
    kwargs, error, message = BAD[case]
    kwargs = dict(kwargs)
    data = kwargs.pop("data", image_batches(2))
    before, modes = state(model), [m.training for m in model.modules()]
    with pytest.raises(error, match=message):
        distill(model, teacher, data, progress=False, **kwargs)
    assert same(state(model), before)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())


def test_wrong_teacher_or_unpruned_model_is_refused(classifier):
    model, teacher = classifier
    before = state(model)
    other = make_classifier()[:-1].append(nn.Linear(16, 3))
    with pytest.raises(RecoveryError, match="not the architecture"):
        distill(model, other, image_batches(1), progress=False)
    with pytest.raises(RecoveryError, match="was not pruned"):
        distill(copy.deepcopy(teacher), teacher, image_batches(1), progress=False)
    assert same(state(model), before)


def test_keyboard_interrupt_mid_run_restores_the_model(classifier):
    model, teacher = classifier
    before = state(model)
    calls = []

    def loss(s, t):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return F.mse_loss(s, t)

    with pytest.raises(KeyboardInterrupt):
        distill(model, teacher, image_batches(4), loss=loss, lr=1e-1, progress=False)
    assert len(calls) == 3
    assert same(state(model), before)
    assert all(not m._forward_hooks for m in list(model.modules()) + list(teacher.modules()))


# ---- report ------------------------------------------------------------------------------

def test_report_prints_and_serialises(classifier, capsys):
    model, teacher = classifier
    report = distill(model, teacher, image_batches(3), steps=12, lr=1e-2, progress=True)
    assert "distilling" in capsys.readouterr().err  # the tqdm bar
    assert isinstance(report, DistillationReport)
    assert len(report.losses) == 12
    assert report.loss_start == pytest.approx(sum(report.losses[:10]) / 10)
    assert report.loss_end == pytest.approx(sum(report.losses[-10:]) / 10)
    assert report.epochs_seen == pytest.approx(4.0)
    text = str(report)
    assert "12 steps" in text and "kl loss" in text and f"{report.loss_end:.4g}" in text
    back = json.loads(json.dumps(report.to_dict()))
    assert back["steps"] == 12 and back["losses"] == report.losses


def test_default_optimizer_is_adamw_with_cosine_decay(classifier):
    model, teacher = classifier
    data, lr, steps = image_batches(3, labels=False), 1e-2, 3
    reference = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(reference.parameters(), lr=lr)
    for i, x in enumerate(data):
        opt.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / steps))
        opt.zero_grad()
        with torch.no_grad():
            t = teacher.eval()(x)
        F.mse_loss(reference(x), t).backward()
        opt.step()
    distill(model, teacher, data, steps=steps, lr=lr, loss=lambda s, t: F.mse_loss(s, t),
            progress=False)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in
               zip(model.state_dict().values(), reference.state_dict().values()))


@pytest.mark.parametrize("name", ["kl", "cosine", "mse"])
def test_each_named_loss_is_the_documented_formula(classifier, name):
    model, teacher = classifier
    x, T = images(16, seed=4, labels=False), 3.0
    with torch.no_grad():
        s, t = copy.deepcopy(model).train()(x), teacher.eval()(x)
    expected = {
        "kl": F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                       reduction="batchmean") * T ** 2,
        "cosine": 1 - F.cosine_similarity(s, t, dim=-1).mean(),
        "mse": F.mse_loss(s, t) / t.pow(2).mean(),
    }[name]
    report = distill(model, teacher, [x], steps=1, loss=name, temperature=T, progress=False)
    assert report.loss == name
    assert report.losses[0] == pytest.approx(float(expected), rel=1e-5)
