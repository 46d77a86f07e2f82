"""How much accuracy CleanAI's channel importances keep: a small ResNet on Fashion-MNIST, on the CPU.

A ResNet of three BasicBlocks (widths 32-64-128, BatchNorm, 1x28x28 inputs) is trained once on
55k Fashion-MNIST training images and cached; the other 5k training images are held out. First a
cheap sweep of the hybrid's (alpha, beta, normalizer) at one ratio, scored on the held-out images
after BN recalibration, picks its defaults by a fixed rule. Then, for every target ratio,
importance (the pick included) and seed, a copy of the model is pruned by
``cleanai.StructuredPruner`` and scored on the 10k test images right after pruning, after
``recalibrate_bn`` and after one epoch of fine-tuning. Writes a Markdown report and a plot.

    python benchmarks/accuracy_fashion_mnist.py            # full run: docs/accuracy.md (+ .png)
    python benchmarks/accuracy_fashion_mnist.py --quick    # smoke run: one ratio, one seed, subsets
    python benchmarks/accuracy_fashion_mnist.py --from-results benchmarks/.cache/results.json

Data come from the Debian package ``dataset-fashion-mnist`` (idx files, gzipped or not, under
/usr/share/datasets/fashion-mnist); nothing is downloaded. matplotlib is optional (the plot).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import cleanai
from _common import cleanai_revision
from cleanai.cli.data import read_idx
from cleanai.importance import (ActivationImportance, RandomImportance,
                                WeightActivationImportance, WeightImportance)
from cleanai.utils import count_macs, count_params, recalibrate_bn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA_DIR = "/usr/share/datasets/fashion-mnist"
CACHE_DIR = os.path.join(HERE, ".cache")
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST pixel statistics (training set)
VAL_SIZE = 5000
WIDTHS = (32, 64, 128)
BATCH = 128
CALIB_BATCHES = 16
BN_BATCHES = 20
FT_LR = 0.01
SWEEP_PAIRS = [(0.25, 0.75), (0.5, 0.5), (0.75, 0.25)]
SWEEP_NORMALIZERS = ["mean", "max", "rank", "zscore"]
SWEEP_ANCHORS = [(1.0, 0.0), (0.0, 1.0)]  # weight only, activation only

TIE_POINTS = 0.5  # accuracy differences below this many points are not acted on
LABELS = {"random": "random", "weight": "weight (L2)", "activation": "activation (l2)",
          "hybrid-sum": "hybrid sum, α=β=0.5, mean", "hybrid-product": "hybrid product, mean"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- data --------------------------------------------------------------------------------

def find_idx(root: str, name: str) -> str:
    for candidate in (name, name + ".gz"):
        if os.path.exists(os.path.join(root, candidate)):
            return os.path.join(root, candidate)
    raise SystemExit(f"{name}[.gz] not found in {root}: install the Debian package "
                     f"(apt-get install dataset-fashion-mnist) or pass --data-dir")


@dataclasses.dataclass
class Data:
    """Normalised images ``[N, 1, 28, 28]`` (float) and labels ``[N]`` (int64)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_data(root: str) -> Data:
    """The 60k training images split 55k train / 5k held out (a fixed split), and the 10k test."""
    def images(name: str) -> torch.Tensor:
        return ((read_idx(find_idx(root, name)).float() / 255 - MEAN) / STD).unsqueeze(1)

    def labels(name: str) -> torch.Tensor:
        return read_idx(find_idx(root, name)).long()

    x, y = images("train-images-idx3-ubyte"), labels("train-labels-idx1-ubyte")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    train, val = order[VAL_SIZE:], order[:VAL_SIZE]
    return Data(x[train], y[train], x[val], y[val],
                images("t10k-images-idx3-ubyte"), labels("t10k-labels-idx1-ubyte"))


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 2 pixels, per image."""
    n = len(x)
    x = torch.where((torch.rand(n, generator=g) < 0.5)[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (2, 2, 2, 2), value=-MEAN / STD)  # the background pixel value
    dy, dx = torch.randint(0, 5, (2, n), generator=g)
    rows = (dy[:, None] + torch.arange(28))[:, :, None]
    cols = (dx[:, None] + torch.arange(28))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


def shuffled_batches(x: torch.Tensor, y: torch.Tensor,
                     g: torch.Generator) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of augmented ``(images, labels)`` batches in a random order."""
    order = torch.randperm(len(x), generator=g)
    for i in range(0, len(x), BATCH):
        idx = order[i:i + BATCH]
        yield augment(x[idx], g), y[idx]


def sample_batches(x: torch.Tensor, y: torch.Tensor, count: int,
                   g: torch.Generator) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of distinct random training images (calibration, BN statistics)."""
    idx = torch.randperm(len(x), generator=g)[:count * BATCH]
    return [(x[i], y[i]) for i in idx.split(BATCH)]


# --- model and training ------------------------------------------------------------------

class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut (a 1x1 conv-BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """1x28x28 -> stem conv 3x3 stride 2 -> blocks at 14x14, 7x7, 4x4 -> average pool -> 10."""

    def __init__(self, widths: Sequence[int] = WIDTHS, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 2, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(cin, w, 1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int,
        schedule: str, verbose: bool = False, extra_loss=None, after_step=None) -> None:
    """SGD (momentum 0.9, Nesterov, weight decay 5e-4) on augmented batches, with a one-cycle
    or cosine schedule; ``seed`` fixes the order and the augmentation. ``extra_loss()`` is
    added to every batch's loss; ``after_step(iteration, optimizer)`` runs after every step."""
    g = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(x) / BATCH)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    if schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                    pct_start=0.25)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    it = 0
    for epoch in range(epochs):
        total = 0.0
        for xb, yb in shuffled_batches(x, y, g):
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
            total += loss.item() * len(xb)
        if verbose:
            log(f"epoch {epoch + 1}/{epochs}: training loss {total / len(x):.4f}")
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent, in eval mode."""
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum())
                  for xb, yb in zip(x.split(1000), y.split(1000)))
    return 100.0 * correct / len(x)


def trained_model(data: Data, epochs: int, lr: float, cache_dir: str, retrain: bool
                  ) -> Tuple[nn.Module, dict]:
    """The dense model, from the cache when it holds one trained with this recipe."""
    tag = f"w{'-'.join(map(str, WIDTHS))}_e{epochs}_lr{lr}_n{len(data.train_x)}"
    path = os.path.join(cache_dir, f"fmnist_resnet_{tag}.pt")
    if os.path.exists(path) and not retrain:
        model = SmallResNet()
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["state_dict"])
        model.eval()
        info = {"train_s": saved["train_s"], "cached": True, "checkpoint": path}
        log(f"loaded {path} (trained in {saved['train_s']:.0f} s)")
    else:
        log(f"training {epochs} epochs on {len(data.train_x)} images ...")
        torch.manual_seed(0)
        model = SmallResNet()
        start = time.perf_counter()
        fit(model, data.train_x, data.train_y, epochs, lr, seed=0, schedule="onecycle",
            verbose=True)
        train_s = time.perf_counter() - start
        os.makedirs(cache_dir, exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "train_s": train_s}, path)
        info = {"train_s": train_s, "cached": False, "checkpoint": path}
    info.update(epochs=epochs, lr=lr, test_acc=accuracy(model, data.test_x, data.test_y),
                val_acc=accuracy(model, data.val_x, data.val_y))
    log(f"dense model: test accuracy {info['test_acc']:.2f}%, trained in {info['train_s']:.0f} s")
    return model, info


# --- pruning runs ------------------------------------------------------------------------

EXAMPLE = torch.zeros(1, 1, 28, 28)
Batches = List[Tuple[torch.Tensor, torch.Tensor]]


def make_importance(name: str, seed: int, chosen: Optional[dict] = None):
    """The importance called ``name`` in the tables; ``hybrid-chosen`` uses the sweep's pick."""
    if name == "random":
        return RandomImportance(seed=seed)
    if name == "weight":
        return WeightImportance(p=2)
    if name == "activation":
        return ActivationImportance(statistic="l2")
    if name == "hybrid-sum":
        return WeightActivationImportance(0.5, 0.5, normalizer="mean", mode="sum")
    if name == "hybrid-product":
        return WeightActivationImportance(normalizer="mean", mode="product")
    if name == "hybrid-chosen" and chosen:
        return WeightActivationImportance(chosen["alpha"], chosen["beta"],
                                          normalizer=chosen["normalizer"], mode="sum")
    raise ValueError(f"unknown importance {name!r}")


def label(name: str, chosen: Optional[dict] = None) -> str:
    if name == "hybrid-chosen" and chosen:
        return (f"hybrid sum, α={chosen['alpha']}, β={chosen['beta']}, {chosen['normalizer']} "
                f"(sweep pick)")
    return LABELS[name]


def seed_batches(data: Data, seed: int) -> Tuple[Batches, Batches]:
    """The seed's calibration batches and BN-recalibration batches (training images)."""
    g = torch.Generator().manual_seed(1000 + seed)
    return (sample_batches(data.train_x, data.train_y, CALIB_BATCHES, g),
            sample_batches(data.train_x, data.train_y, BN_BATCHES, g))


def prune_copy(dense: nn.Module, importance, ratio: float, calib: Batches,
               check: Optional[torch.Tensor] = None) -> Tuple[nn.Module, Optional[float]]:
    """A pruned deepcopy of ``dense`` (calibration runs only for data-dependent importances)
    and, when ``check`` inputs are given, the largest output difference from the dense model
    with the same channels masked, which exact slicing keeps at float rounding."""
    model = copy.deepcopy(dense).eval()
    pruner = cleanai.StructuredPruner(model, EXAMPLE, importance=importance, pruning_ratio=ratio)
    pruner.calibrate(calib, max_batches=len(calib))
    plan = pruner.plan()  # one step: plan + apply is what pruner.prune() does
    masked = masked_copy(dense, pruner.graph, plan.removals) if check is not None else None
    pruner.apply(plan)
    if masked is None:
        return model, None
    with torch.no_grad():
        return model, float((model(check) - masked(check)).abs().max())


def masked_copy(dense: nn.Module, graph: cleanai.DependencyGraph,
                removals: Dict[int, torch.Tensor]) -> nn.Module:
    """``dense`` with the input columns that read a removed channel zeroed in every consumer
    (Conv2d and Linear here: weight dim 1), so those channels are ignored but not sliced."""
    masked = copy.deepcopy(dense).eval()
    with torch.no_grad():
        for group in graph.groups:
            gone = removals.get(group.id)
            for m in group.members if gone is not None else []:
                if m.kind == "in":
                    weight = masked.get_submodule(m.name).weight
                    weight[:, m.positions[torch.isin(m.channels, gone)]] = 0
    return masked


def run_sweep(dense: nn.Module, data: Data, ratio: float, seeds: Sequence[int],
              pairs: Sequence[Tuple[float, float]], normalizers: Sequence[str]) -> List[dict]:
    """The hybrid sum over (alpha, beta, normalizer) at one ratio, after BN recalibration only,
    scored on the held-out images (to choose) and on the test set (to report)."""
    configs = [(a, b, n) for a, b in pairs for n in normalizers]
    configs += [(a, b, "mean") for a, b in SWEEP_ANCHORS]  # one term: the normalizer is moot
    rows = []
    for seed in seeds:
        calib, bn = seed_batches(data, seed)
        for alpha, beta, norm in configs:
            imp = WeightActivationImportance(alpha, beta, normalizer=norm, mode="sum")
            model, _ = prune_copy(dense, imp, ratio, calib)
            recalibrate_bn(model, bn, max_batches=BN_BATCHES)
            rows.append({"alpha": alpha, "beta": beta, "normalizer": norm, "seed": seed,
                         "val": accuracy(model, data.val_x, data.val_y),
                         "test": accuracy(model, data.test_x, data.test_y)})
            log(f"sweep seed {seed} alpha {alpha} beta {beta} {norm:6s} "
                f"val {rows[-1]['val']:6.2f} test {rows[-1]['test']:6.2f}")
    return rows


def choose_defaults(rows: List[dict], pairs: Sequence[Tuple[float, float]],
                    normalizers: Sequence[str]) -> dict:
    """The hybrid's defaults, read off the sweep's held-out accuracy: the (alpha, beta) pair
    with the best mean over all normalizers, then ``"mean"`` (the simplest) unless another
    normalizer of that pair beats it by more than the seed noise."""
    score = {(a, b, n): mean_sd(cell(rows, "val", alpha=a, beta=b, normalizer=n))
             for a, b in pairs for n in normalizers}
    noise = math.sqrt(statistics.mean(sd ** 2 for _, sd in score.values()))
    pair = max(pairs, key=lambda p: statistics.mean(score[(*p, n)][0] for n in normalizers))
    best = max(normalizers, key=lambda n: score[(*pair, n)][0])
    norm = best
    if "mean" in normalizers and score[(*pair, best)][0] - score[(*pair, "mean")][0] <= noise:
        norm = "mean"
    return {"alpha": pair[0], "beta": pair[1], "normalizer": norm, "noise": noise,
            "best_normalizer": best}


def run_main(dense: nn.Module, data: Data, ratios: Sequence[float], importances: Sequence[str],
             seeds: Sequence[int], finetune: bool, chosen: Optional[dict]) -> List[dict]:
    """Every (ratio, importance, seed): accuracy after pruning, BN recalibration, fine-tuning."""
    rows = []
    for seed in seeds:
        calib, bn = seed_batches(data, seed)
        for ratio in ratios:
            for name in importances:
                start = time.perf_counter()
                model, diff = prune_copy(dense, make_importance(name, seed, chosen), ratio, calib,
                                         check=data.test_x[:256])
                row = {"ratio": ratio, "importance": name, "seed": seed, "mask_diff": diff,
                       "params": count_params(model), "macs": count_macs(model, EXAMPLE),
                       "pruned": accuracy(model, data.test_x, data.test_y)}
                recalibrate_bn(model, bn, max_batches=BN_BATCHES)
                row["bn"] = accuracy(model, data.test_x, data.test_y)
                if finetune:
                    fit(model, data.train_x, data.train_y, 1, FT_LR, seed=seed, schedule="cosine")
                    row["ft"] = accuracy(model, data.test_x, data.test_y)
                row["seconds"] = time.perf_counter() - start
                log(f"seed {seed} ratio {ratio} {name:15s} pruned {row['pruned']:6.2f} "
                    f"bn {row['bn']:6.2f} ft {row.get('ft', float('nan')):6.2f} "
                    f"({row['seconds']:.0f} s)")
                rows.append(row)
    return rows


def score_spread(dense: nn.Module, data: Data) -> List[dict]:
    """Per prunable group of the dense model: how much the raw weight and activation scores
    vary across its channels (coefficient of variation) and how alike they rank them."""
    model = copy.deepcopy(dense).eval()
    act = ActivationImportance(statistic="l2")
    pruner = cleanai.StructuredPruner(model, EXAMPLE, importance=act)
    pruner.calibrate(seed_batches(data, 0)[0])
    rows = []
    for g in pruner.graph.groups:
        if bool(g.protected.all()):
            continue
        w, a = WeightImportance(p=2).raw(g, model), act.raw(g, model)
        ranks = [t.argsort().argsort().float() for t in (w, a)]
        rows.append({"group": g.id, "size": g.size,
                     "layers": ", ".join(m.name for m in g.members if m.kind == "out"),
                     "weight_cv": float(w.std() / w.mean()), "act_cv": float(a.std() / a.mean()),
                     "spearman": float(torch.corrcoef(torch.stack(ranks))[0, 1])})
    return rows


# --- report ------------------------------------------------------------------------------

def mean_sd(values: Sequence[float]) -> Tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: Sequence[float]) -> str:
    m, s = mean_sd(values)
    return f"{m:.2f} ± {s:.2f}" if len(values) > 1 else f"{m:.2f}"


def signed(x: float) -> str:
    return f"{0.0 if abs(x) < 0.005 else x:+.2f}"  # no "-0.00"


def human(n: float) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def cell(rows: List[dict], key: str, **match) -> List[float]:
    return [r[key] for r in rows if all(r[k] == v for k, v in match.items()) and key in r]


def compare(res: dict, key: str, ratio: float, a: str, b: str) -> Tuple[float, float, str]:
    """Mean accuracy of importance ``a`` minus ``b``, the tie threshold, and a verdict word.

    A difference counts when it exceeds both twice its standard error over seeds and
    TIE_POINTS (a floor, as two seeds understate the spread)."""
    xa = cell(res["main"], key, ratio=ratio, importance=a)
    xb = cell(res["main"], key, ratio=ratio, importance=b)
    diff = statistics.mean(xa) - statistics.mean(xb)
    se = math.sqrt((mean_sd(xa)[1] ** 2 + mean_sd(xb)[1] ** 2) / max(1, len(xa)))
    threshold = max(2 * se, TIE_POINTS)
    return diff, threshold, ("tie" if abs(diff) <= threshold else "ahead" if diff > 0 else "behind")


def main_table(res: dict) -> str:
    rows, dense = res["main"], res["dense"]
    lines = ["| ratio | importance | params | MACs | pruned | + BN recal | + 1 epoch FT |",
             "|---:|---|---:|---:|---:|---:|---:|",
             f"| 0 | dense | {human(dense['params'])} | {human(dense['macs'])} | "
             f"{dense['test_acc']:.2f} | | |"]
    for ratio in res["ratios"]:
        for name in res["importances"]:
            sel = dict(ratio=ratio, importance=name)
            macs = statistics.mean(cell(rows, "macs", **sel))
            ft = cell(rows, "ft", **sel)
            lines.append(
                f"| {ratio} | {label(name, res['chosen'])} | "
                f"{human(statistics.mean(cell(rows, 'params', **sel)))} | {human(macs)} "
                f"({100 * macs / dense['macs']:.0f}%) | {fmt(cell(rows, 'pruned', **sel))} | "
                f"{fmt(cell(rows, 'bn', **sel))} | {fmt(ft) if ft else 'n/a'} |")
    return "\n".join(lines)


def stages(res: dict) -> List[Tuple[str, str]]:
    return [("bn", "after BN recal")] + ([("ft", "after 1 epoch FT")] if res["finetune"] else [])


def headline(res: dict) -> str:
    """Hybrid vs weight-only at each ratio (same MACs): a summary and a table."""
    have, dense = res["importances"], res["dense"]
    if "weight" not in have or "hybrid-sum" not in have:
        return "The headline needs the `weight` and `hybrid-sum` runs."
    hybrids = [h for h in ("hybrid-sum", "hybrid-chosen") if h in have]
    mid = min(res["ratios"], key=lambda r: abs(r - 0.5))
    macs = statistics.mean(cell(res["main"], "macs", ratio=mid, importance="weight"))
    text = [f"At ratio {mid} every importance leaves {human(macs)} MACs "
            f"({100 * macs / dense['macs']:.0f}% of the dense {human(dense['macs'])}) and "
            f"{human(statistics.mean(cell(res['main'], 'params', ratio=mid, importance='weight')))}"
            f" parameters; the dense model scores {dense['test_acc']:.2f}%."]
    for key, stage in stages(res):
        w = statistics.mean(cell(res["main"], key, ratio=mid, importance="weight"))
        parts = []
        for h in hybrids:
            acc = statistics.mean(cell(res["main"], key, ratio=mid, importance=h))
            parts.append(f"the {label(h, res['chosen'])} keeps {acc:.2f}% "
                         f"({100 * acc / dense['test_acc']:.1f}% of dense accuracy, "
                         f"{signed(acc - w)} points vs weight-only)")
        text.append(f"- {stage[0].upper() + stage[1:]}: weight-only keeps {w:.2f}% "
                    f"({100 * w / dense['test_acc']:.1f}% of dense); " + "; ".join(parts) + ".")
    cols = [label(h, res["chosen"]) for h in hybrids]
    table = ["| ratio | MACs kept | stage | weight (L2) | " + " | ".join(cols)
             + " | hybrid − weight (each hybrid) | seed s.d. (weight, each hybrid) |",
             "|---:|---:|---|---:|" + "---:|" * len(cols) + "---:|---:|"]
    for ratio in res["ratios"]:
        macs = {n: statistics.mean(cell(res["main"], "macs", ratio=ratio, importance=n))
                for n in have}
        kept = f"{100 * macs['weight'] / dense['macs']:.0f}%"
        if len({round(v) for v in macs.values()}) > 1:
            kept += " (differs by importance)"
        for key, stage in stages(res):
            w = mean_sd(cell(res["main"], key, ratio=ratio, importance="weight"))
            hs = [mean_sd(cell(res["main"], key, ratio=ratio, importance=h)) for h in hybrids]
            diffs = " / ".join(f"{signed(d)} ({word})" for h in hybrids for d, _, word in
                               [compare(res, key, ratio, h, "weight")])
            sds = " / ".join(f"{s:.2f}" for s in [w[1]] + [h[1] for h in hs])
            table.append(f"| {ratio} | {kept} | {stage} | {w[0]:.2f} | "
                         + " | ".join(f"{h[0]:.2f}" for h in hs) + f" | {diffs} | {sds} |")
    return "\n".join(text) + "\n\n" + "\n".join(table)


def sweep_table(res: dict, key: str) -> str:
    rows, norms = res["sweep"], res["sweep_normalizers"]
    lines = ["| α (weight) | β (activation) | " + " | ".join(norms) + " | mean over normalizers |",
             "|---:|---:|" + "---:|" * (len(norms) + 1)]
    for a, b in res["sweep_pairs"]:
        cells = [cell(rows, key, alpha=a, beta=b, normalizer=n) for n in norms]
        overall = statistics.mean(v for c in cells for v in c)
        lines.append(f"| {a} | {b} | " + " | ".join(fmt(c) for c in cells) + f" | {overall:.2f} |")
    for a, b in SWEEP_ANCHORS:
        what = "weight only" if b == 0 else "activation only"
        value = fmt(cell(rows, key, alpha=a, beta=b, normalizer="mean"))
        lines.append(f"| {a} | {b} | {value} ({what}, any normalizer) |" + " |" * len(norms))
    return "\n".join(lines)


def sweep_section(res: dict) -> str:
    if not res["sweep"]:
        return "No sweep was run (`--no-sweep`).\n"
    return f"""## Sweep of the hybrid sum at ratio {res['sweep_ratio']} (after BN recalibration only)

`WeightActivationImportance(weight_ratio=α, activation_ratio=β, normalizer=..., mode="sum")`,
pruned, BN-recalibrated, not fine-tuned. Accuracy (%) on the {res['n_val']} held-out images,
which choose:

{sweep_table(res, 'val')}

Test accuracy (%) of the same pruned models, for reference only:

{sweep_table(res, 'test')}

`"sum"` is not swept: with per-group pruning (the default, `global_pruning=False`) it ranks
channels exactly as `"mean"` does (sum = group size × mean, the same factor on both terms).
Likewise the normalizer of `mode="product"` and of a single term never changes which channels go.
"""


def choosing_defaults(res: dict) -> str:
    """The defaults the sweep picks, and what the fine-tuned runs say about them."""
    if not res["sweep"]:
        return "No sweep was run."
    rows, c = res["sweep"], res["chosen"]

    def val(a, b, n):
        return mean_sd(cell(rows, "val", alpha=a, beta=b, normalizer=n))

    pair_means = {p: statistics.mean(val(*p, n)[0] for n in res["sweep_normalizers"])
                  for p in res["sweep_pairs"]}
    order = sorted(pair_means, key=lambda p: -pair_means[p])
    in_pair = [val(c["alpha"], c["beta"], n)[0] for n in res["sweep_normalizers"]]
    w, act = val(1.0, 0.0, "mean")[0], val(0.0, 1.0, "mean")[0]
    chosen = val(c["alpha"], c["beta"], c["normalizer"])[0]
    text = [
        f"The rule (fixed before the run, applied to held-out accuracy, {len(res['seeds'])} "
        f"seed(s)): take the (α, β) pair with the best accuracy averaged over the "
        f"normalizers, then keep `\"mean\"` unless another normalizer of that pair beats it by "
        f"more than the seed noise (root-mean-square s.d. of the sweep cells, "
        f"{c['noise']:.2f} points).",
        "",
        "- Pairs, averaged over normalizers: " + ", ".join(
            f"α={p[0]}/β={p[1]} {pair_means[p]:.2f}%" for p in order)
        + f"; the ends: weight only {w:.2f}%, activation only {act:.2f}%.",
        f"- Normalizers at α={c['alpha']}/β={c['beta']}: " + ", ".join(
            f"{n} {v:.2f}%" for n, v in zip(res["sweep_normalizers"], in_pair))
        + f" (a range of {max(in_pair) - min(in_pair):.2f} points). "
        + (f"The best, `\"{c['best_normalizer']}\"`, is within the noise of `\"mean\"`, so the "
           f"sweep cannot tell them apart and `\"mean\"` stays."
           if c["normalizer"] == "mean" and c["best_normalizer"] != "mean" else
           f"`\"{c['normalizer']}\"` is chosen."),
        "",
        f"Sweep pick: `weight_ratio={c['alpha']}`, `activation_ratio={c['beta']}`, "
        f"`normalizer=\"{c['normalizer']}\"` ({chosen:.2f}% held-out after BN recalibration at "
        f"ratio {res['sweep_ratio']}, against {w:.2f}% for weight only and {act:.2f}% for "
        f"activation only).",
    ]
    hybrids = [h for h in ("hybrid-chosen", "hybrid-sum") if h in res["importances"]]
    if "weight" not in res["importances"] or not hybrids:
        return "\n".join(text)
    text += ["", "Check on the main runs (test set, every ratio), hybrid minus weight-only:", ""]
    for h in hybrids:
        text.append(f"- {label(h, c)}: " + "; ".join(
            f"{ratio} {stage} {signed(diff)} ({word})" for ratio in res["ratios"]
            for key, stage in stages(res)
            for diff, _, word in [compare(res, key, ratio, h, "weight")]) + ".")
    default = recommend(res)
    text += ["", default["why"], "",
             f"**Recommended defaults for `WeightActivationImportance`: "
             f"`weight_ratio={default['alpha']}`, `activation_ratio={default['beta']}`, "
             f"`normalizer=\"{default['normalizer']}\"`, `mode=\"sum\"`.**", "",
             reading(res, default["name"])]
    return "\n".join(text)


def behind(res: dict, hybrid: str) -> List[str]:
    """Where ``hybrid`` is clearly behind weight-only: ``"<ratio> <stage>"`` strings."""
    return [f"{r} {stage}" for r in res["ratios"] for key, stage in stages(res)
            if compare(res, key, r, hybrid, "weight")[2] == "behind"]


def recommend(res: dict) -> dict:
    """The sweep's pick, unless the main runs show it behind weight-only somewhere the
    α=β=0.5 hybrid is not: then the hybrid that never falls behind is the safer default."""
    c = res["chosen"]
    pick = {"name": "hybrid-chosen", "alpha": c["alpha"], "beta": c["beta"],
            "normalizer": c["normalizer"]}
    even = {"name": "hybrid-sum", "alpha": 0.5, "beta": 0.5, "normalizer": "mean"}
    if "hybrid-chosen" not in res["importances"]:
        return dict(even, why="The sweep picks the α=β=0.5, mean hybrid of the main table.")
    lost = behind(res, "hybrid-chosen")
    if not lost or "hybrid-sum" not in res["importances"] or behind(res, "hybrid-sum"):
        return dict(pick, why="The main runs do not contradict the sweep's pick.")
    gains = []
    for r in res["ratios"]:
        d = compare(res, "bn", r, "hybrid-chosen", "hybrid-sum")[0]
        gains.append(f"{signed(d)} at {r}")
    return dict(even, why=(
        f"The sweep's pick does not carry over to every ratio: it falls behind weight-only at "
        f"{', '.join(lost)}, while α=β=0.5 (mean) is never behind weight-only at any ratio or "
        f"stage. Against α=β=0.5 the pick gains or loses, after BN recalibration, "
        f"{', '.join(gains)} points. The safer default is α=β=0.5 with `\"mean\"`; α="
        f"{c['alpha']}/β={c['beta']} is the better setting for heavy pruning "
        f"(ratio ≥ {res['sweep_ratio']}) without fine-tuning. (This second look uses the test "
        f"set and was added after a first full run, so it is a check, not a tuned choice.)"))


def reading(res: dict, hybrid: str) -> str:
    """What the main runs say about ``hybrid`` against weight-only, in words."""
    words = {key: [compare(res, key, r, hybrid, "weight")[2] for r in res["ratios"]]
             for key, _ in stages(res)}

    def where(key: str, word: str) -> str:
        found = [str(r) for r, w in zip(res["ratios"], words[key]) if w == word]
        if not found:
            return "at no ratio"
        return f"at ratio {found[0]}" if len(found) == 1 else \
            f"at ratios {', '.join(found[:-1])} and {found[-1]}"

    text = (f"Against weight-only: without training (after BN recalibration) this "
            f"hybrid is ahead {where('bn', 'ahead')} and behind {where('bn', 'behind')}.")
    if "ft" in words:
        if all(w == "tie" for w in words["ft"]):
            text += (" **After one epoch of fine-tuning it does not beat weight-only**: every "
                     "difference is a tie. The hybrid pays off when the pruned model gets "
                     "little or no fine-tuning; with a fine-tuning budget, the data-free "
                     "`WeightImportance` does as well on this model.")
        else:
            text += (f" After one epoch of fine-tuning it is ahead {where('ft', 'ahead')} and "
                     f"behind {where('ft', 'behind')}.")
    return text


def spread_section(res: dict) -> str:
    if not res.get("spread"):
        return ""
    lines = ["| group | channels | producers | weight-score CV | activation-score CV | "
             "rank correlation |", "|---:|---:|---|---:|---:|---:|"]
    for r in res["spread"]:
        lines.append(f"| {r['group']} | {r['size']} | {r['layers']} | {r['weight_cv']:.3f} | "
                     f"{r['act_cv']:.3f} | {r['spearman']:.2f} |")
    return f"""## The two raw scores on the dense model

Per channel group: the coefficient of variation (s.d. / mean) of the raw weight score
(`WeightImportance.raw`) and of the raw activation score (`ActivationImportance.raw`, seed-0
calibration batches), and the Spearman correlation of the two rankings:

{chr(10).join(lines)}

{spread_summary(res["spread"])}
"""


def spread_summary(rows: List[dict]) -> str:
    def span(key: str) -> str:
        values = [r[key] for r in rows]
        return f"{min(values):.2f}–{max(values):.2f}"
    return (f"Weight-score CV {span('weight_cv')}, activation-score CV {span('act_cv')}, rank "
            f"correlation {span('spearman')}: the two scores spread the channels "
            f"{'about equally' if abs(statistics.mean(r['weight_cv'] - r['act_cv'] for r in rows)) < 0.05 else 'unequally'}"
            f" but disagree on their order, so mixing them changes which channels go. With "
            f"`\"mean\"` (or `\"max\"`/`\"sum\"`), each term keeps its own spread, so α and β "
            f"weigh the terms only as far as their spreads are alike.")


def plot(res: dict, path: str) -> Optional[str]:
    """Accuracy vs ratio per importance at each stage; None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    dense = res["dense"]
    panels = [("pruned", "right after pruning")] + [
        (k, {"bn": "after BN recalibration", "ft": "after 1 epoch of fine-tuning"}[k])
        for k, _ in stages(res)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4))
    xs = [0.0] + list(res["ratios"])
    for ax, (key, title) in zip(axes, panels):
        for name in res["importances"]:
            stats = [(dense["test_acc"], 0.0)] + [
                mean_sd(cell(res["main"], key, ratio=r, importance=name)) for r in res["ratios"]]
            ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                        capsize=3, label=label(name, res["chosen"]))
        ax.set_title(title)
        ax.set_xlabel("pruning ratio (per group)")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"SmallResNet {'-'.join(map(str, WIDTHS))} on Fashion-MNIST, pruned by CleanAI "
                 f"(mean ± s.d. over {len(res['seeds'])} seed(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(res: dict, out: str, png: str) -> str:
    dense = res["dense"]
    plotted = plot(res, png)
    plot_line = (f"![accuracy vs pruning ratio]({os.path.relpath(plotted, os.path.dirname(out))})"
                 if plotted else "_matplotlib is not installed: no plot._")
    train = f"trained in {dense['train_s']:.0f} s" + (
        " (by an earlier run; this run loaded the cached checkpoint)" if dense["cached"] else "")
    ft = (f"one epoch over the {res['n_train']} training images, SGD (momentum 0.9, Nesterov, "
          f"weight decay 5e-4), lr {FT_LR} cosine-decayed to 0, batch {BATCH}, the training "
          f"augmentation" if res["finetune"] else "not run (`--no-finetune`)")
    diffs = [r["mask_diff"] for r in res["main"] if r.get("mask_diff") is not None]
    check = (f"Every pruned model was also compared with the dense model whose consumer weights "
             f"for the removed channels are zeroed instead of sliced: the largest output "
             f"difference over all runs is {max(diffs):.1e}, so the chance-level accuracy right "
             f"after pruning is what removing those channels does (the downstream BatchNorm "
             f"statistics no longer fit), not a slicing error." if diffs else "")
    return f"""# Accuracy after pruning: Fashion-MNIST

_Generated by `benchmarks/accuracy_fashion_mnist.py` on {res['date']} in
{res['elapsed_s'] / 60:.1f} min. Rerun it to refresh every number, the plot and the conclusions
below: they are computed from the measurements, not written by hand._

- Command: `{res['command']}`
- torch {res['torch']}, CleanAI {res['cleanai']}, Python {res['python']}; {res['machine']};
  torch threads = {res['threads']} (`--threads`; on this shared 2-core machine two threads ran
  several times slower than one). Load average at start {res['load'][0]}, at end
  {res['load'][1]}: other processes shared these cores.
- Data: Debian `dataset-fashion-mnist`. The 60k training images are split once (fixed seed)
  into {res['n_train']} for training, calibration, BN recalibration and fine-tuning and
  {res['n_val']} held out for choosing the defaults; the main tables use the {res['n_test']}
  test images.
- Model: `SmallResNet`: stem conv 3x3/2 ({WIDTHS[0]}) + BN + ReLU, three BasicBlocks of widths
  {'-'.join(map(str, WIDTHS))} at 14x14, 7x7 and 4x4 (1x1 conv-BN shortcuts where the shape
  changes), average pool, linear 10: {human(dense['params'])} parameters,
  {human(dense['macs'])} MACs per 1x28x28 image. Trained {dense['epochs']} epoch(s) with SGD
  (momentum 0.9, Nesterov, weight decay 5e-4), one-cycle lr up to {dense['lr']}, batch {BATCH},
  random flips and 2-pixel shifts; {train}. Dense test accuracy **{dense['test_acc']:.2f}%**.
- Pruning: `StructuredPruner(model, example_inputs, importance=..., pruning_ratio=r)`, one
  step; every channel group (the residual streams included) loses the fraction r of its
  channels; the classifier's outputs are kept. Data-dependent importances calibrate on
  {CALIB_BATCHES} random training batches of {BATCH}; `recalibrate_bn` uses {BN_BATCHES} other
  random batches of {BATCH}. Fine-tuning: {ft}.
- Seeds {', '.join(map(str, res['seeds']))}: a seed draws the calibration and BN batches, the
  random importance and the fine-tuning order; the dense model is the same for all. Cells are
  mean ± sample s.d. over seeds. Parameters and MACs do not depend on the importance: each
  removes the same number of channels from each group.

## Headline: hybrid vs weight-only at the same MACs

{headline(res)}

A difference is a tie unless it exceeds both twice its standard error over seeds and
{TIE_POINTS} points (two seeds understate the spread).

## Accuracy (%) by ratio and importance

{main_table(res)}

{plot_line}

{check}

{sweep_section(res)}
## Choosing the defaults

{choosing_defaults(res)}

{spread_section(res)}"""


# --- main --------------------------------------------------------------------------------

def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def load_average() -> str:
    try:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"CPU {names[0]} x{len(names)}" if names else f"CPU {platform.processor()}"
    except OSError:
        return f"CPU {platform.processor() or 'unknown'}"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: ratio 0.5, seed 0, data subsets, a 1-epoch model, a "
                             "small sweep; writes into the cache dir unless --out is given")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1")
    parser.add_argument("--ratios", type=float, nargs="+", default=None,
                        help="default: 0.3 0.5 0.7")
    parser.add_argument("--importances", nargs="+", choices=list(LABELS), default=None,
                        help="default: all (the sweep's pick is added when it differs)")
    parser.add_argument("--sweep-ratio", type=float, default=0.5)
    parser.add_argument("--no-finetune", action="store_true", help="skip the fine-tuning epoch")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 8)")
    parser.add_argument("--lr", type=float, default=0.1, help="peak training lr")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: on a shared 2-core machine two "
                             "OpenMP threads wait on each other and run several times slower)")
    parser.add_argument("--retrain", action="store_true", help="ignore the cached checkpoint")
    parser.add_argument("--data-dir", default=DATA_DIR)
    parser.add_argument("--cache-dir", default=CACHE_DIR)
    parser.add_argument("--out", default=None, help="report path (default docs/accuracy.md; "
                        "the plot goes next to it as accuracy_fashion_mnist.png)")
    parser.add_argument("--from-results", default=None, metavar="JSON",
                        help="rewrite the report from a saved results file; runs nothing")
    args = parser.parse_args(argv)
    out = args.out or (os.path.join(args.cache_dir, "accuracy_quick.md") if args.quick
                       else os.path.join(ROOT, "docs", "accuracy.md"))
    png = os.path.join(os.path.dirname(os.path.abspath(out)), "accuracy_fashion_mnist.png")

    if args.from_results:
        with open(args.from_results) as f:
            res = json.load(f)
        res["sweep_pairs"] = [tuple(p) for p in res["sweep_pairs"]]
    else:
        res = run(args)
        os.makedirs(args.cache_dir, exist_ok=True)
        saved = os.path.join(args.cache_dir, f"results{'_quick' if args.quick else ''}.json")
        with open(saved, "w") as f:
            json.dump(res, f, indent=1)
        log(f"saved {saved}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(report(res, out, png))
    log(f"wrote {out}")


def run(args: argparse.Namespace) -> dict:
    """Train (or load) the dense model, sweep the hybrid, choose, then the main runs."""
    start, load, revision = time.perf_counter(), load_average(), cleanai_revision()
    torch.set_num_threads(args.threads)
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    ratios = args.ratios or ([0.5] if args.quick else [0.3, 0.5, 0.7])
    importances = args.importances or list(LABELS)
    pairs = [(0.25, 0.75), (0.5, 0.5)] if args.quick else SWEEP_PAIRS
    norms = ["mean", "rank"] if args.quick else SWEEP_NORMALIZERS

    data = load_data(args.data_dir)
    if args.quick:
        data = Data(data.train_x[:8000], data.train_y[:8000], data.val_x[:1000],
                    data.val_y[:1000], data.test_x[:2000], data.test_y[:2000])
    log(f"data: {len(data.train_x)} train, {len(data.val_x)} held out, {len(data.test_x)} test; "
        f"{args.threads} thread(s)")
    epochs = args.epochs or (1 if args.quick else 8)
    dense_model, dense = trained_model(data, epochs, args.lr, args.cache_dir, args.retrain)
    dense.update(params=count_params(dense_model), macs=count_macs(dense_model, EXAMPLE))

    sweep, chosen = [], None
    if not args.no_sweep:
        sweep = run_sweep(dense_model, data, args.sweep_ratio, seeds, pairs, norms)
        chosen = choose_defaults(sweep, pairs, norms)
        log(f"chosen: {chosen}")
        if (chosen["alpha"], chosen["beta"], chosen["normalizer"]) != (0.5, 0.5, "mean") \
                and not args.importances:
            importances.append("hybrid-chosen")
    main_rows = run_main(dense_model, data, ratios, importances, seeds, not args.no_finetune,
                         chosen)
    return {"date": datetime.date.today().isoformat(), "command": command_line(),
            "torch": torch.__version__, "cleanai": f"{cleanai.__version__} ({revision})",
            "python": platform.python_version(), "machine": machine(), "threads": args.threads,
            "load": [load, load_average()], "elapsed_s": time.perf_counter() - start,
            "n_train": len(data.train_x), "n_val": len(data.val_x), "n_test": len(data.test_x),
            "dense": dense, "seeds": seeds, "ratios": ratios, "importances": importances,
            "finetune": not args.no_finetune, "main": main_rows, "sweep": sweep,
            "sweep_ratio": args.sweep_ratio, "sweep_pairs": pairs, "sweep_normalizers": norms,
            "chosen": chosen, "spread": score_spread(dense_model, data)}


if __name__ == "__main__":
    main()
