"""The ``effbench`` command: a Hydra app over ``conf/`` that runs one job per composed config.

Kept light: torch and Lightning are imported only when a job runs, so ``--help``, ``--cfg job``
and config errors answer at once.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from effbench.config import CONF_DIR
from effbench.ranks import global_rank
from effbench.report import print_report

log = logging.getLogger("effbench")


class JobFailed(Exception):
    """A job of a sweep whose run did not complete (its summary.json says why)."""


def _job_of_failing_launcher(hc: Any) -> bool:
    """Launched by effbench's submitit launchers, which record a raised job as failed."""
    target = str(hc.launcher.get("_target_", ""))
    return hc.mode == RunMode.MULTIRUN and target.startswith("hydra_plugins.effbench_submitit.")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _app(cfg: DictConfig) -> Any:
    from effbench.run import run  # heavy imports after Hydra has parsed the command line

    hc = HydraConfig.get()
    choices = dict(hc.runtime.choices)
    summary = run(cfg, Path(hc.runtime.output_dir), choices, list(hc.overrides.task),
                  original_cwd=hydra.utils.get_original_cwd())
    if summary["status"] == "interrupted":
        # Also in a sweep: the user (Ctrl-C) or the scheduler (SIGTERM) stopped it; no traceback.
        print(f"effbench: {summary['error']}", file=sys.stderr)
        sys.exit(128 + signal.Signals[summary.get("signal") or "SIGINT"])
    if global_rank(cfg.trainer.get("devices")) == 0:
        print_report(summary)
    if summary["status"] != "completed" and hc.mode != RunMode.MULTIRUN:
        sys.exit(1)  # one sentence already printed; a sweep instead records it and goes on
    if summary["status"] != "completed" and _job_of_failing_launcher(hc):
        # A submitit job (hydra/launcher=local | slurm) fails as a job: what sacct and afterok see.
        raise JobFailed(f"{summary['error']} ({summary['run_dir']})")
    # The sweeper gets the validation objective recorded in the summary (never a test metric
    # unless objective_on_test=true; validate.py).
    return (summary.get("objective") or {}).get("value")


def main() -> None:
    from effbench.preflight import preflight
    from effbench.sweep_report import FAILED_JOBS

    problem = preflight(sys.argv[1:], CONF_DIR)
    if problem:
        print(f"effbench: error: {problem}", file=sys.stderr)
        sys.exit(1)
    try:
        _app()
    except KeyboardInterrupt:  # Ctrl-C before a run started (a run records its own)
        print("effbench: interrupted by SIGINT before the run started.", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    if FAILED_JOBS:  # the sweep finished every job; say it did not all go well
        sys.exit(1)


if __name__ == "__main__":
    main()
