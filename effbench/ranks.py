"""This process's global rank before Lightning has set anything up (light: no torch import).

Lightning derives it the same way: ``RANK`` (torchrun) or ``SLURM_PROCID`` (srun) when a launcher
set them, else ``NODE_RANK × devices per node + LOCAL_RANK`` (its own launcher on each node).
Reading only ``RANK`` made node 1 of a two-node run believe it was rank 0.
"""

from __future__ import annotations

import os
from typing import Any


def _int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def global_rank(devices_per_node: Any = 1) -> int:
    for key in ("RANK", "SLURM_PROCID"):
        rank = _int(key)
        if rank is not None:
            return rank
    try:
        per_node = max(1, int(devices_per_node))
    except (TypeError, ValueError):
        per_node = 1
    return (_int("NODE_RANK") or 0) * per_node + (_int("LOCAL_RANK") or 0)


def is_rank_zero(cfg: Any) -> bool:
    """The one process of a run that writes its records (summary, predictions, saved model,
    report): global rank 0 for the run's ``trainer.devices``. Every writer asks here."""
    return global_rank(cfg.trainer.get("devices")) == 0
