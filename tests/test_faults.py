"""Faults: ``kill -9`` during training and during feature extraction, then the same command
again (training: with ``resume=``) — each completes and matches an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli

QUICK = ["trainer.enable_progress_bar=false", "tracking.energy=false"]


def _start(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "effbench.cli", *args], cwd=cwd,
                            env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> bool:
    """kill -9 the job once ``ready()`` holds; False if it finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("the job never reached the point to kill it")


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_kill_during_training_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    args = ["trainer.max_epochs=6", "optim.early_stopping=null", *QUICK]
    ref = run_cli(args, cwd=tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    [ref_dir] = list((tmp_path / "ref" / "outputs").iterdir())
    run_dir = tmp_path / "killed" / "run"
    proc = _start([*args, f"hydra.run.dir={run_dir}"], tmp_path / "killed")
    last = run_dir / "checkpoints" / "last.ckpt"
    assert _kill_when(proc, last.is_file), "finished before it could be killed"
    assert not (run_dir / "summary.json").exists()
    res = run_cli([*args, f"hydra.run.dir={run_dir}", f"resume={last}"], cwd=tmp_path / "killed")
    assert res.returncode == 0, res.stderr[-2000:]
    done, ref_s = _summary(run_dir), _summary(ref_dir)
    assert done["status"] == "completed" and done["resumed_from"] == str(last)
    assert done["epochs"] == ref_s["epochs"] == 6
    assert done["metrics"] == pytest.approx(ref_s["metrics"], abs=1e-6)
    assert done["best_val"]["epoch"] == ref_s["best_val"]["epoch"]


@pytest.mark.slow
def test_kill_during_feature_extraction_then_rerun_matches(tmp_path: Path) -> None:
    args = ["strategy=precomputed", "backbone=resnet18", "backbone.weights=null",
            "dataset.image_size=64", "trainer.max_epochs=3", *QUICK]
    cache = tmp_path / "cache"
    proc = _start(args, tmp_path / "killed", env={"EFFBENCH_CACHE_DIR": str(cache)})

    def some_features_cached() -> bool:
        return cache.is_dir() and any(p.suffix == ".pt" for p in cache.rglob("*"))

    assert _kill_when(proc, some_features_cached), "finished before it could be killed"
    rerun = run_cli(args, cwd=tmp_path / "killed", env={"EFFBENCH_CACHE_DIR": str(cache)})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    fresh = run_cli(args, cwd=tmp_path / "fresh",
                    env={"EFFBENCH_CACHE_DIR": str(tmp_path / "cache2")})
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    [killed_s] = [json.loads(p.read_text()) for p in (tmp_path / "killed").rglob("summary.json")]
    [fresh_s] = [json.loads(p.read_text()) for p in (tmp_path / "fresh").rglob("summary.json")]
    assert killed_s["status"] == fresh_s["status"] == "completed"
    assert killed_s["metrics"] == pytest.approx(fresh_s["metrics"], abs=1e-6)
