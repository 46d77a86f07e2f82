"""Deploying pruned models on the CPU: file size, latency and quality of pruned + int8 models
against the dense float model, measured in the same run.

Fashion-MNIST: the SmallResNet of ``accuracy_fashion_mnist.py`` (cached dense checkpoint),
pruned at ratio 0.3 with the hybrid score and ``compensate="lstsq"``, reconstructed block by
block against the dense model on the same 16 calibration batches (no labels), then quantized
with ``cleanai.deploy.quantize`` (static int8, PT2E, x86 inductor, calibrated on those batches,
run through ``torch.compile``). Accuracy on the 10k test images.

MiniLM: the pretrained all-MiniLM-L6-v2 with 25% of its heads and FFN neurons removed (hybrid
score, ``compensate="lstsq"``, calibrated on pydoc text as in ``minilm_fidelity.py``), then
dynamic int8 (torchao, eager). Fidelity to the dense embeddings on held-out text.

"AOTInductor" rows: the model written with ``cleanai.deploy.export(..., format="aoti")``
(compiled ahead of time, checked against the model) and run back with
``cleanai.deploy.load``, compiled for each batch size it is timed at.

Latency: ``cleanai.utils.compare_latency`` (each variant timed in turns with the dense float
model, median of ``--repeats`` runs, "too noisy" when the interquartile ranges overlap or
exceed 25% of the median). Sizes: bytes of ``torch.save(model.state_dict())``.

    python benchmarks/deploy_cpu.py                 # writes docs/deploy.md
    python benchmarks/deploy_cpu.py --only fmnist   # one half (docs/deploy.md keeps the other)
"""
from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import os
import tempfile
import time
import types
import warnings
from typing import Dict

import torch

import cleanai
from _common import cleanai_revision
from cleanai.deploy import export, load, quantize
from cleanai.importance import WeightActivationImportance
from cleanai.utils import compare_latency, count_params

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache", "deploy_results.json")


def state_bytes(model: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def aot(model: torch.nn.Module, inputs, name: str, sizes: Dict[str, int]) -> torch.nn.Module:
    """``model`` as an AOTInductor package, loaded back; its file size goes into ``sizes``."""
    path = os.path.join(tempfile.mkdtemp(prefix="cleanai-aoti-"), "model.pt2")
    sizes[name] = export(model, inputs, path, "aoti").size_bytes
    return load(path)


class OnnxRuntime(torch.nn.Module):
    """An ONNX file run by onnxruntime (as many threads as torch), called like the Hugging
    Face encoder it came from: keywords in, ``.last_hidden_state`` out."""

    def __init__(self, path: str) -> None:
        super().__init__()
        import onnxruntime
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # its threads would otherwise spin after each run, slowing the model timed next
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(path, options,
                                                    providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def forward(self, **inputs):
        out = self.session.run(None, {n: inputs[n].numpy() for n in self.names})
        return types.SimpleNamespace(last_hidden_state=torch.from_numpy(out[0]))


def timing(dense, variants: Dict[str, torch.nn.Module], inputs, repeats: int) -> Dict[str, dict]:
    """Each variant timed in turns with the dense model: medians, spreads, verdict."""
    out = {}
    for name, model in variants.items():
        c = compare_latency(dense, model, inputs, warmup=5, repeats=repeats)
        out[name] = {"dense_ms": c.a.median * 1e3, "ms": c.b.median * 1e3,
                     "dense_spread": c.a.spread, "spread": c.b.spread, "speedup": c.speedup,
                     "verdict": c.verdict, "reason": c.reason}
    return out


def fmnist(repeats: int) -> dict:
    from accuracy_fashion_mnist import (CACHE_DIR, DATA_DIR, EXAMPLE, accuracy, load_data,
                                        seed_batches, trained_model)
    data = load_data(DATA_DIR)
    dense, info = trained_model(data, 8, 0.1, CACHE_DIR, False)
    calib, _ = seed_batches(data, 0)
    pruned = copy.deepcopy(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = cleanai.StructuredPruner(pruned, EXAMPLE, importance=WeightActivationImportance(),
                                          pruning_ratio=0.3, compensate="lstsq")
        pruner.calibrate(calib)
        pruner.step()
        cleanai.recover.reconstruct(pruned, dense, calib, granularity="block", progress=False)
    inputs = [x for x, _ in calib]
    int8 = quantize(pruned, inputs, mode="static")
    dense_int8 = quantize(dense, inputs, mode="static")
    acc = {name: accuracy(m, data.test_x, data.test_y) for name, m in
           (("dense", dense), ("pruned", pruned), ("pruned int8", int8.model),
            ("dense int8", dense_int8.model))}
    compiled = torch.compile(dense, dynamic=False)
    packages: Dict[str, int] = {}
    lat = {}
    for n in (1, 64):  # each package compiled at the batch size it is timed at
        x = torch.randn(n, 1, 28, 28)
        variants = {"dense, torch.compile": compiled, "pruned": pruned,
                    "dense int8": dense_int8.model, "pruned int8": int8.model,
                    "dense, AOTInductor": aot(dense, x, "dense", packages),
                    "pruned, AOTInductor": aot(pruned, x, "pruned", packages),
                    "pruned int8, AOTInductor": aot(int8.model, x, "pruned int8", packages)}
        lat[f"batch {n}"] = timing(dense, variants, x, repeats)
    size = {"dense": state_bytes(dense), "pruned": state_bytes(pruned),
            "dense int8": state_bytes(dense_int8.model), "pruned int8": state_bytes(int8.model)}
    return {"accuracy": acc, "latency": lat, "size": size, "packages": packages, "params": {
        "dense": count_params(dense), "pruned": count_params(pruned)},
        "quantization": int8.summary()}


def minilm(repeats: int) -> dict:
    from minilm_fidelity import embed, minilm_data, neighbour_agreement
    tokenizer, dense, calib_batches, eval_batches, evals = minilm_data()
    pruned = copy.deepcopy(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = cleanai.StructuredPruner(pruned, calib_batches[0],
                                          importance=WeightActivationImportance(),
                                          pruning_ratio=0.25, kinds=["heads", "channels"],
                                          compensate="lstsq")
        pruner.calibrate(calib_batches)
        pruner.step()
    int8 = quantize(pruned, mode="dynamic")
    dense_int8 = quantize(dense, mode="dynamic")
    ref = embed(dense, eval_batches)
    fidelity = {}
    for name, m in (("pruned", pruned), ("pruned int8", int8.model),
                    ("dense int8", dense_int8.model)):
        e = embed(m, eval_batches)
        fidelity[name] = {"cosine": float((e * ref).sum(1).mean()),
                          "neighbours": neighbour_agreement(ref, e)}
    lat_in = dict(tokenizer([" ".join(evals)] * 8, truncation=True, max_length=128,
                            return_tensors="pt"))
    assert lat_in["input_ids"].shape == (8, 128)
    compiled = quantize(pruned, mode="dynamic", compile=True)
    e = embed(compiled.model, eval_batches[:4])  # compiles for those shapes; checks it agrees
    fidelity["pruned int8, compiled"] = {"cosine": float((e * ref[:len(e)]).sum(1).mean()),
                                         "neighbours": float("nan")}
    packages: Dict[str, int] = {}
    onnx = {}  # ONNX files at 128 tokens (a dynamic batch), run by onnxruntime
    for name, m in (("pruned", pruned), ("pruned int8", int8.model)):
        path = os.path.join(tempfile.mkdtemp(prefix="cleanai-onnx-"), "model.onnx")
        onnx[name] = OnnxRuntime(export(m, lat_in, path).path)
    padded = [dict(tokenizer(evals[i:i + 32], padding="max_length", truncation=True,
                             max_length=128, return_tensors="pt"))
              for i in range(0, len(evals), 32)]
    for name, m in onnx.items():
        e = embed(m, padded)
        fidelity[f"{name}, onnxruntime"] = {"cosine": float((e * ref).sum(1).mean()),
                                            "neighbours": neighbour_agreement(ref, e)}
    variants = {"pruned": pruned, "dense int8": dense_int8.model, "pruned int8": int8.model,
                "pruned int8, torch.compile": compiled.model,
                "pruned int8, AOTInductor": aot(int8.model, lat_in, "pruned int8", packages),
                "pruned, ONNX in onnxruntime": onnx["pruned"],
                "pruned int8 (onnxruntime's), ONNX in onnxruntime": onnx["pruned int8"]}
    return {"fidelity": fidelity, "latency": {"8 x 128 tokens": timing(dense, variants, lat_in,
                                                                       repeats)},
            "size": {"dense": state_bytes(dense), "pruned": state_bytes(pruned),
                     "dense int8": state_bytes(dense_int8.model),
                     "pruned int8": state_bytes(int8.model)}, "packages": packages,
            "params": {"dense": count_params(dense), "pruned": count_params(pruned)},
            "quantization": int8.summary()}


def honesty(repeats: int) -> dict:
    """``report()`` three times on the same pruned resnet18 on a quiet machine, then once with
    busy loops running beside it on every core."""
    import multiprocessing
    import torchvision
    torch.manual_seed(0)
    dense = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 224, 224)
    pruned = copy.deepcopy(dense)
    cleanai.StructuredPruner(pruned, x, pruning_ratio=0.3).prune()
    quiet = []
    for _ in range(3):
        r = cleanai.utils.report(dense, pruned, x, repeats=repeats)
        quiet.append({"dense_ms": r.before.latency_ms, "pruned_ms": r.after.latency_ms,
                      "verdict": str(r.latency)})
    busy = [multiprocessing.Process(target=_spin) for _ in range(os.cpu_count() or 2)]
    for p in busy:
        p.start()
    try:
        r = cleanai.utils.report(dense, pruned, x, repeats=repeats)
    finally:
        for p in busy:
            p.terminate()
    loaded = {"dense_ms": r.before.latency_ms, "pruned_ms": r.after.latency_ms,
              "verdict": str(r.latency)}
    return {"quiet": quiet, "loaded": loaded, "repeats": repeats}


def _spin() -> None:
    """A busy loop with uneven bursts: the load a shared machine puts on a measurement."""
    import random
    while True:
        end = time.perf_counter() + random.uniform(0.001, 0.05)
        while time.perf_counter() < end:
            pass
        time.sleep(random.uniform(0, 0.02))


def latency_table(lat: Dict[str, Dict[str, dict]]) -> str:
    rows = ["| input | variant | ms | dense ms | speed-up vs dense float | verdict |",
            "|---|---|---|---|---|---|"]
    for shape, by in lat.items():
        for name, r in by.items():
            verdict = r["verdict"] if r["verdict"] != "too noisy" else f"too noisy ({r['reason']})"
            rows.append(f"| {shape} | {name} | {r['ms']:.3g} (IQR {r['spread']:.0%}) | "
                        f"{r['dense_ms']:.3g} (IQR {r['dense_spread']:.0%}) | "
                        f"{r['speedup']:.2f}x | {verdict} |")
    return "\n".join(rows)


def size_table(size: Dict[str, int]) -> str:
    rows = ["| variant | MB | dense / variant |", "|---|---|---|"]
    rows += [f"| {k} | {v / 1e6:.3f} | {size['dense'] / v:.1f}x |" for k, v in size.items()]
    return "\n".join(rows)


def onnx_fidelity(fid: Dict[str, dict]) -> str:
    """The ONNX files' fidelity, run by onnxruntime on the same sentences padded to 128."""
    rows = [(k, v) for k, v in fid.items() if k.endswith("onnxruntime")]
    if not rows:
        return ""
    said = "; ".join(f"{k} {v['cosine']:.3f} / {v['neighbours']:.3f}" for k, v in rows)
    return (f" ONNX files (`export(..., \"model.onnx\")`, the int8 one quantized by "
            f"onnxruntime's dynamic recipe: activations per tensor), on the same sentences "
            f"padded to 128 tokens: {said}.")


def packages_line(packages: Dict[str, int]) -> str:
    """The AOTInductor files' sizes: compiled code plus weights, so larger than a state_dict."""
    if not packages:
        return ""
    sizes = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in packages.items())
    return (f"AOTInductor packages (compiled code and weights in one file): {sizes}.\n")


def report(results: dict, threads: int) -> str:
    parts = [f"""# Deploying pruned models on the CPU: measured

_Generated by `benchmarks/deploy_cpu.py` on {datetime.date.today()} ({cleanai_revision()},
torch {torch.__version__}, {threads} thread(s)). Latency: each variant timed
in turns with the dense float model (`cleanai.utils.compare_latency`, median of the runs, IQR
relative to the median); "too noisy" where the rule cannot tell._
"""]
    f = results.get("fmnist")
    if f:
        a = f["accuracy"]
        parts.append(f"""## Fashion-MNIST SmallResNet: pruned 0.3 + compensation + reconstruction, static int8

Accuracy on the 10k test images: dense {a['dense']:.2f}%, pruned {a['pruned']:.2f}%, pruned int8
{a['pruned int8']:.2f}% ({a['pruned int8'] - a['dense']:+.2f} points), dense int8 {a['dense int8']:.2f}%.
Parameters {f['params']['pruned']:,} of {f['params']['dense']:,}. {f['quantization'].splitlines()[0]}.

{size_table(f['size'])}

{packages_line(f.get('packages', {}))}
{latency_table(f['latency'])}
""")
    m = results.get("minilm")
    if m:
        fid = m["fidelity"]
        parts.append(f"""## MiniLM-L6: 25% heads + FFN pruned (compensate="lstsq"), dynamic int8

Fidelity to the dense embeddings on 512 held-out sentences (mean cosine / same nearest
neighbour): pruned {fid['pruned']['cosine']:.3f} / {fid['pruned']['neighbours']:.3f}; pruned int8
{fid['pruned int8']['cosine']:.3f} / {fid['pruned int8']['neighbours']:.3f}; dense int8
{fid['dense int8']['cosine']:.3f} / {fid['dense int8']['neighbours']:.3f}; pruned int8 through `torch.compile`
(`quantize(..., compile=True)`), on the first 128 sentences: cosine
{fid.get('pruned int8, compiled', {}).get('cosine', float('nan')):.3f}.{onnx_fidelity(fid)}
Parameters {m['params']['pruned']:,} of {m['params']['dense']:,}. {m['quantization'].splitlines()[0]}.

{size_table(m['size'])}

{packages_line(m.get('packages', {}))}
{latency_table(m['latency'])}
""")
    h = results.get("honesty")
    if h:
        rows = ["| run | dense ms | pruned ms | verdict |", "|---|---|---|---|"]
        rows += [f"| quiet {i + 1} | {q['dense_ms']:.1f} | {q['pruned_ms']:.1f} | {q['verdict']} |"
                 for i, q in enumerate(h["quiet"])]
        lo = h["loaded"]
        rows.append(f"| busy loops on every core | {lo['dense_ms']:.1f} | {lo['pruned_ms']:.1f} | "
                    f"{lo['verdict']} |")
        spread = [q["pruned_ms"] for q in h["quiet"]]
        ups = [q["dense_ms"] / q["pruned_ms"] for q in h["quiet"]]
        parts.append(f"""## `report()` three times, then on a loaded machine

torchvision resnet18 at 1x3x224x224, pruned at ratio 0.3; `cleanai.utils.report(dense, pruned,
x, repeats={h['repeats']})` (the default), in one process. The quiet runs' pruned medians lie
within {100 * (max(spread) / min(spread) - 1):.1f}% of each other, their speed-ups within
{100 * (max(ups) / min(ups) - 1):.1f}%.

{chr(10).join(rows)}
""")
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["fmnist", "minilm", "honesty"], nargs="+")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite docs/deploy.md from the cached results, running nothing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = json.load(open(CACHE)) if os.path.exists(CACHE) else {}
    for name, run in (("fmnist", fmnist), ("minilm", minilm), ("honesty", honesty)):
        if args.report_only or (args.only and name not in args.only):
            continue
        results[name] = run(args.repeats)
        print(json.dumps(results[name], indent=1))
    os.makedirs(os.path.dirname(CACHE), exist_ok=True)
    json.dump(results, open(CACHE, "w"), indent=1)
    path = os.path.join(os.path.dirname(HERE), "docs", "deploy.md")
    with open(path, "w") as f:
        f.write(report(results, args.threads))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
