"""Compare CleanAI with Torch-Pruning on torchvision models, in one process, on the CPU.

Both tools get a deepcopy of the same randomly initialised model (eval mode, batch 1 at
224x224) and prune it with L2 weight-magnitude importance at ratio 0.5, classifier kept.
Measured per model and tool: time to analyse (construct the pruner, which builds the
dependency graph), time to prune (``pruner.step()``), their total as a multiple of one dense
forward pass, parameters and MACs after pruning, CPU latency of the pruned model, and whether
the output is still ``(1, 1000)``. A tool that fails on a model gets its error in the table.

    PYTHONPATH=src python benchmarks/compare_torch_pruning.py --out docs/benchmarks.md
    PYTHONPATH=src python benchmarks/compare_torch_pruning.py --quick

Torch-Pruning is needed only here (``pip install torch-pruning``); CleanAI never imports it.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torchvision
from torch import nn

import cleanai
from _common import cleanai_revision

from cleanai.utils import count_macs, count_params

DEFAULT_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "densenet121", "vit_b_16"]
RATIO = 0.5
INPUT_SHAPE = (1, 3, 224, 224)


def markers(tag: str) -> Tuple[str, str]:
    """The comments that fence one generated section of the report."""
    return f"<!-- results {tag}: begin -->", f"<!-- results {tag}: end -->"


@dataclasses.dataclass
class Run:
    """What one tool did to one model; ``error`` is set when it failed (timings may be partial)."""

    model: str
    tool: str
    analyse_s: Optional[float] = None
    prune_s: Optional[float] = None
    cpu_s: Optional[float] = None  # process CPU time of analyse + prune, all threads
    params: Optional[int] = None
    macs: Optional[int] = None
    latency_s: Optional[float] = None
    #: dense only: median of the forwards timed alongside the pruning runs (the ratio's unit)
    fwd_s: Optional[float] = None
    output_shape: Optional[Tuple[int, ...]] = None
    same_weights: Optional[str] = None  # how the pruned weights compare with the other tool's
    error: Optional[str] = None
    warnings: List[str] = dataclasses.field(default_factory=list)

    @property
    def total_s(self) -> Optional[float]:
        if self.analyse_s is None or self.prune_s is None:
            return None
        return self.analyse_s + self.prune_s


# --- the two tools: analyse(model, x) -> pruner, prune(pruner, model) ----------------------

def classifier_of(model: nn.Module) -> nn.Module:
    """The final 1000-way Linear layer of a torchvision classifier."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 1000]
    if not heads:
        raise ValueError(f"{type(model).__name__} has no Linear layer with 1000 outputs")
    return heads[-1]


def cleanai_analyse(model: nn.Module, x: torch.Tensor) -> Any:
    # The output layer is protected by CleanAI itself; nothing to ignore by hand.
    return cleanai.StructuredPruner(model, x, importance=cleanai.importance.WeightImportance(p=2),
                                    pruning_ratio=RATIO)


def cleanai_prune(pruner: Any, model: nn.Module) -> None:
    pruner.step()


def import_torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError as exc:
        raise SystemExit("this benchmark needs Torch-Pruning: pip install torch-pruning "
                         "(keep torch/torchvision pinned, e.g. -c constraints-ci.txt)") from exc
    return torch_pruning


def tp_analyse(model: nn.Module, x: torch.Tensor) -> Any:
    """Torch-Pruning as its torchvision example (examples/torchvision_models) does it: the
    classifier ignored and, for ViT, kept widths rounded to a multiple of the head count so
    that nn.MultiheadAttention is pruned along with the residual stream. (Passing
    ``num_heads={mha: mha.num_heads}`` as well makes Torch-Pruning 1.6 leave the residual
    stream and attention whole: only the MLPs shrink, to the same 58.2 M parameters as CleanAI.)
    """
    tp = import_torch_pruning()
    extra: Dict[str, Any] = {}
    if isinstance(model, torchvision.models.VisionTransformer):
        extra["round_to"] = model.encoder.layers[0].num_heads
    return tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                     pruning_ratio=RATIO, ignored_layers=[classifier_of(model)],
                                     **extra)


def tp_prune(pruner: Any, model: nn.Module) -> None:
    pruner.step()
    if isinstance(model, torchvision.models.VisionTransformer):
        # torchvision's ViT reshapes with self.hidden_dim; Torch-Pruning's example resets it.
        model.hidden_dim = model.conv_proj.out_channels


TOOLS: Dict[str, Tuple[Callable, Callable]] = {
    "CleanAI": (cleanai_analyse, cleanai_prune),
    "Torch-Pruning": (tp_analyse, tp_prune),
}


# --- measurement ---------------------------------------------------------------------------

@torch.no_grad()
def latencies(models: Dict[str, nn.Module], x: torch.Tensor, runs: int,
              warmup: int = 3) -> Dict[str, float]:
    """Median wall time of one forward pass of each model, in seconds.

    The models take turns (in a rotating order), so that a change in machine load during the
    measurement hits all of them alike instead of whichever happened to be timed then.
    """
    names = list(models)
    for _ in range(warmup):
        for n in names:
            models[n](x)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for i in range(runs):
        for n in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            models[n](x)
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


@torch.no_grad()
def dense_forwards(model: nn.Module, x: torch.Tensor, n: int = 3) -> List[float]:
    """Wall times of ``n`` forwards of ``model`` after one warm-up: taken right before each
    round of pruning runs, so the dense forward they are divided by meets the same load."""
    model(x)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return times


def error_text(exc: BaseException, stage: str) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    text = f"failed in {stage}: {type(exc).__name__}: {first}"
    return text if len(text) <= 200 else text[:197] + "..."


def prune_once(base: nn.Module, x: torch.Tensor, model_name: str,
               tool: str) -> Tuple[Run, nn.Module]:
    """Prune a fresh copy of ``base`` with ``tool``, timing the two phases."""
    analyse, prune = TOOLS[tool]
    model = copy.deepcopy(base)
    run = Run(model_name, tool)
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stage = "analyse"
        try:
            c0, t0 = time.process_time(), time.perf_counter()
            pruner = analyse(model, x)
            run.analyse_s = time.perf_counter() - t0
            stage = "prune"
            t0 = time.perf_counter()
            prune(pruner, model)
            run.prune_s = time.perf_counter() - t0
            run.cpu_s = time.process_time() - c0
        except Exception as exc:  # a tool's failure is a result, not a crash
            run.error = error_text(exc, stage)
    run.warnings = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    return run, model


def benchmark_model(name: str, repeats: int, latency_runs: int,
                    log: Callable[[str], None]) -> List[Run]:
    """Dense baseline plus every tool on ``name``. Pruning timings are medians over ``repeats``,
    with the tools' order alternating between repeats; latencies are measured interleaved."""
    torch.manual_seed(0)
    base = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(INPUT_SHAPE)
    dense = Run(name, "dense", params=count_params(base), macs=count_macs(base, x))
    with torch.no_grad():
        dense.output_shape = tuple(base(x).shape)
    attempts: Dict[str, List[Run]] = {tool: [] for tool in TOOLS}
    pruned: Dict[str, nn.Module] = {}
    forwards: List[float] = []
    for i in range(repeats):
        forwards += dense_forwards(base, x)  # the ratio's unit, in the machine's state of now
        order = list(TOOLS) if i % 2 == 0 else list(reversed(TOOLS))
        for tool in order:
            if attempts[tool] and attempts[tool][-1].error:
                continue  # a failure is deterministic; do not repeat it
            run, pruned[tool] = prune_once(base, x, name, tool)
            attempts[tool].append(run)
            log(f"{name}: {tool} repeat {i + 1}/{repeats}: "
                + (run.error or f"analyse {run.analyse_s:.2f} s, prune {run.prune_s:.2f} s"))
    dense.fwd_s = statistics.median(forwards)
    runs = {"dense": dense}
    for tool, tries in attempts.items():
        run = runs[tool] = tries[-1]
        if run.error:
            pruned.pop(tool)
            continue
        run.analyse_s = statistics.median(r.analyse_s for r in tries)
        run.prune_s = statistics.median(r.prune_s for r in tries)
        run.cpu_s = statistics.median(r.cpu_s for r in tries)
        model = pruned[tool].eval()
        try:
            with torch.no_grad():
                run.output_shape = tuple(model(x).shape)
            run.params = count_params(model)
            run.macs = count_macs(model, x)
        except Exception as exc:
            run.error = error_text(exc, "pruned-model forward")
            pruned.pop(tool)
    if len(pruned) == 2:
        runs["CleanAI"].same_weights = compare_weights(*pruned.values())
    for tool, seconds in latencies({"dense": base, **pruned}, x, latency_runs).items():
        runs[tool].latency_s = seconds
    log(f"{name}: latency (ms) " + ", ".join(f"{t} {r.latency_s * 1e3:.1f}"
                                            for t, r in runs.items() if r.latency_s))
    return list(runs.values())


# --- report --------------------------------------------------------------------------------

def compare_weights(a: nn.Module, b: nn.Module) -> str:
    """Whether two pruned copies of one model kept the same channels: their state dicts match
    tensor for tensor when they did. (Outputs are no test: torchvision's ViT starts with a zero
    classifier, so any two pruned ViTs give the same all-zero logits.)"""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        return "different shapes"
    same = sum(torch.equal(sa[k], sb[k]) for k in sa)
    return f"{same} of {len(sa)} tensors identical"


def count_text(n: Optional[int], ref: Optional[int]) -> str:
    """``n`` in M or G, with its share of ``ref`` when that is given and differs."""
    if n is None:
        return "—"
    text = f"{n / 1e9:.2f} G" if n >= 1e9 else f"{n / 1e6:.1f} M"
    return text if not ref or n == ref else f"{text} ({100 * n / ref:.0f}%)"


def table(runs: List[Run]) -> str:
    head = ("| model | tool | analyse (s) | prune (s) | total (s) | total CPU (s) "
            "| total / dense fwd | params | MACs | CPU latency (ms) | output (1, 1000) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    dense = {r.model: r for r in runs if r.tool == "dense"}
    sec = lambda v: "—" if v is None else f"{v:.2f}"
    for r in runs:
        d = dense[r.model]
        pruned = r is not d
        unit = d.fwd_s or d.latency_s
        mult = "—" if r.total_s is None or not unit else f"{r.total_s / unit:.3g}×"
        lat = "—" if r.latency_s is None else f"{r.latency_s * 1e3:.1f}"
        if pruned and r.latency_s is not None:
            lat += f" ({d.latency_s / r.latency_s:.2f}× faster)"
        if r.error:
            status = r.error.replace("|", "\\|")
        else:
            status = "yes" if r.output_shape == (1, 1000) else f"no: {r.output_shape}"
        lines.append(f"| {r.model} | {r.tool} | {sec(r.analyse_s)} | {sec(r.prune_s)} "
                     f"| {sec(r.total_s)} | {sec(r.cpu_s)} | {mult} "
                     f"| {count_text(r.params, d.params if pruned else None)} "
                     f"| {count_text(r.macs, d.macs if pruned else None)} | {lat} | {status} |")
    return "\n".join(lines)


def headline(runs: List[Run]) -> str:
    """CleanAI's analyse+prune time against Torch-Pruning's and against one dense forward."""
    by = {(r.model, r.tool): r for r in runs}
    models = list(dict.fromkeys(r.model for r in runs))
    lines: List[str] = []
    ratios: List[float] = []
    cpu_ratios: List[float] = []
    for m in models:
        c, t, d = by.get((m, "CleanAI")), by.get((m, "Torch-Pruning")), by[(m, "dense")]
        if c is None or c.total_s is None or c.error:
            lines.append(f"- {m}: CleanAI failed ({c.error if c else 'not run'})")
            continue
        unit = d.fwd_s or d.latency_s
        text = (f"- {m}: CleanAI {c.total_s:.3f} s = {c.total_s / unit:.3g} dense forwards "
                f"(of {unit * 1e3:.1f} ms)")
        if t is not None and t.total_s is not None and not t.error:
            ratios.append(c.total_s / t.total_s)
            cpu_ratios.append(c.cpu_s / t.cpu_s)
            text += (f"; Torch-Pruning {t.total_s:.2f} s; CleanAI / Torch-Pruning = "
                     f"{ratios[-1]:.2f} (CPU time: {cpu_ratios[-1]:.2f})")
            if c.same_weights:
                text += f"; pruned weights vs Torch-Pruning's: {c.same_weights}"
        lines.append(text)
    if ratios:
        lines.append(f"- geometric mean of CleanAI / Torch-Pruning over {len(ratios)} models: "
                     f"{gmean(ratios):.2f} in wall time, {gmean(cpu_ratios):.2f} in CPU time")
    return "\n".join(lines)


def gmean(values: List[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def warning_notes(runs: List[Run]) -> str:
    lines = []
    for r in runs:
        for w in r.warnings:
            w = " ".join(w.split())
            lines.append(f"- {r.model}, {r.tool}: {w[:300] + '...' if len(w) > 300 else w}")
    return "\n".join(lines) or "- none"


def machine_facts() -> List[str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"model name\s*:\s*(.+)", f.read())
            cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        nproc = str(os.cpu_count())
    try:
        from importlib.metadata import version
        tp_version = version("torch-pruning")
    except Exception:
        tp_version = "not installed"
    return [f"CPU: {cpu}; `nproc` = {nproc}; torch threads = {torch.get_num_threads()}",
            f"CleanAI source: {cleanai_revision()}",
            f"Python {platform.python_version()} on {platform.system()} {platform.release()}",
            f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"CleanAI {cleanai.__version__}, Torch-Pruning {tp_version}"]


def command_line() -> str:
    env = f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else ""
    return env + "python " + " ".join(shlex.quote(a) for a in sys.argv)


def load_average() -> str:
    try:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def results_section(runs: List[Run], repeats: int, latency_runs: int, elapsed_s: float,
                    load: Tuple[str, str], tag: str) -> str:
    begin, end = markers(tag)
    facts = "\n".join(f"- {f}" for f in machine_facts())
    return f"""{begin}
_Generated by `benchmarks/compare_torch_pruning.py` on {datetime.date.today().isoformat()} \
({elapsed_s / 60:.1f} min)._

- Command: `{command_line()}`
{facts}
- Load average (1/5/15 min) at start {load[0]}, at end {load[1]}: other processes share \
these cores, so timings carry that noise.
- Setup: torchvision model with random weights (seed 0), eval mode, input {INPUT_SHAPE}; \
L2 weight-magnitude importance, pruning ratio {RATIO}, one step, classifier kept. Each tool \
prunes a deepcopy of the same model.
- analyse = constructing the pruner (dependency graph); prune = `pruner.step()`; both are \
wall time, the median of {repeats} run(s), the tools taking turns to go first; "total CPU" is \
the process CPU time of analyse + prune (less sensitive to other load, though it counts \
OpenMP threads spinning). Latency is the median of {latency_runs} forwards after 3 \
warm-up forwards, under `torch.no_grad()`. "total / dense fwd" divides by one dense forward: \
the median of the forwards timed alongside the pruning runs (3 before each round, after a \
warm-up one), so that both meet the same machine load; the latency column is measured later.

{table(runs)}

Headline:

{headline(runs)}

Warnings raised by the tools:

{warning_notes(runs)}
{end}"""


def write_report(path: str, section: str, tag: str) -> None:
    """Replace the ``tag`` section of ``path`` (or append it), keeping all other text."""
    begin, end = markers(tag)
    try:
        with open(path) as f:
            old = f.read()
    except FileNotFoundError:
        old = ""
    if begin in old and end in old:
        text = old[:old.index(begin)] + section + old[old.index(end) + len(end):]
    else:
        text = (old.rstrip() + "\n\n" if old else "# Benchmarks: CleanAI vs Torch-Pruning\n\n")
        text += section + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=None, metavar="NAME",
                        help=f"torchvision model names (default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: resnet18 only, one repeat, 3 latency runs")
    parser.add_argument("--repeats", type=int, default=None,
                        help="pruning runs per tool and model; timings are medians (default 3)")
    parser.add_argument("--latency-runs", type=int, default=None,
                        help="timed forwards per latency (default 10)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the whole run (default: leave as is)")
    parser.add_argument("--out", default=None,
                        help="markdown file to write the results into (e.g. docs/benchmarks.md); "
                             "only the section of this thread setting is replaced")
    args = parser.parse_args(argv)
    models = args.models or (["resnet18"] if args.quick else DEFAULT_MODELS)
    repeats = args.repeats or (1 if args.quick else 3)
    latency_runs = args.latency_runs or (3 if args.quick else 10)
    unknown = [m for m in models if not callable(getattr(torchvision.models, m, None))]
    if unknown:
        parser.error(f"not torchvision models: {', '.join(unknown)}")
    import_torch_pruning()
    if args.threads:
        torch.set_num_threads(args.threads)
    tag = f"threads={args.threads}" if args.threads else "threads=default"

    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    start, load = time.perf_counter(), load_average()
    runs: List[Run] = []
    for name in models:
        runs += benchmark_model(name, repeats, latency_runs, log)
    section = results_section(runs, repeats, latency_runs, time.perf_counter() - start,
                              (load, load_average()), tag)
    print(section)
    if args.out:
        write_report(args.out, section, tag)
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
