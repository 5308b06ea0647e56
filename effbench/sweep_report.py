"""After a sweep: one line per failed job and a non-zero exit (the sweep itself always finishes).

A Hydra callback (``hydra.callbacks.sweep_report`` in conf/config.yaml) because only Hydra knows
the sweep dir and runs this once in the launching process, whatever the launcher (basic, joblib,
Optuna). Jobs record their own outcome in ``summary.json``; this reads them back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

# Set after a sweep with failed jobs; ``effbench.cli.main`` turns it into the exit code.
FAILED_JOBS: list[str] = []


def failed_jobs(sweep_dir: Path) -> list[str]:
    """``"<job dir>: <error>"`` for every job dir under the sweep whose run did not complete."""
    out = []
    # Dot-folders are launcher bookkeeping (submitit's .submitit/), not jobs.
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        path = job / "summary.json"
        try:
            summary = json.loads(path.read_text())
            status, error = summary.get("status"), summary.get("error")
        except (OSError, ValueError, AttributeError):
            status, error = None, "no readable summary.json (the job was killed or crashed)"
        if status == "running":  # the summary written at the start was never replaced
            error = "no end recorded (the job was killed or crashed)"
        if status != "completed":
            out.append(f"{job.name}: {error}")
    return out


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        FAILED_JOBS[:] = failed_jobs(sweep_dir)
        for line in FAILED_JOBS:
            print(f"effbench: failed job {line}", file=sys.stderr)
        if FAILED_JOBS:
            print(f"effbench: {len(FAILED_JOBS)} job(s) of the sweep in {sweep_dir} failed.",
                  file=sys.stderr)
