"""Faults: ``kill -9`` during set-up, training, testing and feature extraction, then the same
command again (with ``resume=`` once a checkpoint exists) — each completes and matches an
uninterrupted run. A full disk and a read-only folder end in one sentence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import TINY, run_cli
from tests.helpers.cli import Started, run_compare, start_cli
from tests.helpers.tiny import QUIET

QUICK = QUIET


def _start(args: list[str], cwd: Path, env: dict | None = None,
           fresh: bool = False) -> Started | subprocess.Popen:
    """The job in a process group of its own, forked from the test zygote (``fresh``: as a
    fresh interpreter, the console script's own start-up; the kill mid-training is)."""
    return start_cli(args, cwd, env=env, fresh=fresh)


def _kill_when(proc: Started | subprocess.Popen, ready, timeout: float = 300) -> bool:
    """kill -9 the job once ``ready()`` holds; False if it finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return True
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("the job never reached the point to kill it")


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# The uninterrupted run every kill is compared with (digits, small_cnn: seconds an epoch).
# 32 px: epochs long enough to be caught between checkpoints (digits default to their 8 px).
ARGS = ["trainer.max_epochs=4", "optim.early_stopping=null", "dataset.max_samples=400",
        "dataset.image_size=32", *QUICK]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    cwd = tmp_path_factory.mktemp("ref")
    res = run_cli([*ARGS, f"hydra.run.dir={cwd / 'run'}"], cwd=cwd,
                  env={"EFFBENCH_CACHE_DIR": str(cwd / "cache")})
    assert res.returncode == 0, res.stderr[-2000:]
    return _summary(cwd / "run")


def _epochs_saved(last: Path) -> Callable[[], bool]:
    """True once ``last.ckpt`` has been written twice (after epochs 1 and 2 of 4)."""
    seen: set[int] = set()

    def ready() -> bool:
        try:
            seen.add(last.stat().st_mtime_ns)
        except FileNotFoundError:
            pass
        return len(seen) >= 2

    return ready


def _compare_header(*dirs: Path, cwd: Path) -> str:
    res = run_compare([*map(str, dirs), "--no-plots", "--out", str(cwd / "cmp")], cwd,
                      timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["setup", "training", "testing"])
def test_kill_9_then_continue_matches_uninterrupted(moment: str, reference: dict,
                                                    tmp_path: Path) -> None:
    """kill -9 during set-up, after 2 of 4 validated epochs, and while the best checkpoint is
    tested: the folder keeps a `running` summary (effbench-compare: incomplete) and, from training
    on, a complete last.ckpt; the same command (with resume=last.ckpt once there is one) ends with
    the uninterrupted run's numbers."""
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    marker = tmp_path / "testing"
    env = {"PYTHONPATH": f"{Path(__file__).parent / 'faults'}{os.pathsep}"
                         f"{os.environ.get('PYTHONPATH', '')}",
           "EFFBENCH_FAULT_PAUSE_TEST": str(marker)}
    ready = {"setup": (run_dir / "summary.json").is_file, "training": _epochs_saved(last),
             "testing": marker.is_file}[moment]
    proc = _start([*ARGS, f"hydra.run.dir={run_dir}"], tmp_path, env=env,
                  fresh=moment == "training")
    assert _kill_when(proc, ready), "finished before it could be killed"
    left = _summary(run_dir)
    assert left["status"] == "running"
    if moment == "setup":
        assert not last.exists()
        again = [*ARGS, f"hydra.run.dir={run_dir}"]
    else:
        import torch

        epoch = torch.load(last, weights_only=True, map_location="cpu")["epoch"]
        # mid-training: 1 or 2 epochs in, never the last; testing: all 4 epochs saved
        assert (epoch in (0, 1, 2)) if moment == "training" else epoch == 3
        again = [*ARGS, f"hydra.run.dir={run_dir}", f"resume={last}"]
    if moment == "training":  # a run killed outright is listed, as incomplete
        ref_dir = Path(reference["run_dir"])
        assert "2 runs (1 completed, 0 failed, 1 incomplete)" in _compare_header(
            ref_dir, run_dir, cwd=tmp_path)
    res = run_cli(again, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    done = _summary(run_dir)
    assert done["status"] == "completed"
    assert done["epochs"] == reference["epochs"] == 4
    assert done["metrics"] == pytest.approx(reference["metrics"], abs=1e-6)
    assert done["best_val"]["epoch"] == reference["best_val"]["epoch"]


@pytest.mark.slow
def test_kill_during_feature_extraction_then_rerun_matches(tmp_path: Path) -> None:
    """kill -9 after the BN statistics and the first split's features are cached, before the
    other splits are extracted (tests/faults: the job waits there): the cache keeps whole entries
    only, and the same command again completes with an uninterrupted run's numbers."""
    args = ["strategy=precomputed", "backbone=resnet18", "backbone.weights=null",
            "dataset.image_size=32", "dataset.max_samples=400", "trainer.max_epochs=3", *QUICK]
    cache = tmp_path / "cache"
    marker = tmp_path / "extracting"
    env = {"EFFBENCH_CACHE_DIR": str(cache), "EFFBENCH_FAULT_PAUSE_EXTRACT": str(marker),
           "PYTHONPATH": f"{Path(__file__).parent / 'faults'}{os.pathsep}"
                         f"{os.environ.get('PYTHONPATH', '')}"}
    proc = _start(args, tmp_path / "killed", env=env)
    assert _kill_when(proc, marker.is_file), "finished before it could be killed"
    # The BN entry and one split's features, each whole; the other splits never started.
    assert len(list((cache / "features").glob("*.pt"))) == 2
    assert not list((cache / "features").glob("*.tmp"))
    rerun = run_cli(args, cwd=tmp_path / "killed", env={"EFFBENCH_CACHE_DIR": str(cache)})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    fresh = run_cli(args, cwd=tmp_path / "fresh",
                    env={"EFFBENCH_CACHE_DIR": str(tmp_path / "cache2")})
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    # the killed run's folder keeps its `running` summary; the rerun has its own folder
    by_status = sorted((json.loads(p.read_text()) for p in
                        (tmp_path / "killed").rglob("summary.json")), key=lambda s: s["status"])
    assert [s["status"] for s in by_status] == ["completed", "running"]
    killed_s = by_status[0]
    [fresh_s] = [json.loads(p.read_text()) for p in (tmp_path / "fresh").rglob("summary.json")]
    assert killed_s["status"] == fresh_s["status"] == "completed"
    assert killed_s["metrics"] == pytest.approx(fresh_s["metrics"], abs=1e-6)


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` and its bytes. Hydra's own ``cli.log`` is left out: it logs
    every command started in the folder, refused ones included; the run's records are all here."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "cli.log"}


def _one_sentence(res: subprocess.CompletedProcess, *parts: str) -> str:
    assert res.returncode != 0
    assert "Traceback" not in res.stdout + res.stderr, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("effbench:")]
    assert len(lines) == 1, res.stderr[-3000:]
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def completed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("done")
    res = run_cli([*TINY, f"hydra.run.dir={cwd / 'run'}"], cwd=cwd,
                  env={"EFFBENCH_CACHE_DIR": str(cwd / "cache")})
    assert res.returncode == 0, res.stderr[-2000:]
    return cwd / "run"


@pytest.mark.parametrize(("case", "extra", "named"), [
    ("not a checkpoint", ["resume={run}/summary.json"], "resume="),
    ("another backbone", ["resume={run}/checkpoints/last.ckpt", "backbone=cifar_cnn14"],
     "checkpoint of another model"),
    ("bad lr", ["resume={run}/checkpoints/last.ckpt", "optim.optimizer.lr=-1"], "lr"),
    ("inside the completed run", ["hydra.run.dir={run}/inner"], "inside the completed run"),
])
def test_refused_resume_in_place_changes_nothing(case: str, extra: list[str], named: str,
                                                 completed_run: Path, tmp_path: Path) -> None:
    """Resuming a completed run in place with a bad value, or starting a new run inside it: one
    sentence, and the completed run's folder is byte for byte as it was."""
    before = _snapshot(completed_run)
    args = [a.format(run=completed_run) for a in extra]
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={completed_run}")
    _one_sentence(run_cli([*TINY, *args], cwd=tmp_path), named)
    assert _snapshot(completed_run) == before, case
    assert not (completed_run / "inner").exists()


@pytest.mark.parametrize("fault", ["file-size limit", "EROFS", "ENOSPC"])
def test_failed_writes_one_sentence_no_temp_files(fault: str, tmp_path: Path) -> None:
    """A checkpoint that cannot be written (a full disk, a folder gone read-only, a file-size
    limit): the run fails in one sentence naming the file, no traceback, no temp file left."""
    run_dir = tmp_path / "run"
    env, fsize = {}, None
    if fault == "file-size limit":  # the kernel refuses writes past 4 MB (EFBIG): a real write
        fsize = 4 << 20
    else:
        env.update(PYTHONPATH=f"{Path(__file__).parent / 'faults'}{os.pathsep}"
                              f"{os.environ.get('PYTHONPATH', '')}", EFFBENCH_FAULT_WRITE=fault)
    proc = start_cli([*TINY, f"hydra.run.dir={run_dir}"], tmp_path, env=env, fsize=fsize)
    out, err = proc.communicate(timeout=600)
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    line = _one_sentence(res, "cannot write", "checkpoints", "hydra.run.dir=")
    assert res.returncode == 1, line
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


def test_a_completed_sweep_folder_is_never_rewritten(tmp_path: Path) -> None:
    """A sweep into the folder of an earlier sweep (Hydra would rewrite its multirun.yaml), and a
    single run into a sweep's folder: one sentence each, the sweep's folder byte for byte."""
    sweep = tmp_path / "sweep"
    res = run_cli(["-m", *TINY, f"hydra.sweep.dir={sweep}", "seed=0"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (sweep / "multirun.yaml").is_file()
    before = _snapshot(sweep)
    again = run_cli(["-m", *TINY, f"hydra.sweep.dir={sweep}", "seed=0,1"], cwd=tmp_path)
    _one_sentence(again, f"hydra.sweep.dir={sweep} already holds a sweep")
    into_root = run_cli([*TINY, f"hydra.run.dir={sweep}"], cwd=tmp_path)
    _one_sentence(into_root, "is the folder of a sweep")
    assert _snapshot(sweep) == before
