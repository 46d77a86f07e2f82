"""Before/after reports of a pruned model: per-layer channels, params and MACs, totals, latency.

Take a :func:`snapshot` of the model before pruning (counts only, no copy of the model), prune,
then ``report(before_snapshot, model, example_inputs)``; or pass two models. The
:class:`Report` prints as a table and converts to Markdown, a JSON-able dict and a PNG plot.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, List, Optional, Union

from torch import nn

from ..core.runtime import ForwardFn
from .fidelity import fidelity
from .counting import count_params, counted_forward
from .latency import measure_latency

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
    (``None`` when not measured); ``size_mb`` counts parameters and buffers (10^6 bytes)."""

    model: str
    params: int
    macs: int
    size_mb: float
    latency_ms: Optional[float]
    layers: Dict[str, LayerStats]

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able: the totals and one entry per layer."""
        d = dataclasses.asdict(self)
        d["layers"] = [dataclasses.asdict(s) for s in self.layers.values()]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Snapshot":
        layers = {s["name"]: LayerStats(**s) for s in d["layers"]}
        return cls(**{**d, "layers": layers})


def snapshot(model: nn.Module, example_inputs: Any, forward_fn: Optional[ForwardFn] = None,
             latency: bool = True, repeats: int = 10) -> Snapshot:
    """Measure ``model`` now: per-layer channels, params and MACs, totals, size and (when
    ``latency``) the median latency over ``repeats`` forward passes. Leaves the model as it was."""
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
    ms = measure_latency(model, example_inputs, forward_fn, repeats=repeats) * 1e3 if latency else None
    return Snapshot(root, count_params(model), recurrent.total(counter), size, ms, layers)


class Report:
    """Before/after counts of a pruning run.

    ``str(report)`` is a readable table (totals, then the layers that changed);
    :meth:`to_markdown`, :meth:`to_dict` (JSON-able, read back with :meth:`from_dict`) and
    :meth:`plot` (a PNG of the channels each layer kept; needs matplotlib) present the same data.
    """

    def __init__(self, before: Snapshot, after: Snapshot,
                 fidelity: Optional[Dict[str, float]] = None) -> None:
        self.before, self.after = before, after
        #: ``{"cosine", "agreement"?, "batches"}`` against the dense model on data, when given
        self.fidelity = fidelity

    # --- data ---------------------------------------------------------------------------

    def totals(self) -> List[tuple]:
        """``(metric, before, after)`` rows: params, MACs, size in MB, latency in ms."""
        rows = [("params", self.before.params, self.after.params),
                ("MACs", self.before.macs, self.after.macs),
                ("size MB", self.before.size_mb, self.after.size_mb)]
        if self.before.latency_ms is not None and self.after.latency_ms is not None:
            rows.append(("latency ms", self.before.latency_ms, self.after.latency_ms))
        return rows

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
        """JSON-able: ``{"before": snapshot, "after": snapshot}``."""
        out = {"before": self.before.to_dict(), "after": self.after.to_dict()}
        if self.fidelity:
            out["fidelity"] = dict(self.fidelity)
        return out

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Report":
        """The report that :meth:`to_dict` wrote."""
        return cls(Snapshot.from_dict(d["before"]), Snapshot.from_dict(d["after"]),
                   d.get("fidelity"))

    # --- presentation -------------------------------------------------------------------

    def _total_cells(self) -> List[List[str]]:
        out = []
        for metric, b, a in self.totals():
            fmt = (lambda v: f"{v:,.2f}") if isinstance(b, float) else (lambda v: f"{v:,}")
            out.append([metric, fmt(b), fmt(a), f"{a / b - 1:+.1%}" if b else "n/a"])
        return out

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
        if self.fidelity_line():
            lines.append("  " + self.fidelity_line())
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
        if self.fidelity_line():
            parts += ["", self.fidelity_line()[0].upper() + self.fidelity_line()[1:] + "."]
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
           data: Optional[Iterable] = None, max_batches: Optional[int] = 8) -> Report:
    """Compare ``before`` and ``after`` (models or :func:`snapshot` results).

    Models are measured on ``example_inputs`` (needed unless both are snapshots); latency is
    measured when ``latency`` is True. Keep a snapshot instead of a deep copy of the original
    model when memory matters.

    With ``data`` (batches as :meth:`StructuredPruner.calibrate` takes them) the report also
    gives the pruned model's fidelity to the dense one (:func:`cleanai.utils.fidelity`): the
    dense model is ``teacher``, or ``before`` when that is a model."""
    def measure(x):
        if isinstance(x, Snapshot):
            return x
        if example_inputs is None:
            raise ValueError("report: example_inputs are needed to measure a model")
        return snapshot(x, example_inputs, forward_fn, latency=latency)
    found = None
    if data is not None:
        dense = teacher if teacher is not None else before
        if not isinstance(dense, nn.Module) or not isinstance(after, nn.Module):
            raise ValueError("report: fidelity needs the pruned model and the dense model "
                             "(teacher=...) as modules, not snapshots")
        found = fidelity(after, dense, data, max_batches, forward_fn)
    return Report(measure(before), measure(after), found)


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
