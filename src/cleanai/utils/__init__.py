"""Measurement helpers: parameter and MAC counts, forward latency."""
from .counting import count_macs, count_params
from .latency import measure_latency

__all__ = ["count_macs", "count_params", "measure_latency"]
