"""How long does building a DependencyGraph take, compared with one forward pass?

Two parts:

1. torchvision ResNet-50 and ViT-B/16 (random weights, eval mode, batch 1): graph build time
   as a multiple of one forward pass of the same model.
2. A depth sweep over synthetic stacks of N blocks (N = 8, 16, 32, 64): residual conv blocks
   and transformer-style blocks. The time per block should stay flat as N grows; a time per
   block that grows with N means something in the build is quadratic in depth.

Every number is the median of a few repeats after one warm-up run. Run:

    python benchmarks/graph_build.py [--repeats 3] [--threads 1] [--depths 8 16 32 64]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from typing import Callable, List, Tuple

import torch
from torch import nn

import cleanai


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one untimed warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_and_forward(model: nn.Module, x: torch.Tensor,
                      repeats: int) -> Tuple[float, float, "cleanai.DependencyGraph"]:
    """(graph build seconds, forward seconds, the graph) for ``model`` on ``x``."""
    model.eval()

    def build():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown-op warnings are reported once, below
            return cleanai.DependencyGraph(model, x)

    def forward():
        with torch.no_grad():
            return model(x)

    build_s = median_seconds(build, repeats)
    forward_s = median_seconds(forward, max(repeats, 5))
    return build_s, forward_s, build()


def unknown_op_warnings(model: nn.Module, x: torch.Tensor) -> List[str]:
    """The warnings one graph build raises (ops or layers CleanAI protects)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cleanai.DependencyGraph(model, x)
    return [str(w.message) for w in caught]


# --- synthetic stacks ----------------------------------------------------------------------

class ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn, plus the input, then relu (a ResNet basic block)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class ConvStack(nn.Module):
    """Stem conv, N residual blocks, global pool and a linear head."""

    def __init__(self, n: int, c: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*(ResidualBlock(c) for _ in range(n)))
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


class TransformerBlock(nn.Module):
    """Pre-norm block from plain layers: attention by matmul + softmax over a view into heads,
    then an MLP, each with a residual add."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))  # [b, h, t, d/h]
        att = torch.softmax(q @ k.transpose(-2, -1) / (d // h) ** 0.5, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TransformerStack(nn.Module):
    """Token embedding, N transformer blocks, a final norm and a linear head on the mean token."""

    def __init__(self, n: int, d_in: int = 32, d: int = 64, heads: int = 4,
                 classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.Sequential(*(TransformerBlock(d, heads) for _ in range(n)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x))).mean(dim=1))


# --- report --------------------------------------------------------------------------------

def _load() -> str:
    try:
        return "%.1f" % os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per number (median)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: stable timings on a busy machine)")
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32, 64])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f"cleanai {cleanai.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"median of {args.repeats} after a warm-up, load average {_load()}")

    try:
        import torchvision
    except ImportError:
        print("\ntorchvision is not installed: skipping ResNet-50 and ViT-B/16")
    else:
        print("\nTorchvision models (batch 1, 3x224x224, eval, random weights)")
        print(f"{'model':<10} {'layers':>6} {'groups':>6} {'build s':>8} {'forward s':>9} "
              f"{'build/fwd':>9}")
        x = torch.randn(1, 3, 224, 224)
        for name in ("resnet50", "vit_b_16"):
            model = getattr(torchvision.models, name)(weights=None).eval()
            build_s, forward_s, graph = build_and_forward(model, x, args.repeats)
            print(f"{name:<10} {len(graph.modules):>6} {len(graph.groups):>6} {build_s:>8.3f} "
                  f"{forward_s:>9.4f} {build_s / forward_s:>9.1f}")
            for msg in unknown_op_warnings(model, x):
                print(f"  note: {msg[:160]}{'...' if len(msg) > 160 else ''}")

    sweeps = [
        ("Residual conv blocks (16 channels, 1x3x32x32)", ConvStack,
         lambda: torch.randn(1, 3, 32, 32)),
        ("Transformer blocks (d=64, 4 heads, 1x16 tokens)", TransformerStack,
         lambda: torch.randn(1, 16, 32)),
    ]
    for title, make, make_input in sweeps:
        print(f"\n{title}")
        print(f"{'N':>4} {'groups':>6} {'build s':>8} {'ms/block':>9} {'forward ms':>10} "
              f"{'build/fwd':>9}")
        for n in args.depths:
            model = make(n).eval()
            build_s, forward_s, graph = build_and_forward(model, make_input(), args.repeats)
            print(f"{n:>4} {len(graph.groups):>6} {build_s:>8.3f} {1e3 * build_s / n:>9.2f} "
                  f"{1e3 * forward_s:>10.2f} {build_s / forward_s:>9.1f}")


if __name__ == "__main__":
    main()
