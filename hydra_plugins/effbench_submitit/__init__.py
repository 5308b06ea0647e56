"""Hydra's submitit launchers (hydra/launcher=local | slurm), with a failed run failing as a job.

Hydra's ``run_job`` turns whatever a task raises into a return value, so with the stock launchers
every job ends "completed" for submitit, and so for SLURM (``sacct``, ``--dependency=afterok``),
even when its run failed. Here the job raises after its summary is written: submitit records the
job as failed (its result is the error, the process exits non-zero). The launching process still
waits for every job and reads each outcome from the jobs' summaries (effbench's sweep report), so
one failed job neither hides the others nor ends the sweep in a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as stock

log = logging.getLogger(__name__)


class _FailingJobs:
    """Mixin over a stock submitit launcher."""

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        ret = super().__call__(*args, **kwargs)  # type: ignore[misc]
        if ret.status == JobStatus.FAILED:  # the task raised (effbench.cli: the run failed)
            raise ret._return_value
        return ret

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        # The stock launch ends with ``[j.results()[0] for j in executor.map_array(…)]``, which
        # raises at the first failed job: its jobs are handed back wrapped in _Settled instead.
        real_map_array = submitit.AutoExecutor.map_array

        def map_array(executor: Any, fn: Any, *iterable: Any) -> list[Any]:
            jobs = real_map_array(executor, fn, *iterable)
            return [_Settled(j, list(o)) for j, o in zip(jobs, job_overrides, strict=True)]

        submitit.AutoExecutor.map_array = map_array  # type: ignore[method-assign]
        try:
            return super().launch(job_overrides, initial_job_idx)  # type: ignore[misc]
        finally:
            submitit.AutoExecutor.map_array = real_map_array  # type: ignore[method-assign]


class _Settled:
    """A submitted job whose ``results()`` waits for it and never raises: a failed job's outcome
    is in its run's summary.json, which the sweep report reads."""

    def __init__(self, job: Any, overrides: list[str]) -> None:
        self.job, self.overrides = job, overrides

    def results(self) -> list[JobReturn]:
        try:
            return list(self.job.results())
        except Exception as err:  # noqa: BLE001 - submitit's FailedJobError / UncompletedJobError
            log.debug("job %s failed: %s", self.job.job_id, err)
            # For the sweeper: a job without a value, as a failed run returns in any sweep.
            return [JobReturn(overrides=self.overrides, status=JobStatus.COMPLETED)]


class LocalLauncher(_FailingJobs, stock.LocalLauncher):
    pass


class SlurmLauncher(_FailingJobs, stock.SlurmLauncher):
    pass
