"""Measurement and recovery helpers: parameter and MAC counts, latency, BatchNorm statistics."""
from .batchnorm import recalibrate_bn
from .counting import count_macs, count_params
from .latency import measure_latency

__all__ = ["count_macs", "count_params", "measure_latency", "recalibrate_bn"]
