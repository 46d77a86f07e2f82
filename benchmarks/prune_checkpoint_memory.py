"""Pruning a checkpoint larger than the memory it is pruned in: peak RSS of prune_checkpoint.

A LLaMA-architecture Hugging Face config of about 1B parameters (hidden 2048, 20 layers,
intermediate 5632, vocab 32000, 32 heads, 8 key/value heads: ~4.1 GB in float32) gets random
weights written shard by shard (~500 MB each, as ``save_pretrained`` lays them out), without
the model ever being in memory: built on the meta device, each tensor drawn and written in
turn. A child process then runs :func:`cleanai.prune_checkpoint` on it; its peak resident
memory (``getrusage(RUSAGE_CHILDREN).ru_maxrss``, taken in a light wrapper process; the
child's own ``VmHWM`` beside it) and wall time are printed. Finally the
pruned checkpoint is loaded with ``from_pretrained(low_cpu_mem_usage=True)`` and generates a
few tokens. Everything lives in a temporary folder under /tmp, removed at the end.

The pruning keeps the config loadable by transformers (whose LLaMA config requires the hidden
size to be a multiple of the head count): hidden sizes and MLP neurons are pruned
(``kinds=("hidden", "channels")``), kept widths rounded to multiples of 128.

    python benchmarks/prune_checkpoint_memory.py [--layers 20] [--ratio 0.3] [--shard-mb 500]

``--layers`` sets the size (about 45M parameters, 180 MB, per layer plus 262M for the
embeddings and the head); the default is the ~4 GB model.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import cleanai_revision  # noqa: E402

ROOT = HERE.parent


def config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                       num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=2048, tie_word_embeddings=False)


def write_random_checkpoint(folder: Path, layers: int, shard_bytes: int) -> int:
    """Random weights for the config, written shard by shard; returns the parameter count."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    cfg = config(layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    folder.mkdir(parents=True)
    cfg.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    parts, pending, size, total, count = [], {}, 0, 0, 0

    def flush():
        nonlocal pending, size
        path = folder / f"part-{len(parts)}.safetensors"
        save_file(pending, str(path), metadata={"format": "pt"})
        parts.append((path, list(pending)))
        pending, size = {}, 0

    for name, t in model.state_dict().items():
        if name.endswith("norm.weight"):
            value = torch.ones(t.shape)
        else:
            value = torch.randn(t.shape, generator=generator) * 0.02
        nbytes = value.numel() * value.element_size()
        if pending and size + nbytes > shard_bytes:
            flush()
        pending[name] = value
        size += nbytes
        total += nbytes
        count += value.numel()
    flush()
    weight_map = {}
    for i, (path, names) in enumerate(parts, 1):
        final = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        path.rename(folder / final)
        weight_map.update((n, final) for n in names)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return count


CHILD = """
import sys, time, torch
sys.path.insert(0, {src!r})
import cleanai
from transformers import AutoConfig, LlamaForCausalLM
torch.set_num_threads({threads})
cfg = AutoConfig.from_pretrained({source!r})
start = time.perf_counter()
cleanai.prune_checkpoint(lambda: LlamaForCausalLM(cfg), {source!r}, {out!r},
                         torch.randint(0, 32000, (1, 8)), pruning_ratio={ratio},
                         kinds=("hidden", "channels"), round_to=128,
                         max_shard_size="{shard_mb}MB")
print(time.perf_counter() - start)
print([int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] / 1024)
"""

# The pruning process is started from a small wrapper that imports nothing heavy, so that its
# RUSAGE_CHILDREN holds the pruning process alone: Linux counts a child's peak from the fork
# on (a vfork'd child shares its parent's memory until exec), so a child started by this
# script, which has just written gigabytes, would report this script's peak instead.
WRAPPER = """
import resource, subprocess, sys
run = subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True, text=True)
sys.stderr.write(run.stderr)
print(run.stdout.strip())
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)  # KiB on Linux
sys.exit(run.returncode)
"""


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=20, help="decoder layers (20: ~4.1 GB)")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--shard-mb", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="cleanai-ckpt-", dir="/tmp"))
    try:
        source, out = work / "source", work / "pruned"
        t0 = time.perf_counter()
        params = write_random_checkpoint(source, args.layers, args.shard_mb * 10**6)
        shards = len(list(source.glob("*.safetensors")))
        print(f"source: {params / 1e9:.3f}B parameters, {folder_bytes(source) / 1e9:.2f} GB "
              f"in {shards} shards (written in {time.perf_counter() - t0:.0f} s)")

        code = CHILD.format(src=str(ROOT / "src"), source=str(source), out=str(out),
                            ratio=args.ratio, shard_mb=args.shard_mb, threads=args.threads)
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", WRAPPER, code], capture_output=True,
                             text=True)
        wall = time.perf_counter() - t0
        if run.returncode:
            sys.exit(f"prune_checkpoint failed:\n{run.stderr}")
        inner, hwm, peak_mb = map(float, run.stdout.strip().splitlines()[-3:])
        pruned_cfg = json.loads((out / "config.json").read_text())
        print(f"pruned:  {folder_bytes(out) / 1e9:.2f} GB in "
              f"{len(list(out.glob('*.safetensors')))} shards, hidden "
              f"{pruned_cfg['hidden_size']}, intermediate {pruned_cfg['intermediate_size']}")
        print(f"prune_checkpoint: peak RSS {peak_mb:.0f} MB (ru_maxrss; VmHWM {hwm:.0f} MB), "
              f"{inner:.1f} s ({wall:.1f} s with interpreter start and imports)")

        from transformers import AutoModelForCausalLM
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(out, low_cpu_mem_usage=True).eval()
        ids = torch.randint(0, 32000, (1, 8), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
        n = sum(p.numel() for p in model.parameters())
        print(f"from_pretrained + generate: {n / 1e9:.3f}B parameters, new tokens "
              f"{tokens[0, 8:].tolist()} ({time.perf_counter() - t0:.1f} s)")
        print(f"(torch {torch.__version__}, {platform.processor() or platform.machine()}, "
              f"{args.threads} threads, CleanAI {cleanai_revision()})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
