"""Stopped by a signal, as a scheduler or a user stops a job: SIGTERM (SLURM's pre-emption and
time limit) and Ctrl-C (SIGINT to the terminal's process group), at several moments. Each leaves an
``interrupted`` summary naming the last checkpoint and the command that resumes from it, exits
like a process ended by that signal (143, 130), prints one line and no traceback. And a failed job
of a submitit sweep fails as a job (what ``sacct`` and ``afterok`` read)."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import TINY, run_cli
from tests.helpers.cli import Started, start_cli

# 32 px: epochs long enough to be caught between checkpoints (digits default to their 8 px).
ARGS = ["trainer.max_epochs=4", "optim.early_stopping=null", "dataset.max_samples=400",
        "dataset.image_size=32",
        "trainer.enable_progress_bar=false",
        "tracking.energy=false"]
FAULTS = Path(__file__).parent / "faults"  # sitecustomize: pause before testing


def _start(args: list[str], cwd: Path, env: dict | None = None,
           fresh: bool = False) -> Started | subprocess.Popen:
    """The job in a process group of its own, forked from the test zygote (``fresh``: as a
    fresh interpreter, the console script's own start-up; the first test below is)."""
    return start_cli(args, cwd, env=env, fresh=fresh)


def _signal_when(proc: subprocess.Popen, ready, signum: int,
                 timeout: float = 300) -> tuple[int, str]:
    """Sends ``signum`` to the job's process group (a terminal's Ctrl-C, SLURM's SIGTERM reach
    every process of the job) once ``ready()`` holds; the exit status and stderr."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before it could be signalled: "
                                 f"{proc.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, "the job never reached the point to signal it"
        time.sleep(0.05)
    os.killpg(proc.pid, signum)
    out, err = proc.communicate(timeout=300)
    assert "Traceback" not in out + err, err[-3000:]
    return proc.returncode, err


def _one_line(err: str) -> str:
    """effbench's own lines on stderr (not logging's ``[…]`` nor Lightning's warnings): one."""
    lines = [ln for ln in err.splitlines() if ln.startswith("effbench")]
    assert len(lines) == 1, lines
    return lines[0]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_sigterm_mid_training_interrupted_summary_then_resume_command(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = _start([*ARGS, f"hydra.run.dir={run_dir}"], tmp_path, fresh=True)
    code, err = _signal_when(proc, last.is_file, signal.SIGTERM)
    assert code == 143
    line = _one_line(err)
    s = _summary(run_dir)
    assert s["status"] == "interrupted" and s["signal"] == "SIGTERM"
    assert s["checkpoint"] == str(last) and s["error"] in line
    assert line.startswith("effbench: interrupted by SIGTERM after epoch ")
    assert s["resume_command"] in line and f"resume={last}" in s["resume_command"]
    # The printed command, as the user would paste it, continues the run in its folder.
    argv = shlex.split(s["resume_command"])
    assert argv[0] == "effbench"
    res = run_cli(argv[1:], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    done = _summary(run_dir)
    assert done["status"] == "completed" and done["epochs"] == 4
    assert done["resumed_from"] == str(last)


@pytest.mark.slow
def test_ctrl_c_mid_training_interrupted_summary_exit_130(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = _start([*ARGS, f"hydra.run.dir={run_dir}"], tmp_path)
    code, err = _signal_when(proc, last.is_file, signal.SIGINT)
    assert code == 130
    assert _one_line(err).startswith("effbench: interrupted by SIGINT after epoch ")
    s = _summary(run_dir)
    assert s["status"] == "interrupted" and s["checkpoint"] == str(last)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_setup_interrupted_no_checkpoint(signum: int, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _start([*ARGS, f"hydra.run.dir={run_dir}"], tmp_path)
    code, err = _signal_when(proc, (run_dir / "summary.json").is_file, signum)
    assert code == 128 + signum
    name = signal.Signals(signum).name
    assert _one_line(err) == (f"effbench: interrupted by {name} before the first checkpoint; "
                              "run the same command again to start over.")
    s = _summary(run_dir)
    assert s["status"] == "interrupted" and s["checkpoint"] is None


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_the_moment_the_running_summary_appears(signum: int, tmp_path: Path) -> None:
    """The signal arrives just after the ``running`` summary is written, before set-up begins
    (the moment a watcher of summary.json signals): the summary still becomes ``interrupted``,
    with the same sentence as any stop before the first checkpoint."""
    run_dir = tmp_path / "run"
    marker = tmp_path / "running"
    env = {"PYTHONPATH": f"{FAULTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "EFFBENCH_FAULT_PAUSE_RUNNING": str(marker)}
    proc = _start([*ARGS, f"hydra.run.dir={run_dir}"], tmp_path, env=env)
    code, err = _signal_when(proc, marker.is_file, signum)
    assert code == 128 + signum
    name = signal.Signals(signum).name
    assert _one_line(err) == (f"effbench: interrupted by {name} before the first checkpoint; "
                              "run the same command again to start over.")
    s = _summary(run_dir)
    assert s["status"] == "interrupted" and s["signal"] == name and s["checkpoint"] is None


@pytest.mark.slow
def test_sigterm_during_testing_interrupted_with_final_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    marker = tmp_path / "testing"
    env = {"PYTHONPATH": f"{FAULTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "EFFBENCH_FAULT_PAUSE_TEST": str(marker)}
    proc = _start([*ARGS, f"hydra.run.dir={run_dir}"], tmp_path, env=env)
    code, err = _signal_when(proc, marker.is_file, signal.SIGTERM)
    assert code == 143
    assert _one_line(err).startswith("effbench: interrupted by SIGTERM after epoch 4 of 4; ")
    assert _summary(run_dir)["status"] == "interrupted"


@pytest.mark.slow
def test_failed_job_of_a_submitit_sweep_fails_as_a_job(tmp_path: Path) -> None:
    """hydra/launcher=local (submitit): the job whose run fails is a failed submitit job (its
    result is an error, its process exits non-zero, as sacct would record it), the other job of
    the sweep still completes, and the sweep says which failed and exits 1. (This test also
    stands for tests/test_scaleout.py's submitit sweep: one sweep of two fresh job processes,
    not two sweeps; logger=mlflow: jobs starting together share one new SQLite store.)"""
    from tests.test_scaleout import _mlflow_client

    sweep = tmp_path / "sweep"
    env = {"PYTHONPATH": f"{FAULTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "EFFBENCH_FAULT_FAIL_SEED": "1"}
    res = run_cli(["-m", "hydra/launcher=local", "logger=mlflow", *TINY,
                   f"hydra.sweep.dir={sweep}", "seed=0,1"], cwd=tmp_path, env=env)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stdout + res.stderr, res.stderr[-3000:]
    assert "1 job(s) of the sweep" in res.stderr
    # The sweep names the failed job and why.
    assert "failed job 1_" in res.stderr, res.stderr[-3000:]
    assert "injected failure of the job with seed 1" in res.stderr, res.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name.split("_")[0] for p in runs] == ["0", "1"]
    done = [_summary(d) for d in runs]
    assert [s["status"] for s in done] == ["completed", "failed"]
    assert sorted(s["choices"]["seed"] for s in done) == [0, 1]
    outcomes = {}
    # submitit's pickles and logs sit beside the sweep dir, not among its run dirs
    for result in Path(f"{sweep}.submitit").rglob("*_result.pkl"):
        outcome, _ = pickle.loads(result.read_bytes())
        logs = "".join(p.read_text() for p in result.parent.glob("*_log.*"))
        outcomes[outcome] = "Job completed successfully" in logs
    # The failed job is an error for submitit and never logs success; the other one does.
    assert outcomes == {"error": False, "success": True}, outcomes
    client = _mlflow_client(tmp_path)
    tracked = client.search_runs([client.get_experiment_by_name("effbench").experiment_id])
    assert sorted((r.data.params["seed"], r.info.status) for r in tracked) == [
        ("0", "FINISHED"), ("1", "FAILED")]


@pytest.mark.slow
def test_sigterm_under_slurm_with_requeue_requeues_then_resumes(tmp_path: Path) -> None:
    """hardware.requeue=true under SLURM: SIGTERM requeues the job (``scontrol requeue <job>``,
    as Lightning's SLURM plugin does) and the requeued job, the same command again, resumes from
    the interrupted run's last.ckpt."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(0o755)
    env = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    args = [*ARGS, "hardware.requeue=true", f"hydra.run.dir={run_dir}"]
    proc = _start(args, tmp_path, env=env)
    code, err = _signal_when(proc, last.is_file, signal.SIGTERM)
    assert code == 143
    assert "SLURM job 4242 requeued" in _one_line(err)
    assert calls.read_text().split() == ["requeue", "4242"]
    assert _summary(run_dir)["status"] == "interrupted"
    res = run_cli(args, cwd=tmp_path, env=env)  # what SLURM runs again
    assert res.returncode == 0, res.stderr[-2000:]
    done = _summary(run_dir)
    assert done["status"] == "completed" and done["epochs"] == 4
    assert done["resumed_from"] == str(last)


@pytest.mark.slow
def test_failed_job_of_a_slurm_sweep_is_failed_for_slurm(tmp_path: Path) -> None:
    """hydra/launcher=slurm (tests/test_scaleout.py's stand-in sbatch/srun/sacct: a task's state
    is its job script's exit status): the preset submits one array with its resources, the
    failed job is FAILED, the other COMPLETED. (This test also stands for test_scaleout's slurm
    preset case: one array of two fresh job processes, not two.)"""
    from tests.test_scaleout import _fake_slurm, summaries

    env = {**_fake_slurm(tmp_path), "EFFBENCH_FAULT_FAIL_SEED": "1",
           "PYTHONPATH": f"{FAULTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = run_cli(["-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                   "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=2",
                   "hydra.launcher.mem_gb=4", "hydra.launcher.timeout_min=30", "seed=0,1",
                   *TINY, f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, env=env)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stdout + res.stderr, res.stderr[-3000:]
    script = (tmp_path / "slurm_state" / "sbatch.sh").read_text()
    for flag in ("--array=0-1%2", "--partition=gpu", "--cpus-per-task=2", "--mem=4GB",
                 "--time=30", "--nodes=1", "--ntasks-per-node=1", "--job-name=effbench"):
        assert f"#SBATCH {flag}\n" in script, script
    assert "submitit.core._submit" in script
    assert sorted(s["status"] for s in summaries(tmp_path / "sweep")) == ["completed", "failed"]

    def states() -> list[str]:
        return sorted(p.read_text().split("|")[1].strip()
                      for p in (tmp_path / "slurm_state").glob("task_*"))

    # submitit returns once the results are written; the stand-in records a task's state when
    # its job script exits, a moment later.
    deadline = time.monotonic() + 120
    while "RUNNING" in states() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert states() == ["COMPLETED", "FAILED"]
