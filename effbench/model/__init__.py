"""A run's model as a thing to keep: its saved form (``saved``), what it measures (size, latency:
``measure``), and the formats shared by the techniques that reshape it (``sparse``, ``shapes``,
``int8``, ``graph``)."""

from effbench.model.measure import (
    cpu_latency_ms,
    module_bytes,
    zipped_state_dict_bytes,
)

__all__ = ["cpu_latency_ms", "module_bytes", "zipped_state_dict_bytes"]
