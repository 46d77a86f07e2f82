"""Measurement, recovery and persistence helpers: parameter and MAC counts, latency, BatchNorm
statistics, before/after reports, graph pictures, saving/loading pruned models."""
from .batchnorm import recalibrate_bn
from .counting import count_macs, count_params, disk_size
from .fidelity import fidelity, output_tensor
from .latency import LatencyComparison, LatencyStats, compare_latency, latency_stats, measure_latency
from .render import render_graph
from .report import LayerStats, Report, Snapshot, report, snapshot
from .save import LoadError, load_pruned, read_pruned_info, save_pruned

__all__ = ["count_macs", "count_params", "disk_size", "fidelity", "output_tensor", "measure_latency",
           "latency_stats", "compare_latency", "LatencyStats", "LatencyComparison", "recalibrate_bn",
           "report", "snapshot", "Report", "Snapshot", "LayerStats", "render_graph",
           "save_pruned", "load_pruned", "read_pruned_info", "LoadError"]
