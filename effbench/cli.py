"""The ``effbench`` command: a Hydra app over ``conf/`` that runs one job per composed config.

Kept light: torch and Lightning are imported only when a job runs, so ``--help``, ``--cfg job``
and config errors answer at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from effbench.config import CONF_DIR
from effbench.ranks import is_rank_zero
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
    if OmegaConf.select(cfg, "tracking.energy") is True and is_rank_zero(cfg):  # overlaps imports
        from effbench.tracking import warm_up

        warm_up()
    from effbench.run import run  # heavy imports after Hydra has parsed the command line

    hc = HydraConfig.get()
    choices = dict(hc.runtime.choices)
    summary = run(cfg, Path(hc.runtime.output_dir), choices, list(hc.overrides.task),
                  original_cwd=hydra.utils.get_original_cwd())
    if summary["status"] == "interrupted":
        # Also in a sweep: the user (Ctrl-C) or the scheduler (SIGTERM) stopped it; no traceback.
        print(f"effbench: {summary['error']}", file=sys.stderr)
        sys.exit(128 + signal.Signals[summary.get("signal") or "SIGINT"])
    if is_rank_zero(cfg):
        print_report(summary)
    if summary["status"] != "completed" and hc.mode != RunMode.MULTIRUN:
        sys.exit(1)  # one sentence already printed; a sweep instead records it and goes on
    if summary["status"] != "completed" and _job_of_failing_launcher(hc):
        # A submitit job (hydra/launcher=local | slurm) fails as a job: what sacct and afterok see.
        raise JobFailed(f"{summary['error']} ({summary['run_dir']})")
    # The sweeper gets the validation objective recorded in the summary (never a test metric
    # unless objective_on_test=true; validate.py).
    return (summary.get("objective") or {}).get("value")


def _one_repository_for_help() -> None:
    """``--help`` lists every config group's options. Hydra 1.3 builds a new config repository
    (a deep copy of every config it loaded) for each of the ~100 lookups: two thirds of the
    command's time. The listing asks with no overrides, so one repository answers them all;
    composing (the other third) is left as Hydra does it."""
    from hydra._internal.hydra import Hydra
    from hydra.core.object_type import ObjectType

    plain = Hydra.format_config_groups

    def format_config_groups(self: Hydra, predicate: Any, compact: bool = True) -> str:
        loader = self.config_loader
        _, repo = loader._parse_overrides_and_create_caching_repo(None, [])
        asks = loader.get_group_options

        def get_group_options(group_name: str, results_filter: Any = ObjectType.CONFIG,
                              config_name: str | None = None,
                              overrides: list[str] | None = None) -> list[str]:
            if config_name is None and not overrides:
                return repo.get_group_options(group_name, results_filter)
            return asks(group_name, results_filter, config_name, overrides)

        loader.get_group_options = get_group_options
        try:
            return plain(self, predicate, compact)
        finally:
            del loader.get_group_options  # the class's own again

    Hydra.format_config_groups = format_config_groups


@contextmanager
def _mode_from_preflight() -> Iterator[None]:
    """Hydra composes the whole config a second time only to read ``hydra.mode``
    (``Hydra.get_mode``); preflight has composed the same overrides, so its value answers. Only
    when preflight composed (not for ``--help``, ``--info`` and the other flags it leaves to
    Hydra)."""
    from hydra._internal.hydra import Hydra

    from effbench.preflight import COMPOSED

    if "mode" not in COMPOSED:
        yield
        return
    plain = Hydra.get_mode
    Hydra.get_mode = lambda self, config_name, overrides: COMPOSED["mode"]
    try:
        yield
    finally:
        Hydra.get_mode = plain


def main() -> None:
    """``effbench``: the command, then an exit that skips the interpreter's slow teardown."""
    from effbench.lifecycle import exit_now

    try:
        _main()
    except SystemExit as done:
        exit_now(done.code)
    except BrokenPipeError:  # `effbench --help | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        exit_now(1)
    exit_now(0)


def _main() -> None:
    from effbench.preflight import preflight
    from effbench.sweep_report import FAILED_JOBS

    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        _one_repository_for_help()

    problem = preflight(sys.argv[1:], CONF_DIR)
    if problem:
        print(f"effbench: error: {problem}", file=sys.stderr)
        sys.exit(1)
    try:
        with _mode_from_preflight():
            _app()
    except KeyboardInterrupt:  # Ctrl-C before a run started (a run records its own)
        print("effbench: interrupted by SIGINT before the run started.", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    if FAILED_JOBS:  # the sweep finished every job; say it did not all go well
        sys.exit(1)


if __name__ == "__main__":
    main()
