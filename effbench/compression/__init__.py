"""Measuring what compression buys: on-disk size (dense, zipped, int8) and CPU latency."""

from effbench.compression.measure import (
    cpu_latency_ms,
    module_bytes,
    zipped_state_dict_bytes,
)

__all__ = ["cpu_latency_ms", "module_bytes", "zipped_state_dict_bytes"]
