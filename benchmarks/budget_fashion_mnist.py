"""Budgets on Fashion-MNIST: at a fixed share of the dense MACs, which allocation of ratios
keeps the most accuracy.

The dense SmallResNet of ``accuracy_fashion_mnist.py`` (same split, same cached checkpoint)
is pruned to ``--macs`` of its MACs three ways, with the same score (hybrid, α = β = 0.5), the
same recovery (``compensate="lstsq"``, then ``reconstruct(granularity="block")``) and the same
16 calibration batches of 128 training images:

    uniform      one pruning_ratio for every group, the largest whose MACs meet the budget
    target_macs  StructuredPruner(target_macs=...): one ranking of normalised scores
    search       cleanai.budget.search_ratios(target_macs=...) on the calibration batches
                 (default metric: agreement with the dense model, no labels)
    sensitivity  StructuredPruner(target_macs=..., allocation=OutputSensitivity()): one
                 ranking of the output's change per MAC saved sets each group's count, the
                 hybrid score picks which channels

Each is scored on the 10k test images (never seen by calibration or search) before any
training, after recovery, and after one labelled fine-tuning epoch (the recipe of accuracy.md).

    python benchmarks/budget_fashion_mnist.py              # writes docs/budget.md
    python benchmarks/budget_fashion_mnist.py --quick      # one seed, 16 search candidates
    python benchmarks/budget_fashion_mnist.py --methods sensitivity   # the others' rows from
                                                   # the last run (.cache/budget_results.json)
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import time
import warnings
from typing import List

import torch

import cleanai
from _common import cleanai_revision
from accuracy_fashion_mnist import (CACHE_DIR, DATA_DIR, EXAMPLE, FT_LR, ROOT, accuracy, fit,
                                    load_average, load_data, log, machine, seed_batches,
                                    trained_model)
from cleanai.budget import search_ratios
from cleanai.importance import OutputSensitivity, WeightActivationImportance
from cleanai.utils import count_macs, count_params

METHODS = [("uniform", "uniform ratio"), ("target", "target_macs (global ranking)"),
           ("search", "search_ratios"),
           ("sensitivity", "target_macs + allocation=OutputSensitivity()")]


def uniform_ratio(dense, budget: float) -> float:
    """The largest single ratio whose pruned model has at most ``budget`` of the MACs."""
    macs0 = count_macs(dense, EXAMPLE)
    lo, hi = 0.0, 0.95
    for _ in range(12):
        mid = (lo + hi) / 2
        model = copy.deepcopy(dense)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cleanai.StructuredPruner(model, EXAMPLE, pruning_ratio=mid).step()
        if count_macs(model, EXAMPLE) <= budget * macs0:
            hi = mid
        else:
            lo = mid
    return hi


def pruned(dense, calib, method: str, budget: float, ratio: float, evaluations: int,
           seed: int):
    """A pruned, compensated copy of ``dense`` by ``method``, and seconds spent planning."""
    model = copy.deepcopy(dense).eval()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "search":
            found = search_ratios(model, EXAMPLE, calib, target_macs=budget,
                                  importance=WeightActivationImportance(), compensate="lstsq",
                                  max_batches=len(calib), evaluations=evaluations, seed=seed,
                                  progress=False)
            log(found.summary())
            found.pruner.apply(found.plan)
        else:
            options = {"pruning_ratio": ratio} if method == "uniform" else \
                {"target_macs": budget}
            if method == "sensitivity":
                options["allocation"] = OutputSensitivity()
            pruner = cleanai.StructuredPruner(model, EXAMPLE,
                                              importance=WeightActivationImportance(),
                                              compensate="lstsq", **options)
            pruner.calibrate(calib, max_batches=len(calib))
            pruner.step()
    return model, time.perf_counter() - start


def run_one(dense, data, budget: float, seed: int, evaluations: int, epochs: bool,
            methods: List[str]) -> List[dict]:
    calib, _ = seed_batches(data, seed)
    inputs = [x for x, _ in calib]
    test = lambda m: accuracy(m, data.test_x, data.test_y)  # noqa: E731
    ratio = uniform_ratio(dense, budget)
    macs0, params0 = count_macs(dense, EXAMPLE), count_params(dense)
    rows = []
    for method in methods:
        model, seconds = pruned(dense, calib, method, budget, ratio, evaluations, seed)
        row = {"method": method, "seed": seed, "plan_s": seconds,
               "macs": count_macs(model, EXAMPLE) / macs0,
               "params": count_params(model) / params0, "compensated": test(model)}
        cleanai.recover.reconstruct(model, dense, inputs, granularity="block", progress=False)
        row["reconstructed"] = test(model)
        if epochs:
            fit(model, data.train_x, data.train_y, 1, FT_LR, seed=seed, schedule="cosine")
            row["fine_tuned"] = test(model)
        if method == "uniform":
            row["ratio"] = ratio
        log(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in row.items()))
        rows.append(row)
    return rows


def table(rows: List[dict], dense_acc: float) -> str:
    stages = [k for k in ("compensated", "reconstructed", "fine_tuned") if k in rows[0]]
    out = ["| allocation | MACs | params | " + " | ".join(
        {"compensated": "lstsq compensation", "reconstructed": "+ reconstruct (block)",
         "fine_tuned": "+ 1 epoch FT"}[s] for s in stages) + " | planning (s) |",
           "|---|---:|---:|" + "---:|" * len(stages) + "---:|",
           "| dense | 1.000 | 1.000 | " + " | ".join(f"{dense_acc:.2f}" for _ in stages)
           + " | |"]
    for method, name in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue

        def cell(key, fmt=".2f"):
            vals = [r[key] for r in mine]
            sd = f" ± {statistics.stdev(vals):{fmt}}" if len(vals) > 1 else ""
            return f"{statistics.mean(vals):{fmt}}{sd}"
        extra = f" ({statistics.mean(r['ratio'] for r in mine):.3f})" if method == "uniform" \
            else ""
        out.append(f"| {name}{extra} | {cell('macs', '.3f')} | {cell('params', '.3f')} | "
                   + " | ".join(cell(s) for s in stages) + f" | {cell('plan_s', '.0f')} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one seed, 16 candidates, no epoch")
    ap.add_argument("--macs", type=float, default=0.25, help="the budget, a share of the MACs")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--evaluations", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--methods", nargs="+", choices=[m for m, _ in METHODS], default=None,
                    help="run these only; the other rows come from the last run's results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    evaluations = args.evaluations or (16 if args.quick else 128)
    out = args.out or os.path.join(CACHE_DIR if args.quick else os.path.join(ROOT, "docs"),
                                   "budget.md")
    start, load = time.perf_counter(), load_average()
    data = load_data(DATA_DIR)
    dense, info = trained_model(data, 8, 0.1, CACHE_DIR, False)
    methods = args.methods or [m for m, _ in METHODS]
    rows = [r for s in seeds for r in run_one(dense, data, args.macs, s, evaluations,
                                              not args.quick, methods)]
    saved = os.path.join(CACHE_DIR, "budget_results.json")
    if args.methods and os.path.exists(saved):
        with open(saved) as f:
            rows += [r for r in json.load(f) if r["method"] not in methods and r["seed"] in seeds]
    rows.sort(key=lambda r: [m for m, _ in METHODS].index(r["method"]))
    minutes = (time.perf_counter() - start) / 60
    others = sorted({r["method"] for r in rows} - set(methods))
    reused = (f"\nThis run measured {', '.join(methods)}; the rows of {', '.join(others)} are "
              f"those of the previous run (its results cache), same seeds and settings."
              if others else "")
    text = f"""# Pruning to a budget on Fashion-MNIST: which allocation keeps the accuracy

_Generated by `benchmarks/budget_fashion_mnist.py` on {datetime.date.today()} in {minutes:.1f}
min ({cleanai_revision()}, torch {torch.__version__}, {machine()}, {args.threads} thread(s);
load average {load} at start, {load_average()} at end)._

The dense model is the SmallResNet of [accuracy.md](accuracy.md) ({info['test_acc']:.2f}% on
the 10k test images), pruned to {args.macs:.0%} of its MACs. Every row uses the hybrid score
(α = β = 0.5), `compensate="lstsq"` and then `reconstruct(granularity="block")` on the same
16 batches of 128 training images; `search_ratios` scores {evaluations} candidates on those
batches by agreement with the dense model (no labels). The fine-tuning column adds one
labelled epoch (SGD, cosine, the recipe of accuracy.md). Cells: test accuracy (%), mean ± s.d.
over seeds {seeds}; MACs and params as fractions of the dense model.{reused}

{table(rows, info['test_acc'])}
"""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    with open(saved, "w") as f:
        json.dump(rows, f, indent=1)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
