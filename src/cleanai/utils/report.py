"""Before/after reports of a pruned model: per-layer channels, params and MACs, totals, sizes,
latency with its spread.

Take a :func:`snapshot` of the model before pruning (counts only, no copy of the model), prune,
then ``report(before_snapshot, model, example_inputs)``; or pass two models. The
:class:`Report` prints as a table and converts to Markdown, a JSON-able dict and a PNG plot.
Two models are timed in turns (:func:`compare_latency`); a latency difference within the noise
is reported as "too noisy", not as a speed-up.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, List, Optional, Union

from torch import nn

from ..core.runtime import ForwardFn
from .fidelity import fidelity
from .counting import count_params, counted_forward, disk_size
from .latency import LatencyComparison, LatencyStats, compare_latency, latency_stats

__all__ = ["LayerStats", "Snapshot", "Report", "snapshot", "report"]


@dataclasses.dataclass
class LayerStats:
    """One layer with parameters: its channel counts (``None`` where the layer has no channel
    dim CleanAI knows), parameter elements and MACs of one forward pass."""

    name: str
    type: str
    in_channels: Optional[int]
    out_channels: Optional[int]
    params: int
    macs: int
    producer: bool = True  # False for layers whose channels follow another's (norms, depthwise)


@dataclasses.dataclass
class Snapshot:
    """Counts of a model at one moment: totals and :class:`LayerStats` per layer.

    ``latency_ms`` is the median CPU/GPU latency of one forward on the example inputs
    (``None`` when not measured), ``latency_q1_ms``/``latency_q3_ms`` its quartiles,
    ``latency_min_ms`` the fastest run and ``latency_runs`` the timed runs (``None`` in
    snapshots from before they were recorded); ``size_mb`` counts parameters and buffers and
    ``disk_size_mb`` the bytes ``torch.save(model.state_dict())`` writes (10^6 bytes)."""

    model: str
    params: int
    macs: int
    size_mb: float
    latency_ms: Optional[float]
    layers: Dict[str, LayerStats]
    latency_q1_ms: Optional[float] = None
    latency_q3_ms: Optional[float] = None
    latency_min_ms: Optional[float] = None
    latency_runs: Optional[int] = None
    disk_size_mb: Optional[float] = None

    @property
    def latency_stats(self) -> Optional[LatencyStats]:
        """The latency in seconds with its spread, or ``None`` when it was not measured or its
        spread not recorded."""
        ms = (self.latency_ms, self.latency_q1_ms, self.latency_q3_ms, self.latency_min_ms)
        if any(v is None for v in ms) or not self.latency_runs:
            return None
        median, q1, q3, fastest = (v / 1e3 for v in ms)
        return LatencyStats(median, q1, q3, fastest, self.latency_runs)

    def with_latency(self, stats: Optional[LatencyStats]) -> "Snapshot":
        """A copy holding ``stats`` (seconds, as :func:`latency_stats` gives) as its latency."""
        if stats is None:
            return dataclasses.replace(self, latency_ms=None, latency_q1_ms=None,
                                       latency_q3_ms=None, latency_min_ms=None,
                                       latency_runs=None)
        return dataclasses.replace(self, latency_ms=stats.median * 1e3,
                                   latency_q1_ms=stats.q1 * 1e3, latency_q3_ms=stats.q3 * 1e3,
                                   latency_min_ms=stats.min * 1e3, latency_runs=stats.runs)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able: the totals and one entry per layer."""
        d = dataclasses.asdict(self)
        d["layers"] = [dataclasses.asdict(s) for s in self.layers.values()]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Snapshot":
        """The snapshot :meth:`to_dict` wrote; fields an older CleanAI did not write are
        ``None``, and fields it does not know are left out."""
        layers = {s["name"]: LayerStats(**s) for s in d["layers"]}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known and k != "layers"},
                   layers=layers)


def snapshot(model: nn.Module, example_inputs: Any, forward_fn: Optional[ForwardFn] = None,
             latency: bool = True, repeats: int = 30) -> Snapshot:
    """Measure ``model`` now: per-layer channels, params and MACs, totals, sizes in memory and
    on disk and (when ``latency``) the median latency over ``repeats`` forward passes with its
    quartiles (:func:`latency_stats`). Leaves the model as it was."""
    from ..core.layers import get_layer_pruner

    counter, recurrent = counted_forward(model, example_inputs, forward_fn, "snapshot")
    root = type(model).__name__
    flops = {k[len(root) + 1:] if k.startswith(root + ".") else k: sum(v.values())
             for k, v in counter.get_flop_counts().items()}
    flops.update((name, 2 * macs) for name, macs in recurrent.macs.items())
    layers: Dict[str, LayerStats] = {}
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if not own or not name:
            continue
        pruner = get_layer_pruner(m, inherited=True)
        cin = cout = None
        producer = True
        if pruner is not None:
            try:
                cin, cout = pruner.in_channels(m), pruner.out_channels(m)
                producer = pruner.coupling(m) != "same"
            except Exception:  # a layer pruner that cannot read this module: counts only
                cin = cout = None
        layers[name] = LayerStats(name, type(m).__name__, cin, cout, sum(p.numel() for p in own),
                                  int(flops.get(name, 0)) // 2, producer)
    tensors = {t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers())}
    size = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6
    disk = disk_size(model)
    snap = Snapshot(root, count_params(model), recurrent.total(counter), size, None, layers,
                    disk_size_mb=disk / 1e6 if disk is not None else None)
    if latency:
        snap = snap.with_latency(latency_stats(model, example_inputs, forward_fn, repeats=repeats))
    return snap


class Report:
    """Before/after counts of a pruning run.

    ``str(report)`` is a readable table (totals, then the layers that changed);
    :meth:`to_markdown`, :meth:`to_dict` (JSON-able, read back with :meth:`from_dict`) and
    :meth:`plot` (a PNG of the channels each layer kept; needs matplotlib) present the same data.
    """

    def __init__(self, before: Snapshot, after: Snapshot,
                 fidelity: Optional[Dict[str, float]] = None,
                 latency: Optional[LatencyComparison] = None) -> None:
        self.before, self.after = before, after
        #: ``{"cosine", "agreement"?, "batches"}`` against the dense model on data, when given
        self.fidelity = fidelity
        if latency is None and before.latency_stats and after.latency_stats:
            latency = LatencyComparison.from_stats(before.latency_stats, after.latency_stats)
        #: ``after`` judged against ``before`` (timed apart unless given), or ``None`` when
        #: either latency or its spread is unknown
        self.latency = latency

    # --- data ---------------------------------------------------------------------------

    def totals(self) -> List[tuple]:
        """``(metric, before, after)`` rows: params, MACs, size in MB, size on disk in MB (when
        known), latency in ms and its spread (interquartile range / median; when measured)."""
        b, a = self.before, self.after
        rows = [("params", b.params, a.params), ("MACs", b.macs, a.macs),
                ("size MB", b.size_mb, a.size_mb)]
        if b.disk_size_mb is not None and a.disk_size_mb is not None:
            rows.append(("size on disk MB", b.disk_size_mb, a.disk_size_mb))
        if b.latency_ms is not None and a.latency_ms is not None:
            rows.append(("latency ms", b.latency_ms, a.latency_ms))
        if self.latency is not None:
            rows.append(("latency spread", self.latency.a.spread, self.latency.b.spread))
        return rows

    def latency_line(self) -> Optional[str]:
        """One line on the latency: the speed-up, or why the difference is too noisy to tell,
        and how it was timed; ``None`` without latency."""
        if self.before.latency_ms is None or self.after.latency_ms is None:
            return None
        c = self.latency
        if c is None:
            return ("latency: its spread was not recorded for both models (a report from an "
                    "older CleanAI?), so the change may be noise")
        runs = (f"{c.a.runs} runs each" if c.a.runs == c.b.runs
                else f"{c.a.runs} and {c.b.runs} runs")
        return (f"latency: {c}; median of {runs}, timed {'in turns' if c.paired else 'apart'}, "
                f"spread = interquartile range / median")

    def fidelity_line(self) -> Optional[str]:
        """One line on how close the pruned model stays to the dense one, or ``None``."""
        f = self.fidelity
        if not f:
            return None
        text = f"fidelity to the dense model: output cosine {f['cosine']:.4f}"
        if "agreement" in f:
            text += f", top-1 agreement {f['agreement']:.1%}"
        return text + f" ({int(f['batches'])} batches)"

    def layer_rows(self, changed_only: bool = True, producers_only: bool = False) -> List[tuple]:
        """``(name, type, channels before, channels after, params before, params after,
        MACs before, MACs after)`` per layer; by default only layers that changed.
        ``producers_only`` leaves out layers whose channels follow another's (norms)."""
        rows = []
        for name, b in self.before.layers.items():
            a = self.after.layers.get(name)
            if a is None or (producers_only and not b.producer):
                continue
            if changed_only and (a.params, a.in_channels, a.out_channels) == \
                    (b.params, b.in_channels, b.out_channels):
                continue
            rows.append((name, b.type, _ch(b), _ch(a), b.params, a.params, b.macs, a.macs))
        return rows

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able: ``{"before": snapshot, "after": snapshot}``, with ``"fidelity"`` and
        ``"latency"`` (verdict, speed-up, reason, paired) when measured."""
        out = {"before": self.before.to_dict(), "after": self.after.to_dict()}
        if self.fidelity:
            out["fidelity"] = dict(self.fidelity)
        if self.latency is not None:
            out["latency"] = self.latency.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Report":
        """The report that :meth:`to_dict` wrote (the latency verdict is judged again from
        the snapshots' quartiles)."""
        before, after = Snapshot.from_dict(d["before"]), Snapshot.from_dict(d["after"])
        latency = None
        if "latency" in d and before.latency_stats and after.latency_stats:
            latency = LatencyComparison.from_stats(before.latency_stats, after.latency_stats,
                                                   paired=bool(d["latency"].get("paired")))
        return cls(before, after, d.get("fidelity"), latency)

    # --- presentation -------------------------------------------------------------------

    def _total_cells(self) -> List[List[str]]:
        out = []
        for metric, b, a in self.totals():
            fmt = (lambda v: f"{v:,.2f}") if isinstance(b, float) else (lambda v: f"{v:,}")
            change = f"{a / b - 1:+.1%}" if b else "n/a"
            if metric == "latency spread":
                fmt, change = (lambda v: f"{v:.1%}"), ""
            elif metric == "latency ms" and self.latency is not None:
                noisy = self.latency.verdict == "too noisy"
                change = "too noisy" if noisy else str(self.latency)  # "1.52x faster"
            out.append([metric, fmt(b), fmt(a), change])
        return out

    def _notes(self) -> List[str]:
        return [line for line in (self.latency_line(), self.fidelity_line()) if line]

    def _layer_cells(self, max_layers: Optional[int], producers_only: bool = False) -> List[List[str]]:
        rows = self.layer_rows(producers_only=producers_only)
        if max_layers is not None:
            rows = rows[:max_layers]
        return [[n, t, f"{cb} -> {ca}", f"{pb:,} -> {pa:,}", f"{mb:,} -> {ma:,}"]
                for n, t, cb, ca, pb, pa, mb, ma in rows]

    def table(self, max_layers: Optional[int] = 40) -> str:
        """The text table; at most ``max_layers`` changed layers are listed (None: all).
        The count of changed layers is the Markdown's (every layer with parameters); norm and
        depthwise layers, whose channels follow the layer before them, are counted but not
        listed."""
        head = ["", "before", "after", "change"]
        lines = [f"{self.before.model}: pruning report", _text_table(head, self._total_cells())]
        lines += ["  " + line for line in self._notes()]
        cells = self._layer_cells(max_layers, producers_only=True)
        n = len(self.layer_rows(producers_only=True))
        followers = len(self.layer_rows()) - n
        if cells:
            count = f"layers changed: {n + followers} (channels in/out"
            if followers:
                count += (f"; not listed: {followers} norm or depthwise "
                          f"layer{'s' if followers > 1 else ''} whose channels follow another's")
            lines += ["", count + ")",
                      _text_table(["layer", "type", "channels", "params", "MACs"], cells)]
            if n > len(cells):
                lines.append(f"  ... {n - len(cells)} more (report.to_markdown() lists all)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (f"Report({self.before.model}: params {self.before.params:,} -> "
                f"{self.after.params:,}, MACs {self.before.macs:,} -> {self.after.macs:,})")

    def to_markdown(self) -> str:
        """Both tables (totals, every changed layer) as GitHub Markdown."""
        def md(head, rows):
            return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                             + ["| " + " | ".join(r) + " |" for r in rows])
        parts = [f"## {self.before.model}: pruning report", "",
                 md(["", "before", "after", "change"], self._total_cells())]
        for line in self._notes():
            parts += ["", line[0].upper() + line[1:] + "."]
        cells = self._layer_cells(None)
        if cells:
            parts += ["", f"### Layers changed ({len(cells)}; channels in/out)", "",
                      md(["layer", "type", "channels", "params", "MACs"],
                         [[f"`{c[0]}`"] + c[1:] for c in cells])]
        return "\n".join(parts) + "\n"

    def plot(self, path: str, title: Optional[str] = None) -> str:
        """Save a PNG bar chart of the fraction of output channels each layer kept.

        Needs matplotlib (``pip install matplotlib``); returns ``path``."""
        try:
            import matplotlib
            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError("Report.plot needs matplotlib: pip install matplotlib "
                              "(or cleanai[examples])") from exc
        names, kept = [], []
        for name, b in self.before.layers.items():
            a = self.after.layers.get(name)
            if a is None or not b.producer or not b.out_channels or a.out_channels is None:
                continue
            names.append(name)
            kept.append(a.out_channels / b.out_channels)
        fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(names) + 2), 4))
        try:
            ax.bar(range(len(names)), kept, color="#4477aa")
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=90, fontsize=6)
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("output channels kept")
            ax.set_title(title or f"{self.before.model}: params {self.before.params:,} -> "
                                  f"{self.after.params:,}")
            fig.tight_layout()
            fig.savefig(path, dpi=120)
        finally:
            plt.close(fig)
        return path


def report(before: Union[nn.Module, Snapshot], after: Union[nn.Module, Snapshot],
           example_inputs: Any = None, forward_fn: Optional[ForwardFn] = None,
           latency: bool = True, teacher: Optional[nn.Module] = None,
           data: Optional[Iterable] = None, max_batches: Optional[int] = 8,
           repeats: int = 30) -> Report:
    """Compare ``before`` and ``after`` (models or :func:`snapshot` results).

    Models are measured on ``example_inputs`` (needed unless both are snapshots); latency is
    measured when ``latency`` is True, over ``repeats`` timed runs. Two models are timed in
    turns (:func:`compare_latency`), so both see the same load on the machine; a snapshot's
    latency was timed when it was taken. Keep a snapshot instead of a deep copy of the
    original model when memory matters (the latencies are then timed apart).

    With ``data`` (batches as :meth:`StructuredPruner.calibrate` takes them) the report also
    gives the pruned model's fidelity to the dense one (:func:`cleanai.utils.fidelity`): the
    dense model is ``teacher``, or ``before`` when that is a model."""
    paired = latency and isinstance(before, nn.Module) and isinstance(after, nn.Module)

    def measure(x):
        if isinstance(x, Snapshot):
            return x
        if example_inputs is None:
            raise ValueError("report: example_inputs are needed to measure a model")
        return snapshot(x, example_inputs, forward_fn, latency=latency and not paired,
                        repeats=repeats)
    found = None
    if data is not None:
        dense = teacher if teacher is not None else before
        if not isinstance(dense, nn.Module) or not isinstance(after, nn.Module):
            raise ValueError("report: fidelity needs the pruned model and the dense model "
                             "(teacher=...) as modules, not snapshots")
        found = fidelity(after, dense, data, max_batches, forward_fn)
    b, a = measure(before), measure(after)
    if not paired:
        return Report(b, a, found)
    timed = compare_latency(before, after, example_inputs, forward_fn, repeats=repeats)
    return Report(b.with_latency(timed.a), a.with_latency(timed.b), found, timed)


def _ch(s: LayerStats) -> str:
    if s.in_channels is None and s.out_channels is None:
        return "-"
    if s.producer:
        return f"{s.in_channels if s.in_channels is not None else '-'}/{s.out_channels if s.out_channels is not None else '-'}"
    return str(s.out_channels)


def _text_table(head: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    out = []
    for j, r in enumerate([head] + rows):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  " + "  ".join(cells).rstrip())
        if j == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(out)
