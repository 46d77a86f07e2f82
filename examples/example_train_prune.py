"""Pruning while training: a small residual CNN on Fashion-MNIST (or scikit-learn's digits),
pruned to 30% of its MACs inside its own training run, two ways.

    python examples/example_train_prune.py           # about 3 minutes on two CPU cores
    python examples/example_train_prune.py --quick   # scikit-learn's digits, a few seconds

1. aimed sparsity: ``GroupSparsity`` penalises the channels the pruner would remove now
   (re-aimed every few iterations), so they are empty when the one pruning step comes; one
   short fine-tuning epoch follows;
2. gradual pruning: ``GradualPruner`` takes the pruner's steps on a cubic schedule while the
   model trains, and the optimizer's momentum is cut with every step.

Both start from the same initial weights and train for the same number of epochs. Prints the
accuracy on held-out images, the MACs and the parameters of each.
"""
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

import cleanai
from cleanai.cli.data import labelled_images
from cleanai.train import GradualPruner, GroupSparsity
from cleanai.utils import count_macs, count_params

QUICK = "--quick" in sys.argv
TARGET = 0.3  # of the dense MACs


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.down(x))


def build_model():
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         Block(32, 48, 2), Block(48, 96, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 10))


def batches(x, y, size, generator):
    order = torch.randperm(len(x), generator=generator)
    return [(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(x), size)]


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(1000), y.split(1000)))
    model.train()
    return 100.0 * correct / len(x)


def train(model, data, epochs, lr, extra_loss=None, after_step=None, seed=0):
    """SGD with Nesterov momentum and a cosine schedule; returns the optimizer."""
    x, y = data[0], data[1]
    g = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(len(x) / 128)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * per_epoch)
    model.train()
    it = 0
    for _ in range(epochs):
        for xb, yb in batches(x, y, 128, g):
            loss = F.cross_entropy(model(xb), yb)
            if extra_loss is not None:
                loss = loss + extra_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            it += 1
            if after_step is not None:
                after_step(it, opt)
    model.eval()
    return opt


def summary(name, model, data, dense_macs, dense_params, example):
    macs, params = count_macs(model, example), count_params(model)
    print(f"{name:<34} accuracy {accuracy(model, data[2], data[3]):6.2f}%   "
          f"MACs {macs / dense_macs:5.1%}   params {params / dense_params:5.1%}")


def main():
    torch.manual_seed(0)
    data = labelled_images("sklearn-digits" if QUICK else "fashion-mnist", n_train=20000)
    epochs = 12 if QUICK else 3
    example = data[0][:1]
    print(f"data: {data[4]}; {epochs} epochs each; pruned to {TARGET:.0%} of the dense MACs")
    init = build_model()
    dense_macs, dense_params = count_macs(init, example), count_params(init)
    per_epoch = math.ceil(len(data[0]) / 128)

    # dense, for reference
    dense = build_model()
    dense.load_state_dict(init.state_dict())
    train(dense, data, epochs, 0.05)
    summary("dense", dense, data, dense_macs, dense_params, example)

    # 1. aimed sparsity, one cut, one fine-tuning epoch
    model = build_model()
    model.load_state_dict(init.state_dict())
    pruner = cleanai.StructuredPruner(model, example, target_macs=TARGET)
    reg = GroupSparsity(pruner, lam=0.05, schedule=lambda t: min(1.0, t / per_epoch))
    reg.target(pruner.plan())

    def aim(it, opt):
        if it % 20 == 0:
            reg.target(pruner.plan())  # the channels the pruner would remove now

    train(model, data, epochs - 1, 0.05, extra_loss=reg, after_step=aim)
    model.eval()
    before = accuracy(model, data[2], data[3])
    pruner.step()
    print(f"aimed sparsity: {before:.2f}% before the cut, {accuracy(model, data[2], data[3]):.2f}% "
          f"right after it")
    train(model, data, 1, 0.01, seed=1)
    summary("aimed sparsity + cut + 1 epoch", model, data, dense_macs, dense_params, example)

    # 2. gradual pruning inside the training run
    model = build_model()
    model.load_state_dict(init.state_dict())
    pruner = cleanai.StructuredPruner(model, example, target_macs=TARGET)
    steps = {}

    def prune_gradually(it, opt):
        if "gradual" not in steps:  # the optimizer exists once training has started
            steps["gradual"] = GradualPruner(pruner, start=per_epoch // 2, every=max(1, per_epoch // 4),
                                             end=2 * per_epoch, optimizer=opt,
                                             total_steps=epochs * per_epoch)
        if steps["gradual"].step() is not None:
            steps[it] = count_macs(model, example) / dense_macs

    train(model, data, epochs, 0.05, after_step=prune_gradually)
    print("gradual: MACs after each step: "
          + ", ".join(f"{v:.0%} (it {k})" for k, v in steps.items() if k != "gradual"))
    summary("gradual pruning", model, data, dense_macs, dense_params, example)


if __name__ == "__main__":
    main()
