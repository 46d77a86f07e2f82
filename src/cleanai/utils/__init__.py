"""Measurement, recovery and persistence helpers: parameter and MAC counts, latency, BatchNorm
statistics, saving/loading pruned models."""
from .batchnorm import recalibrate_bn
from .counting import count_macs, count_params
from .latency import measure_latency
from .save import LoadError, load_pruned, read_pruned_info, save_pruned

__all__ = ["count_macs", "count_params", "measure_latency", "recalibrate_bn",
           "save_pruned", "load_pruned", "read_pruned_info", "LoadError"]
