"""Does pruning scale linearly with depth? A LLaMA-style decoder in plain PyTorch (RMSNorm,
grouped-query attention with rotary embeddings, SwiGLU MLP; tests/llama_like.py) with tiny
widths, at growing depth.

For each depth: graph build time (``StructuredPruner(...)``: trace + groups) and prune time
(``pruner.prune()``: plan, apply, validation forward; the attention's fixed head size makes the
first try fail, so step() protects the attention and plans again, as it would for a user),
per decoder layer. Flat per-layer times mean linear scaling. Median of ``--repeats`` runs;
wall-clock and the process's CPU time (the latter is steadier when other jobs share the cores).

    python benchmarks/scale_depth.py [--depths 16 64 256] [--repeats 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from llama_like import LlamaLike  # noqa: E402

from cleanai import StructuredPruner  # noqa: E402
from _common import cleanai_revision  # noqa: E402


def measure(depth: int, seq: int = 8):
    torch.manual_seed(0)
    model = LlamaLike(layers=depth).eval()
    ids = torch.randint(0, 50, (1, seq))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0, c0 = time.perf_counter(), time.process_time()
        pruner = StructuredPruner(model, ids, pruning_ratio=0.5)
        t1, c1 = time.perf_counter(), time.process_time()
        pruner.prune()
        t2, c2 = time.perf_counter(), time.process_time()
    assert model(ids).shape == (1, seq, 50)
    return t1 - t0, t2 - t1, c1 - c0, c2 - c1, len(pruner.graph.groups)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    limit = sys.getrecursionlimit()
    print(f"CleanAI {cleanai_revision()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, recursion limit {limit}")
    measure(4)  # warm-up
    print("wall-clock seconds, and CPU seconds of this process (steadier on a busy machine)")
    print(f"{'layers':>6} {'groups':>6} {'build s':>8} {'ms/layer':>8} {'cpu ms/l':>8} "
          f"{'prune s':>8} {'ms/layer':>8} {'cpu ms/l':>8}")
    for depth in args.depths:
        runs = [measure(depth) for _ in range(args.repeats)]
        build, prune, cbuild, cprune = (statistics.median(r[i] for r in runs) for i in range(4))
        per = 1000 / depth
        print(f"{depth:>6} {runs[0][4]:>6} {build:>8.3f} {build * per:>8.2f} {cbuild * per:>8.2f} "
              f"{prune:>8.3f} {prune * per:>8.2f} {cprune * per:>8.2f}")
    assert sys.getrecursionlimit() == limit


if __name__ == "__main__":
    main()
