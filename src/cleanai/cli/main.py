"""The ``cleanai`` command: prune, inspect and report on a model from the shell."""
from __future__ import annotations

import argparse
import copy
import difflib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, List, Optional, Sequence

from . import deploy
from .data import DATA_HELP, calibration_batches
from .models import MODEL_HELP, CLIError, build_model, parse_shape

IMPORTANCES = ("weight", "hybrid", "activation", "taylor", "random")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump): ``cleanai prune: error: ...``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{message} (see {self.prog} --help)")


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction of the dense model in (0, 1), "
                                         f"got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _recovery(text: str) -> tuple:
    """``reconstruct``, ``reconstruct:block`` or ``distill[:STEPS]`` as ``(method, arg)``."""
    method, _, arg = text.partition(":")
    if method == "reconstruct" and arg in ("", "layer", "block"):
        return method, arg or "layer"
    if method == "distill":
        return method, _positive(arg) if arg else 100
    raise argparse.ArgumentTypeError(f"must be reconstruct, reconstruct:block or "
                                     f"distill[:STEPS], got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cleanai`` command and its subcommands."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="cleanai", formatter_class=fmt,
                     description="Structured pruning for PyTorch: remove whole channels, "
                                 "physically.", epilog=MODEL_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("prune", help="prune a model and save it with a before/after report",
                       formatter_class=fmt, epilog=MODEL_HELP + "\n\n" + DATA_HELP,
                       description="Prune MODEL, print the before/after table and write DIR "
                                   "(cleanai.json + weights.pt, report.json, report.md, kept.png).")
    p.add_argument("model", metavar="MODEL", help="the model to prune (see below)")
    p.add_argument("--ratio", type=_ratio, default=None,
                   help="fraction of each group's channels to remove, in [0, 1) (or give a "
                        "budget: --target-macs / --target-params / --target-latency)")
    p.add_argument("--target-macs", type=_fraction, default=None, metavar="F",
                   help="prune to this fraction of the dense MACs, ranking channels by score "
                        "per MAC across the model")
    p.add_argument("--target-params", type=_fraction, default=None, metavar="F",
                   help="prune to this fraction of the dense parameters")
    p.add_argument("--target-latency", type=_fraction, default=None, metavar="F",
                   help="prune to this fraction of the dense latency, timed on this machine")
    p.add_argument("--search", action="store_true",
                   help="with a target: search per-layer ratios on the calibration data "
                        "(cleanai.budget.search_ratios) instead of one global ranking")
    p.add_argument("--evaluations", type=_positive, default=24, metavar="N",
                   help="--search: candidate ratio sets scored (default 24)")
    p.add_argument("--importance", choices=IMPORTANCES, default="weight",
                   help="how channels are scored (default: weight, data-free; hybrid mixes "
                        "weights and activations)")
    p.add_argument("--alpha", type=float, default=0.5, metavar="A", help="hybrid: weight of the weight term")
    p.add_argument("--beta", type=float, default=0.5, metavar="B", help="hybrid: weight of the activation term")
    p.add_argument("--calib-data", metavar="SRC", default=None,
                   help="calibration data for hybrid/activation/taylor (default: random); see below")
    p.add_argument("--calib-batches", type=_positive, default=8, metavar="N", help="batches to calibrate on")
    p.add_argument("--batch-size", type=_positive, default=16, metavar="N", help="calibration batch size")
    p.add_argument("--ignore", metavar="LAYER", action="append", default=[],
                   help="keep this layer's output channels (repeatable)")
    p.add_argument("--round-to", type=_positive, default=None, metavar="N",
                   help="kept channel counts become multiples of this")
    p.add_argument("--global", dest="global_pruning", action="store_true",
                   help="rank channels across all groups instead of within each")
    p.add_argument("--allocation", choices=("sensitivity",), default=None,
                   help="sensitivity: how many channels each layer loses comes from one "
                        "ranking of the output's sensitivity on the calibration data "
                        "(OutputSensitivity), --importance picks which")
    p.add_argument("--steps", type=_positive, default=1, metavar="N", help="reach the ratio in this many steps")
    p.add_argument("--input-shape", type=parse_shape, default=None, metavar="N,C,H,W",
                   help="example input shape: N,C,H,W for images (default 1,3,224,224), "
                        "N,C,T,H,W for video (1,3,16,112,112), N,T tokens for hf: (1,16)")
    p.add_argument("--compensate", choices=("bias", "lstsq"), default=None,
                   help="refit the layers that read removed channels from calibration "
                        "statistics (bias: their mean; lstsq: least squares)")
    p.add_argument("--recover", type=_recovery, default=None, metavar="METHOD",
                   help="after pruning, recover against the dense model on the calibration "
                        "data: reconstruct, reconstruct:block, or distill[:STEPS] "
                        "(default 100 steps)")
    p.add_argument("--no-latency", action="store_true",
                   help="skip the latency measurement (it keeps a copy of the dense model, to "
                        "time it in turns with the pruned one)")
    deploy.add_arguments(p)
    p.add_argument("--latency-repeats", type=_positive, default=30, metavar="N",
                   help="timed forward passes of each model for the latency rows (default 30); "
                        "the report gives their median and spread, or 'too noisy'")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="directory to write: a new or empty one (see --force)")
    p.add_argument("--force", action="store_true",
                   help="write into --out even if it is not empty or holds a pruned model "
                        "(its cleanai.json, weights.pt and reports are replaced)")

    i = sub.add_parser("inspect", help="show the channel groups and what pruning each touches",
                       formatter_class=fmt, epilog=MODEL_HELP,
                       description="Trace MODEL once and list its channel groups: the layers "
                                   "and parameters each group's channels live in, and what "
                                   "keeps channels from being pruned.")
    i.add_argument("model", metavar="MODEL", help="the model to inspect (see below)")
    i.add_argument("--input-shape", type=parse_shape, default=None, metavar="N,C,H,W")
    i.add_argument("--dot", metavar="FILE", default=None,
                   help="also write the layer graph as Graphviz DOT (.svg/.png render with dot)")

    r = sub.add_parser("report", help="print the before/after table of a pruned model directory",
                       description="Print the before/after table written by `cleanai prune`.")
    r.add_argument("dir", metavar="DIR")
    r.add_argument("--markdown", action="store_true", help="print Markdown instead of text")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    User errors (unknown model, bad ratio, unknown layer, damaged files) print one line on
    stderr and return a non-zero status, without a traceback."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _check_options(parser, argv)
        args = parser.parse_args(argv)
    except CLIError as exc:
        return _fail(exc, 2)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            return {"prune": _prune, "inspect": _inspect, "report": _report}[args.command](args)
        except CLIError as exc:
            return _fail(exc, 2)
        except BrokenPipeError:  # output piped into `head`: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        except Exception as exc:  # library errors name what was wrong; no traceback for users
            return _fail(exc, 1)


def _check_options(parser: argparse.ArgumentParser, argv: List[str]) -> None:
    """Name the first unknown ``--option`` and the closest known one, before argparse reports
    something less to the point about the same line (``--ration 0.35`` would otherwise read as
    a missing ``--ratio``). Abbreviations argparse accepts are left to it."""
    commands = next((a.choices for a in parser._actions
                     if isinstance(a, argparse._SubParsersAction)), {})
    command = next((a for a in argv if not a.startswith("-")), None)
    target = commands.get(command, parser)
    known = list(target._option_string_actions)
    for arg in argv:
        if arg == "--":
            return
        flag = arg.split("=", 1)[0]
        if not flag.startswith("--") or any(k.startswith(flag) for k in known):
            continue
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.7)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise CLIError(f"unknown option {flag}{hint} (see {target.prog} --help)")


def _check_out(out: Path, force: bool) -> None:
    """Refuse an ``--out`` that cannot or should not be written, before any pruning work."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; give a directory (new or empty)")
    if out.is_dir() and any(out.iterdir()) and not force:
        what = "holds a pruned model" if (out / "cleanai.json").exists() else "is not empty"
        raise CLIError(f"--out {out} {what}; give --force to overwrite, or a new directory")
    parent = next(p for p in [out, *out.parents] if p.exists())
    if not parent.is_dir():
        raise CLIError(f"--out {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"--out {out}: {parent} is not writable")


def _fail(exc: BaseException, code: int) -> int:
    text = " ".join(str(exc).split()) or type(exc).__name__
    print(f"cleanai: error: {text}", file=sys.stderr)
    return code


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"cleanai: warning: {' '.join(str(message).split())}", file=sys.stderr)


def _importance(args: argparse.Namespace) -> Any:
    from .. import importance as imp

    if args.importance == "hybrid":
        return imp.WeightActivationImportance(weight_ratio=args.alpha, activation_ratio=args.beta)
    return {"weight": imp.WeightImportance, "activation": imp.ActivationImportance,
            "taylor": imp.TaylorImportance, "random": imp.RandomImportance}[args.importance]()


def _prune(args: argparse.Namespace) -> int:
    from ..pruner import StructuredPruner
    from ..utils import report, save_pruned, snapshot

    targets = {k: getattr(args, k) for k in ("target_macs", "target_params", "target_latency")
               if getattr(args, k) is not None}
    if (args.ratio is None) == (not targets):
        raise CLIError("give --ratio or a budget (--target-macs, --target-params, "
                       "--target-latency), not both" if targets else
                       "give --ratio or a budget (--target-macs, --target-params, "
                       "--target-latency)")
    if args.search and not targets:
        raise CLIError("--search needs a budget: --target-macs, --target-params or "
                       "--target-latency")
    if args.search and args.allocation:
        raise CLIError("--allocation and --search both choose per-layer counts: give one")
    out = Path(args.out)
    _check_out(out, args.force)
    built = build_model(args.model)
    inputs = built.example_inputs(args.input_shape)
    importance = _importance(args)
    options = dict(importance=importance, ignored_layers=args.ignore,
                   iterative_steps=args.steps, round_to=args.round_to,
                   compensate=args.compensate)
    # with latency, the dense model (`dense` below) is timed in turns with the pruned one
    before = snapshot(built.model, inputs, latency=False) if args.no_latency else None
    if args.allocation:
        from ..importance import OutputSensitivity
        options["allocation"] = OutputSensitivity()
    needs_data = getattr(importance, "requires_data", False) or args.allocation or \
        args.compensate or args.recover or args.search or deploy.needs_data(args, inputs)
    batches = None
    if needs_data:
        source = args.calib_data or "random"
        if args.calib_data is None:
            print("cleanai: note: calibrating on random inputs; give --calib-data for "
                  "meaningful activation scores, search and recovery", file=sys.stderr)
        batches = calibration_batches(source, inputs, args.calib_batches, args.batch_size)
    teacher = copy.deepcopy(built.model) if args.recover is not None else None
    dense = None
    if not args.no_latency:
        dense = teacher if teacher is not None else copy.deepcopy(built.model)
    if args.search:
        from ..budget import search_ratios

        found = search_ratios(built.model, inputs, batches, evaluations=args.evaluations,
                              progress=False, **targets, **options)
        print(found.summary())
        found.pruner.apply(found.plan)
        budget = found.plan.budget
    else:
        pruner = StructuredPruner(built.model, inputs, pruning_ratio=args.ratio or 0.0,
                                  global_pruning=args.global_pruning, **targets, **options)
        budget = None
        while pruner.current_step < pruner.iterative_steps:
            if batches is not None:  # every step scores the model as it is now
                pruner.calibrate(batches)
            budget = pruner.step().budget or budget
    if budget is not None:
        print(budget.summary())
    if args.recover is not None:
        print(_recover(built.model, teacher, batches, args.recover))
    rep = report(before if dense is None else dense, built.model, inputs,
                 latency=not args.no_latency, repeats=args.latency_repeats,
                 teacher=teacher, data=batches if teacher is not None else None)
    shape = _shape_of(inputs)
    save_pruned(built.model, out, metadata={
        "model": built.spec, "input_shape": shape,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "force", "command")}})
    (out / "report.json").write_text(json.dumps(rep.to_dict(), indent=1))
    (out / "report.md").write_text(rep.to_markdown())
    try:
        rep.plot(str(out / "kept.png"))
    except ImportError:  # the picture is optional; never leave an older run's behind
        (out / "kept.png").unlink(missing_ok=True)
    print(rep)
    for line in deploy.run(args, built.model, dense, inputs, batches, out,
                           rep.before.disk_size_mb):
        print(line)
    print(f"\nsaved to {out} (load with cleanai.load_pruned(<fresh {built.spec} model>, "
          f"{str(out)!r}))")
    return 0


def _recover(model: Any, teacher: Any, batches: List[Any], how: tuple) -> Any:
    """Run the ``--recover`` method on the calibration batches; returns its report."""
    from ..recover import distill, reconstruct

    method, arg = how
    if method == "reconstruct":
        return reconstruct(model, teacher, batches, granularity=arg, progress=False)
    return distill(model, teacher, batches, steps=arg, progress=False)


def _shape_of(inputs: Any) -> Optional[List[int]]:
    if isinstance(inputs, dict):
        return list(inputs["input_ids"].shape)
    return list(inputs.shape) if hasattr(inputs, "shape") else None


def _inspect(args: argparse.Namespace) -> int:
    from ..core import DependencyGraph
    from ..utils import render_graph

    built = build_model(args.model)
    graph = DependencyGraph(built.model, built.example_inputs(args.input_shape))
    prunable = [g for g in graph.groups if g.prunable and g.size > 1]
    print(f"{built.spec}: {len(graph.modules)} layers, {len(graph.groups)} channel groups, "
          f"{len(prunable)} prunable ({sum(g.prunable for g in prunable)} channels)")
    print("Pruning channel j of a group removes it from every member listed under it.\n")
    for g in graph.groups:
        print(g)
        if g.prunable and g.size > 1:
            print(f"  each channel removed takes {_weights_per_channel(g, built.model):,} "
                  f"weights with it")
    if args.dot:
        out = render_graph(graph, args.dot)
        print(f"\ngraph written to {out}")
    return 0


def _weights_per_channel(group: Any, model: Any) -> int:
    """Weight elements tied to one channel of ``group`` (biases and buffers not counted)."""
    from ..importance import member_weights

    total = 0.0
    for member, tensor, dim in member_weights(group, model):
        total += tensor.numel() / tensor.shape[dim] * len(member.positions) / group.size
    return round(total)


def _report(args: argparse.Namespace) -> int:
    from ..utils import LoadError, Report, read_pruned_info

    folder = Path(args.dir)
    file = folder / "report.json"
    if not folder.exists():
        raise CLIError(f"{folder} does not exist")
    if not folder.is_dir():
        raise CLIError(f"{folder} is not a directory; give one written by "
                       f"`cleanai prune --out DIR`")
    if file.is_file():
        try:
            rep = Report.from_dict(json.loads(file.read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            raise CLIError(f"{file} is not a CleanAI report: {exc}") from exc
        print(rep.to_markdown() if args.markdown else rep)
        return 0
    if not (folder / "cleanai.json").is_file():
        raise CLIError(f"{folder} holds no report.json or cleanai.json; give a directory "
                       f"written by `cleanai prune --out DIR` or cleanai.save_pruned")
    try:
        info = read_pruned_info(folder)  # a model saved from Python: the counts the file holds
    except LoadError as exc:
        raise CLIError(str(exc)) from exc
    b, a = info["original"]["params"], info["final"]["params"]
    print(f"{info.get('model_class')}: {len(info['steps'])} pruning steps; params {b:,} -> "
          f"{a:,} ({a / b - 1:+.1%}). No report.json here: `cleanai prune` writes one.")
    return 0
