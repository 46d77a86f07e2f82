"""Why pruning 35% of ResNet-18's channels may not make it 35% faster: a measurement.

Latency of ResNet-18 pruned at ratio 0.35 relative to the dense model, with ``round_to`` None
and 8, at batch 1 and 32, on this CPU with one thread. The dense baseline is measured in the
same run, interleaved with the pruned models so that load on the machine affects all alike.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/speedup_faq.py            # 224 x 224
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/speedup_faq.py --quick    # smoke run
"""
import argparse
import copy
import platform
import statistics

import torch
import torchvision

import cleanai
from cleanai.utils import count_macs, count_params, measure_latency

from _common import cleanai_revision


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 x 64 inputs, few repeats")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds; the median of the rounds is reported")
    args = parser.parse_args()
    size = 64 if args.quick else args.size
    rounds = 2 if args.quick else args.rounds
    torch.set_num_threads(1)
    torch.manual_seed(0)

    dense = torchvision.models.resnet18(weights=None).eval()
    models = {"dense": dense}
    for round_to in (None, 8):
        m = copy.deepcopy(dense)
        cleanai.StructuredPruner(m, torch.randn(1, 3, size, size), pruning_ratio=0.35,
                                 round_to=round_to).prune()
        models[f"round_to={round_to}"] = m

    print(f"ResNet-18, {size}x{size}, ratio 0.35, torch {torch.__version__}, 1 thread, "
          f"{cpu_name()}, CleanAI {cleanai_revision()}")
    header = "| model | params | MACs (batch 1) | batch | latency ms | latency / dense | MACs / dense |"
    print(header)
    print("|---|---|---|---|---|---|---|")
    macs = {name: count_macs(m, torch.randn(1, 3, size, size)) for name, m in models.items()}
    for batch in (1, 32):
        x = torch.randn(batch, 3, size, size)
        times = {name: [] for name in models}
        repeats = (3 if batch > 1 else 10) if not args.quick else 2
        for _ in range(rounds):
            for name, m in models.items():
                times[name].append(measure_latency(m, x, warmup=1, repeats=repeats))
        base = statistics.median(times["dense"])
        for name, m in models.items():
            t = statistics.median(times[name])
            print(f"| {name} | {count_params(m):,} | {macs[name]:,} | {batch} | {t * 1e3:.1f} | "
                  f"{t / base:.2f} | {macs[name] / macs['dense']:.2f} |")
    print("\nkept widths (conv1, layer1..4 first conv):",
          {name: [m.conv1.out_channels] + [getattr(m, f"layer{i}")[0].conv1.out_channels
                                           for i in range(1, 5)]
           for name, m in models.items()})


if __name__ == "__main__":
    main()
