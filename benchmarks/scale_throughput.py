"""What CleanAI costs, counted in the model's own forward passes, on a CPU or a GPU.

    python benchmarks/scale_throughput.py                   # CPU: resnet18, mobilenet_v3_small, MiniLM
    python benchmarks/scale_throughput.py --device cuda     # GPU: resnet50, vit_b_16, a 1B LLaMA
    python benchmarks/scale_throughput.py --device cpu --models resnet50,llama-1b --batches 4

For each model, on the chosen device:

- ``forward``: the median time of one plain forward (``eval``, ``no_grad``) of a batch;
- ``analyse``: building the dependency graph, in forwards;
- ``prune``: one step at ratio 0.3 (weight importance: plan, slice, attributes), in forwards;
- ``calibration``: the throughput of the hybrid score's calibration (``WeightActivationImportance``
  with its defaults: per-channel activation statistics from hooks on every consumer) against
  plain forwards over the same batches: 1.0 means free. CleanAI's target on a CPU is at least
  0.8.

Timings alternate plain and calibrated passes, ``--repeats`` times, and report medians, so a
busy machine slows both alike. The LLaMA model has random weights (no download); on a CPU it
takes a few GB of memory and minutes.
"""
import argparse
import copy
import statistics
import time
import warnings

import torch

import cleanai
from cleanai.importance import WeightActivationImportance

from _common import cleanai_revision


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(name: str, device: str, batch: int):
    """``(model, batches, example)`` on ``device``: ``batches`` is one list of inputs."""
    if name == "minilm":
        from minilm_fidelity import minilm_data
        _, dense, calib, _, _ = minilm_data(calib_sentences=8 * batch)
        model = dense.to(device)
        batches = [{k: v.to(device) for k, v in b.items()} for b in calib][:8]
        return model, batches, batches[0]
    if name.startswith("llama"):
        from transformers import LlamaConfig, LlamaForCausalLM
        size = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=32000) \
            if name == "llama-1b" else \
            dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, vocab_size=4000)
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**size, use_cache=False))
        ids = [torch.randint(0, size["vocab_size"], (batch, 256), device=device)
               for _ in range(4)]
        return model, ids, ids[0]
    import torchvision
    model = getattr(torchvision.models, name)(weights=None).to(device)
    xs = [torch.randn(batch, 3, 224, 224, device=device) for _ in range(4)]
    return model, xs, xs[0][:1]


def median_time(fn, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, device: str, batch: int, repeats: int) -> dict:
    model, batches, example = build(name, device, batch)
    model.eval()

    def plain():
        with torch.no_grad():
            for b in batches:
                model(**b) if isinstance(b, dict) else model(b)

    plain()  # warm up (and the allocator on a GPU)
    forward = median_time(plain, device, repeats) / len(batches)
    start = time.perf_counter()
    graph = cleanai.DependencyGraph(model, example)
    sync(device)
    analyse = time.perf_counter() - start
    hybrid = WeightActivationImportance()

    def calibrate():
        hybrid.calibrate(model, graph, batches)

    calibrate()  # warm up the hooks
    plain_runs, calib_runs = [], []
    for _ in range(repeats):  # alternated: a busy machine slows both alike
        plain_runs.append(median_time(plain, device, 1))
        calib_runs.append(median_time(calibrate, device, 1))
    copy_ = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        pruner = cleanai.StructuredPruner(copy_, example, pruning_ratio=0.3)
        sync(device)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        pruner.step()
        sync(device)
        step_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    return {"model": name, "params": params, "forward": forward, "analyse": analyse / forward,
            "prune": (build_s + step_s) / forward, "step": step_s / forward,
            "calibration": statistics.median(plain_runs) / statistics.median(calib_runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default=None,
                        help="comma-separated: torchvision names, minilm, llama-1b, llama-small")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    models = (args.models or ("resnet50,vit_b_16,llama-1b" if gpu else
                              "resnet18,mobilenet_v3_small,minilm")).split(",")
    batch = args.batch or (32 if gpu else 8)
    where = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"# CleanAI {cleanai_revision()}, torch {torch.__version__}, {where}, batch {batch}")
    print(f"{'model':20} {'params':>8} {'forward ms':>10} {'analyse':>9} {'prune':>9} "
          f"{'calibration':>12}")
    for name in models:
        r = measure(name, args.device, batch, args.repeats)
        print(f"{r['model']:20} {r['params'] / 1e6:7.1f}M {r['forward'] * 1e3:10.1f} "
              f"{r['analyse']:8.1f}x {r['prune']:8.1f}x {r['calibration']:11.2f}x")
    print("analyse, prune: in plain forwards of one batch; calibration: throughput against "
          "plain forwards (1.0 = free)")


if __name__ == "__main__":
    main()
