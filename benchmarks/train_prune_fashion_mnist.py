"""Pruning while training, on Fashion-MNIST: at 25% of the dense MACs, with the dense model's
epoch budget, how much accuracy is left.

The SmallResNet and recipe of ``accuracy_fashion_mnist.py`` (55k training images, augmentation,
SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 128, one-cycle lr 0.1, 8 epochs; the
dense checkpoint is cached). Every variant prunes to ``--macs`` of the dense MACs with the
data-free ``WeightImportance`` and ``StructuredPruner(target_macs=...)``; accuracy is on the 10k
test images:

    one-shot   the trained dense model pruned once, then one fine-tuning epoch (lr 0.01,
               cosine): 9 epochs in all, the reference from accuracy.md's recipe
    sparse     7 epochs with ``GroupSparsity`` aimed at the channels the pruner would remove
               (``reg.target(pruner.plan())``, re-planned every ``--replan`` iterations; the
               penalty grows linearly over the first epochs), one prune, then the same
               fine-tuning epoch: 8 epochs
    sparse --cut-epoch E
               the same penalty inside one one-cycle schedule over the 8 epochs, the cut at
               epoch E (the optimizer's momentum sliced), the pruned model trained on to the end
               without the penalty: 8 epochs (cut at 7: 91.47%, against 91.62% for 7 + 1)
    gradual    8 epochs with ``GradualPruner`` (cubic schedule from ``--gradual-start`` to
               ``--gradual-end`` epochs, a step every ``--every`` iterations), the optimizer's
               momentum sliced at every step: 8 epochs

Then the regulariser's cost: a resnet18 training step (batch 16, 3x224x224, SGD) with and
without ``loss + reg()``, alternated, median of ``--overhead-steps`` each.

    python benchmarks/train_prune_fashion_mnist.py            # writes docs/train_prune.md
    python benchmarks/train_prune_fashion_mnist.py --quick    # 1 epoch + 1 fine-tuning, 5k images
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import cleanai
from _common import cleanai_revision
from accuracy_fashion_mnist import (BATCH, CACHE_DIR, DATA_DIR, EXAMPLE, FT_LR, ROOT, SmallResNet,
                                    accuracy, fit, load_average, load_data, log, machine,
                                    sample_batches, trained_model)
from cleanai.importance import OutputSensitivity, WeightActivationImportance, WeightImportance
from cleanai.train import GradualPruner, GroupSparsity, slice_optimizer_state
from cleanai.utils import count_macs, count_params

EPOCHS = 8
LR = 0.1


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int,
          extra_loss: Optional[Callable[[], torch.Tensor]] = None,
          after_step: Optional[Callable[[int, torch.optim.Optimizer], None]] = None) -> None:
    """The dense recipe (one-cycle lr 0.1), with a loss term and a per-iteration callback."""
    fit(model, x, y, epochs, LR, seed, "onecycle", verbose=True, extra_loss=extra_loss,
        after_step=after_step)
    log(f"  {count_macs(model, EXAMPLE) / 1e6:.2f} M MACs at the end")


def pruner_for(model: nn.Module, macs: float, importance: str = "weight"
               ) -> cleanai.StructuredPruner:
    score = WeightImportance() if importance == "weight" else WeightActivationImportance()
    allocation = OutputSensitivity() if importance == "sensitivity" else None
    return cleanai.StructuredPruner(model, EXAMPLE, importance=score, target_macs=macs,
                                    allocation=allocation)


def widths(model: nn.Module) -> List[int]:
    """Output channels of every conv, in order."""
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def one_shot(dense: nn.Module, data, macs: float, seed: int) -> Dict[str, float]:
    model = copy.deepcopy(dense)
    pruner_for(model, macs).step()
    pruned = accuracy(model, data.test_x, data.test_y)
    fit(model, data.train_x, data.train_y, 1, FT_LR, seed=seed, schedule="cosine")
    return {"pruned": pruned, "final": accuracy(model, data.test_x, data.test_y),
            "macs": count_macs(model, EXAMPLE), "params": count_params(model), "epochs": 9,
            "widths": widths(model)}


def sparse(data, macs: float, seed: int, epochs: int, lam: float, ramp_epochs: float,
           replan: int, importance: str, aim_epoch: float, calib,
           cut_epoch: Optional[float] = None) -> Dict[str, float]:
    if cut_epoch is not None:
        return sparse_in_schedule(data, macs, seed, epochs, lam, ramp_epochs, replan,
                                  importance, aim_epoch, calib, cut_epoch)
    torch.manual_seed(seed)
    model = SmallResNet()
    pruner = pruner_for(model, macs, importance)
    per_epoch = math.ceil(len(data.train_x) / BATCH)
    first = int(aim_epoch * per_epoch)
    ramp = max(1, int(ramp_epochs * per_epoch))
    reg = GroupSparsity(pruner, lam, schedule=lambda t: min(1.0, max(0, t - first) / ramp))

    def aim() -> None:
        if importance != "weight":
            pruner.calibrate(calib)
        reg.target(pruner.plan())

    def replanned(it: int, opt) -> None:
        if it >= first and (it - first) % replan == 0:
            aim()

    if first == 0:
        aim()
    start = time.perf_counter()
    train(model, data.train_x, data.train_y, epochs - 1, seed, reg, replanned)
    before = accuracy(model, data.test_x, data.test_y)
    if importance != "weight":
        pruner.calibrate(calib)
    pruner.step()
    pruned = accuracy(model, data.test_x, data.test_y)
    fit(model, data.train_x, data.train_y, 1, FT_LR, seed=seed, schedule="cosine")
    return {"before_prune": before, "pruned": pruned, "widths": widths(model),
            "final": accuracy(model, data.test_x, data.test_y), "macs": count_macs(model, EXAMPLE),
            "params": count_params(model), "epochs": epochs, "train_s": time.perf_counter() - start}


def sparse_in_schedule(data, macs: float, seed: int, epochs: int, lam: float,
                       ramp_epochs: float, replan: int, importance: str, aim_epoch: float,
                       calib, cut_epoch: float) -> Dict[str, float]:
    """The same aimed penalty, but one one-cycle schedule over all ``epochs``: the cut comes
    at ``cut_epoch``, inside it (the optimizer's momentum sliced with
    ``slice_optimizer_state``), and the rest of the schedule trains the pruned model without
    the penalty; no separate fine-tuning."""
    torch.manual_seed(seed)
    model = SmallResNet()
    pruner = pruner_for(model, macs, importance)
    per_epoch = math.ceil(len(data.train_x) / BATCH)
    first, cut = int(aim_epoch * per_epoch), int(cut_epoch * per_epoch)
    ramp = max(1, int(ramp_epochs * per_epoch))
    reg = GroupSparsity(pruner, lam, schedule=lambda t: min(1.0, max(0, t - first) / ramp))
    state: Dict[str, float] = {}

    def aim() -> None:
        if importance != "weight":
            pruner.calibrate(calib)
        reg.target(pruner.plan())

    def penalty() -> torch.Tensor:
        return reg() if "pruned" not in state else torch.zeros(())

    def step(it: int, opt) -> None:
        if it == cut:
            state["before_prune"] = accuracy(model, data.test_x, data.test_y)
            if importance != "weight":
                pruner.calibrate(calib)
            with slice_optimizer_state(opt, model):
                pruner.step()
            state["pruned"] = accuracy(model, data.test_x, data.test_y)
            model.train()
        elif it < cut and it >= first and (it - first) % replan == 0:
            aim()

    if first == 0:
        aim()
    start = time.perf_counter()
    train(model, data.train_x, data.train_y, epochs, seed, penalty, step)
    return {**state, "widths": widths(model), "final": accuracy(model, data.test_x, data.test_y),
            "macs": count_macs(model, EXAMPLE), "params": count_params(model), "epochs": epochs,
            "cut_epoch": cut_epoch, "train_s": time.perf_counter() - start}


def gradual(data, macs: float, seed: int, epochs: int, start_epoch: float, end_epoch: float,
            every: int, importance: str, calib) -> Dict[str, float]:
    torch.manual_seed(seed)
    model = SmallResNet()
    pruner = pruner_for(model, macs, importance)
    per_epoch = math.ceil(len(data.train_x) / BATCH)
    first = max(1, int(start_epoch * per_epoch))
    last = first + ((int(end_epoch * per_epoch) - first) // every) * every
    holder: Dict[str, GradualPruner] = {}

    def step(it: int, opt) -> None:
        if "g" not in holder:  # the optimizer exists once training starts
            holder["g"] = GradualPruner(pruner, start=first, end=last, every=every,
                                        optimizer=opt, total_steps=epochs * per_epoch,
                                        data=calib if importance != "weight" else None)
        holder["g"].step()

    start = time.perf_counter()
    train(model, data.train_x, data.train_y, epochs, seed, None, step)
    return {"final": accuracy(model, data.test_x, data.test_y), "macs": count_macs(model, EXAMPLE),
            "params": count_params(model), "epochs": epochs, "steps": len(holder["g"].events),
            "widths": widths(model),
            "first": first, "last": last, "train_s": time.perf_counter() - start}


def overhead(steps: int) -> Dict[str, float]:
    """Seconds per resnet18 training step, plain and with the penalty, alternated."""
    from torchvision.models import resnet18
    torch.manual_seed(0)
    model = resnet18()
    x, y = torch.randn(16, 3, 224, 224), torch.randint(0, 1000, (16,))
    reg = GroupSparsity(cleanai.StructuredPruner(model, x[:1]), 1e-4)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def one(with_reg: bool) -> float:
        t = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        if with_reg:
            loss = loss + reg()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    one(False), one(True)  # warm-up
    plain, regd = [], []
    for _ in range(steps):
        plain.append(one(False))
        regd.append(one(True))
    t = time.perf_counter()
    for _ in range(20):
        reg().backward()
    alone = (time.perf_counter() - t) / 20
    return {"plain": statistics.median(plain), "reg": statistics.median(regd),
            "alone": alone, "groups": len(reg.groups())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--macs", type=float, default=0.25)
    ap.add_argument("--lam", type=float, default=5e-3)
    ap.add_argument("--ramp-epochs", type=float, default=3.0)
    ap.add_argument("--replan", type=int, default=100)
    ap.add_argument("--gradual-start", type=float, default=1.0)
    ap.add_argument("--gradual-end", type=float, default=5.0)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--importance", choices=["weight", "hybrid", "sensitivity"],
                    default="weight",
                    help="the score of sparse and gradual (hybrid: calibrated on 8 batches of "
                         "training images before each plan; sensitivity: hybrid with "
                         "allocation=OutputSensitivity())")
    ap.add_argument("--aim-epoch", type=float, default=0.0,
                    help="sparse: the epoch at which the penalty is first aimed and starts")
    ap.add_argument("--cut-epoch", type=float, default=None,
                    help="sparse: cut at this epoch inside one schedule over all epochs, the "
                         "rest training the pruned model (no separate fine-tuning)")
    ap.add_argument("--overhead-steps", type=int, default=5)
    ap.add_argument("--only", choices=["one-shot", "sparse", "gradual", "overhead"], nargs="+")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite docs/train_prune.md from the cached results, running nothing")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    only = set() if args.report_only else set(
        args.only or ["one-shot", "sparse", "gradual", "overhead"])
    started, load = time.perf_counter(), load_average()
    data = load_data(DATA_DIR)
    dense, info = trained_model(data, EPOCHS, LR, CACHE_DIR, False)
    epochs = EPOCHS
    if args.quick:
        data.train_x, data.train_y = data.train_x[:5000], data.train_y[:5000]
        epochs = 2
    calib = [b[0] for b in sample_batches(data.train_x, data.train_y, 8,
                                          torch.Generator().manual_seed(1000 + args.seed))]
    cache = os.path.join(CACHE_DIR, "train_prune_results.json")
    results = json.load(open(cache)) if os.path.exists(cache) and not args.quick else {}
    if "one-shot" in only:
        log("one-shot ...")
        results["one-shot"] = one_shot(dense, data, args.macs, args.seed)
    if "sparse" in only:
        log(f"sparse training, lam {args.lam} ...")
        key = (f"sparse/{args.importance}/aim{args.aim_epoch:g}/lam{args.lam:g}/"
               f"ramp{args.ramp_epochs:g}"
               + (f"/cut{args.cut_epoch:g}" if args.cut_epoch is not None else "")
               + (f"/seed{args.seed}" if args.seed else ""))
        results[key] = sparse(data, args.macs, args.seed, epochs, args.lam,
                              args.ramp_epochs if not args.quick else 0.5, args.replan,
                              args.importance, args.aim_epoch, calib,
                              args.cut_epoch if not args.quick or args.cut_epoch is None
                              else 1.5)
        results[key].update(lam=args.lam, ramp_epochs=args.ramp_epochs, replan=args.replan,
                            importance=args.importance, aim_epoch=args.aim_epoch)
        log(f"{key}: {results[key]}")
    if "gradual" in only:
        log("gradual pruning ...")
        start, end = (args.gradual_start, args.gradual_end) if not args.quick else (0.25, 1.0)
        key = f"gradual/{args.importance}" + (f"/seed{args.seed}" if args.seed else "")
        results[key] = gradual(data, args.macs, args.seed, epochs, start, end, args.every,
                               args.importance, calib)
        results[key].update(importance=args.importance, every=args.every)
        log(f"{key}: {results[key]}")
    if "overhead" in only:
        log("regulariser overhead on resnet18 ...")
        results["overhead"] = overhead(args.overhead_steps)
    for key, row in results.items():
        log(f"{key}: {row}")
    if args.quick:
        return
    os.makedirs(CACHE_DIR, exist_ok=True)
    json.dump(results, open(cache, "w"), indent=1)
    took = "report only" if args.report_only else (
        f"this run: {(time.perf_counter() - started) / 60:.1f} min, load average {load} at "
        f"start, {load_average()} at end")
    write_report(results, info, args, dense, took)


def write_report(results: dict, info: dict, args, dense: nn.Module, minutes: str) -> None:
    dense_macs, dense_acc = count_macs(dense, EXAMPLE), info["test_acc"]
    rows = []
    labels = {"one-shot": "one-shot, then 1 epoch fine-tuning",
              "sparse": "aimed sparse training (7 epochs), one cut, 1 epoch fine-tuning",
              "gradual": "gradual pruning during the 8 epochs"}
    for key in sorted((k for k in results if k != "overhead"),
                      key=lambda k: (list(labels).index(k.split("/")[0]), k)):
        r = results[key]
        variant, importance = (key.split("/") + ["weight"])[:2]
        pruned = f"{r['pruned']:.2f}" if "pruned" in r else "-"
        label = labels[variant]
        if variant == "sparse" and "cut_epoch" in r:
            label = (f"aimed sparse training, cut at epoch {r['cut_epoch']:g} inside one "
                     f"schedule, the pruned model trained on to epoch {r['epochs']}")
        if variant == "sparse":
            label += (f"; aimed from epoch {r['aim_epoch']:g}, lam {r['lam']:g} reached over "
                      f"{r['ramp_epochs']:g} epochs")
        if "/seed" in key:
            label += f" (seed {key.rsplit('/seed', 1)[1]})"
        rows.append(f"| {label} | {importance} | {r['epochs']} | "
                    f"{r['macs'] / dense_macs:.3f} | {r['params'] / count_params(dense):.3f} | "
                    f"{pruned} | {r['final']:.2f} | {r['final'] - dense_acc:+.2f} | "
                    f"{'-'.join(map(str, r.get('widths', [])))} |")
    o = results.get("overhead")
    over = (f"resnet18, batch 16 at 3x224x224, SGD, {args.threads} threads: a plain training "
            f"step {o['plain']:.2f} s, with `loss + reg()` {o['reg']:.2f} s "
            f"(median of {args.overhead_steps}, alternated: **{100 * (o['reg'] / o['plain'] - 1):+.1f}%**); "
            f"the penalty's forward and backward alone {1000 * o['alone']:.0f} ms "
            f"({100 * o['alone'] / o['plain']:.1f}% of a plain step) over {o['groups']} groups."
            if o else "not measured in this run.")
    s = next((v for k, v in results.items() if k.startswith("sparse")), {})
    g = next((v for k, v in results.items() if k.startswith("gradual")), {})
    text = f"""# Pruning while training: Fashion-MNIST at {args.macs:.0%} of the dense MACs

_Generated by `benchmarks/train_prune_fashion_mnist.py` on {datetime.date.today()}
({cleanai_revision()}, torch {torch.__version__}, {machine()}, {args.threads} thread(s)), from
the results of the runs cached in benchmarks/.cache; each variant is one run ({minutes}); seed 0
unless the row says otherwise (the seed sets the initial weights and the batch order)._

The dense SmallResNet of [accuracy.md](accuracy.md): {dense_acc:.2f}% on the 10k test images
after 8 epochs. Every variant prunes with `StructuredPruner(target_macs={args.macs})` and the
score of its row; test accuracy in %.

| variant | score | epochs | MACs / dense | params / dense | right after the cut | final | vs dense | conv widths |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Scores: `weight` is `WeightImportance()`; `hybrid` is `WeightActivationImportance()` (α = β =
0.5), calibrated on 8 batches of 128 training images before each plan; `sensitivity` is the
hybrid score with `allocation=OutputSensitivity()` (how many channels each group loses from
the output's sensitivity per MAC saved, on the same batches). The dense conv widths
are 32-32-32-64-64-64-128-128-128 (stem; then each block's conv1, conv2 and shortcut conv).

- aimed sparse training: `GroupSparsity(pruner, lam)`, aimed with `reg.target(pruner.plan())`
  every {s.get('replan')} iterations from the epoch given in the row on, the penalty growing
  linearly to `lam` over the epochs given; "right after the cut" is the accuracy once the
  channels it emptied are removed, before fine-tuning.
- gradual: `GradualPruner(pruner, start={g.get('first')}, end={g.get('last')},
  every={g.get('every')}, optimizer=opt)`: {g.get('steps')} steps, cubic, inside the same
  one-cycle schedule; the optimizer's momentum is cut with every step.

Regulariser cost: {over}
"""
    path = os.path.join(ROOT, "docs", "train_prune.md")
    with open(path, "w") as f:
        f.write(text)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
