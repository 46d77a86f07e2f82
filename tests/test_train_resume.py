"""Resuming a training run that prunes: stopped between two pruning steps, saved, rebuilt in
fresh objects and resumed, it ends exactly where the uninterrupted run does; a state from
another schedule, pruner or model is refused with nothing changed."""
import json

import pytest
import torch
import torch.nn.functional as F

import cleanai
from cleanai.train import GradualPruner, GroupSparsity
from test_train import Net, batch

ITERATIONS = 10
START, END, EVERY = 2, 8, 3  # pruning steps after iterations 2, 5 and 8
STOP = 6  # the interrupted run stops here, between the second and the third step
AIM = (3, 6)  # iterations after which the penalty is aimed at the next plan's channels

OPTIMIZERS = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
}
PRUNERS = {  # StructuredPruner settings, and whether GradualPruner needs calibration data
    "ratio": (dict(pruning_ratio=0.5), False),
    "macs-budget": (dict(target_macs=0.4), False),
    "compensated": (dict(pruning_ratio=0.5, compensate="bias"), True),
    "absolute-macs": (dict(target_macs=72_900), False),  # 0.4 of the dense 182,256
}


class Run:
    """A model, its optimizer, a pruner under a GradualPruner and a GroupSparsity penalty,
    built as a training script builds them; ``model`` given to resume a reloaded one."""

    def __init__(self, opt, pruner, model=None):
        if model is None:
            torch.manual_seed(0)
            model = Net((16, 12))
        self.model = model
        self.opt = OPTIMIZERS[opt](model.parameters())
        settings, needs_data = PRUNERS[pruner]
        self.pruner = cleanai.StructuredPruner(model, batch()[0][:1], **settings)
        self.gradual = GradualPruner(self.pruner, start=START, end=END, every=EVERY,
                                     optimizer=self.opt, total_steps=ITERATIONS,
                                     data=[batch(99)[0]] if needs_data else None)
        self.reg = GroupSparsity(self.pruner, lam=1e-2, schedule=lambda t: min(1.0, (t + 1) / 4))

    def train(self, first, last):
        for it in range(first, last + 1):
            x, y = batch(it)
            loss = F.cross_entropy(self.model(x), y) + self.reg()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.gradual.step()
            if it in AIM:
                self.reg.target(self.pruner.plan())

    def save(self, folder):
        cleanai.save_pruned(self.model, folder / "model")
        torch.save(self.opt.state_dict(), folder / "optimizer.pt")
        # plain data: JSON holds it as well as torch.save
        (folder / "gradual.json").write_text(json.dumps(self.gradual.state_dict()))
        (folder / "reg.json").write_text(json.dumps(self.reg.state_dict()))

    @classmethod
    def resume(cls, opt, pruner, folder):
        run = cls(opt, pruner, cleanai.load_pruned(Net((16, 12)), folder / "model"))
        run.gradual.load_state_dict(json.loads((folder / "gradual.json").read_text()))
        run.opt.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        run.reg.load_state_dict(json.loads((folder / "reg.json").read_text()))
        return run


def optimizer_state(run):
    """``{param name: {key: value}}``: the optimizer's state by the model's names."""
    names = {id(p): n for n, p in run.model.named_parameters()}
    held = [names[id(p)] for g in run.opt.param_groups for p in g["params"]]
    assert sorted(held) == sorted(names.values())
    return {names[id(p)]: s for p, s in run.opt.state.items()}


def assert_same_end(a, b):
    assert {n: p.shape for n, p in a.model.state_dict().items()} == \
        {n: p.shape for n, p in b.model.state_dict().items()}
    for n, t in a.model.state_dict().items():
        assert torch.equal(t, b.model.state_dict()[n]), n
    sa, sb = optimizer_state(a), optimizer_state(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].keys() == sb[name].keys(), name
        for key, value in sa[name].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb[name][key])), \
                (name, key)
    assert a.gradual.iteration == b.gradual.iteration == ITERATIONS
    assert a.pruner.current_step == b.pruner.current_step == 3 and b.gradual.done
    assert [h["step"] for h in b.pruner.history] == [1, 2, 3]
    assert a.reg.calls == b.reg.calls
    assert a.reg.state_dict() == b.reg.state_dict()


@pytest.mark.parametrize("pruner", ["ratio", "macs-budget", "compensated"])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_a_run_stopped_between_steps_resumes_to_the_same_end(opt, pruner, tmp_path):
    whole = Run(opt, pruner)
    whole.train(1, ITERATIONS)

    first = Run(opt, pruner)
    first.train(1, STOP)
    first.save(tmp_path)
    widths = first.model.conv1.out_channels
    assert first.pruner.current_step == 2 and widths < 16
    assert json.loads((tmp_path / "reg.json").read_text())["target"]  # aimed when saved
    del first

    resumed = Run.resume(opt, pruner, tmp_path)
    assert resumed.model.conv1.out_channels == widths
    assert resumed.pruner.current_step == 2 and resumed.gradual.iteration == STOP
    assert resumed.pruner.original_size == whole.pruner.original_size  # the dense widths
    resumed.train(STOP + 1, ITERATIONS)
    assert_same_end(whole, resumed)
    if pruner == "macs-budget":
        # the budget is a fraction of the dense model, not of the reloaded one
        assert resumed.pruner.cost_model.dense == whole.pruner.cost_model.dense
        macs = cleanai.utils.count_macs(resumed.model, batch()[0][:1])
        dense = cleanai.utils.count_macs(Net((16, 12)), batch()[0][:1])
        assert macs / dense <= 0.4


def test_a_run_stopped_after_its_last_step_resumes_below_an_absolute_budget(tmp_path):
    whole = Run("sgd-momentum", "absolute-macs")
    whole.train(1, ITERATIONS)
    first = Run("sgd-momentum", "absolute-macs")
    first.train(1, END + 1)
    first.save(tmp_path)
    assert cleanai.utils.count_macs(first.model, batch()[0][:1]) <= 72_900 and first.gradual.done
    resumed = Run.resume("sgd-momentum", "absolute-macs", tmp_path)  # the target is met already
    resumed.train(END + 2, ITERATIONS)
    assert_same_end(whole, resumed)


def test_a_state_from_another_run_is_refused_with_nothing_changed(tmp_path):
    run = Run("sgd-momentum", "ratio")
    run.train(1, STOP)
    run.save(tmp_path)
    gradual = json.loads((tmp_path / "gradual.json").read_text())
    reg = json.loads((tmp_path / "reg.json").read_text())

    def reloaded():
        return cleanai.load_pruned(Net((16, 12)), tmp_path / "model")

    x = batch()[0][:1]
    pruner = cleanai.StructuredPruner(reloaded(), x, pruning_ratio=0.5)
    with pytest.raises(ValueError, match=r"iterations 2\.\.8 every 3; this GradualPruner "
                                         r"steps at 2\.\.8 every 2"):
        GradualPruner(pruner, start=2, end=8, every=2).load_state_dict(gradual)
    with pytest.raises(ValueError, match="schedule reaching"):
        GradualPruner(pruner, start=START, end=END, every=EVERY,
                      schedule="linear").load_state_dict(gradual)
    with pytest.raises(ValueError, match="pruning_ratio=0.5; this one has pruning_ratio=0.3"):
        GradualPruner(cleanai.StructuredPruner(reloaded(), x, pruning_ratio=0.3),
                      start=START, end=END, every=EVERY).load_state_dict(gradual)
    with pytest.raises(ValueError, match="without an optimizer"):
        resumed = GradualPruner(pruner, start=START, end=END, every=EVERY,
                                optimizer=torch.optim.SGD(pruner.model.parameters(), lr=0.1))
        resumed.load_state_dict({**gradual, "optimizer": None})
    # the dense model, not reloaded at its saved widths
    dense = cleanai.StructuredPruner(Net((16, 12)), x, pruning_ratio=0.5)
    with pytest.raises(ValueError, match="had 9 channels; the model here has 16.*load_pruned"):
        GradualPruner(dense, start=START, end=END, every=EVERY).load_state_dict(gradual)
    with pytest.raises(ValueError, match="had 9 channels"):
        GroupSparsity(dense, lam=1e-2).load_state_dict(reg)
    # another architecture
    other = cleanai.StructuredPruner(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(),
                                                         torch.nn.Linear(6, 2)),
                                     torch.randn(1, 4), pruning_ratio=0.5)
    with pytest.raises(ValueError, match="saved from another model"):
        GradualPruner(other, start=START, end=END, every=EVERY).load_state_dict(gradual)
    with pytest.raises(ValueError, match="saved from another model"):
        GroupSparsity(other, lam=1e-2).load_state_dict(reg)
    with pytest.raises(ValueError, match="norm='l2'; this one has norm='l1'"):
        GroupSparsity(pruner, lam=1e-2, norm="l1").load_state_dict(reg)
    with pytest.raises(ValueError, match="GradualPruner.state_dict"):
        GradualPruner(pruner, start=START, end=END, every=EVERY).load_state_dict(reg)
    # nothing changed by the refusals; the right state then loads
    assert pruner.current_step == 0 and pruner.original_size == {0: 9, 1: 7, 2: 5}
    right = GradualPruner(pruner, start=START, end=END, every=EVERY)
    right.load_state_dict(gradual)
    assert pruner.current_step == 2 and pruner.original_size == {0: 16, 1: 12, 2: 5}
    assert right.iteration == STOP
    # the plain misuse stays refused: a pruner that already pruned, without a saved state
    with pytest.raises(ValueError, match="already took 2 step"):
        GradualPruner(pruner, start=START, end=END, every=EVERY)


def test_optimizer_loaded_before_the_order_is_restored_is_refused(tmp_path):
    run = Run("adam", "compensated")
    run.train(1, STOP)
    run.save(tmp_path)
    added = [n for g in run.gradual.state_dict()["optimizer"] for n in g[-2:]]
    assert added == ["conv2.bias", "conv3.bias"]  # compensation's biases sit last
    model = cleanai.load_pruned(Net((16, 12)), tmp_path / "model")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    pruner = cleanai.StructuredPruner(model, batch()[0][:1], pruning_ratio=0.5, compensate="bias")
    gradual = GradualPruner(pruner, start=START, end=END, every=EVERY, optimizer=opt,
                            data=[batch(99)[0]])
    with pytest.raises(ValueError, match=r"before optimizer\.load_state_dict"):
        gradual.load_state_dict(json.loads((tmp_path / "gradual.json").read_text()))
    assert pruner.current_step == 0


@pytest.mark.parametrize("settings", [dict(pruning_ratio=0.5), dict(target_macs=0.4)])
def test_a_structured_pruner_resumes_between_its_steps(tmp_path, settings):
    """Iterative steps with fine-tuning between them, stopped after step 1 of 3: a new
    process rebuilds the model and a pruner, loads the state and ends where the
    uninterrupted run does."""
    def pruner_for(model):
        return cleanai.StructuredPruner(model, batch()[0][:1], iterative_steps=3, **settings)

    def tune(model, seed):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        x, y = batch(seed)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    torch.manual_seed(0)
    whole = Net((16, 12))
    pruner = pruner_for(whole)
    for step in range(3):
        pruner.step()
        tune(whole, step)

    torch.manual_seed(0)
    first = Net((16, 12))
    pruner = pruner_for(first)
    pruner.step()
    tune(first, 0)
    cleanai.save_pruned(first, tmp_path / "model")
    (tmp_path / "pruner.json").write_text(json.dumps(pruner.state_dict()))

    model = cleanai.load_pruned(Net((16, 12)), tmp_path / "model")
    resumed = pruner_for(model)
    state = json.loads((tmp_path / "pruner.json").read_text())
    with pytest.raises(ValueError, match="iterative_steps"):
        cleanai.StructuredPruner(model, batch()[0][:1], iterative_steps=2,
                                 **settings).load_state_dict(state)
    resumed.load_state_dict(state)
    for step in (1, 2):
        resumed.step()
        tune(model, step)
    assert resumed.current_step == 3
    for (name, a), b in zip(whole.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
