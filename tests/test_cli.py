"""The ``effbench`` command as a user types it: default run, introspection, DDP, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli

QUICK = ["trainer.enable_progress_bar=false", "tracking.energy=false"]
TINY = ["dataset=synthetic", "dataset.num_train=64", "dataset.num_val=32", "dataset.num_test=32",
        "trainer.max_epochs=1", *QUICK]


def summaries(cwd: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((cwd / "outputs").rglob("summary.json"))]


def test_default_run_writes_everything(tmp_path: Path) -> None:
    res = run_cli(["trainer.max_epochs=1", *QUICK], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "completed" in res.stdout and "test acc" in res.stdout
    [summary] = summaries(tmp_path)
    assert summary["status"] == "completed"
    assert summary["choices"]["dataset"] == "digits"
    assert summary["choices"]["backbone"] == "small_cnn"
    run_dir = Path(summary["run_dir"])
    assert run_dir.parent == tmp_path / "outputs"
    # Run dirs say what ran: time + strategy + backbone + dataset.
    assert run_dir.name.endswith("_finetune_small_cnn_digits")
    assert (run_dir / "csv" / "metrics.csv").is_file()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert summary["env"]["git_commit"] is None or len(summary["env"]["git_commit"]) == 40


def test_help_and_cfg(tmp_path: Path) -> None:
    res = run_cli(["--help"], cwd=tmp_path)
    assert res.returncode == 0
    for group in ["dataset:", "backbone:", "strategy:", "hardware:"]:
        assert group in res.stdout
    assert "small_cnn" in res.stdout and "finetune" in res.stdout
    res = run_cli(["--cfg", "job", "optim.optimizer.lr=0.01"], cwd=tmp_path)
    assert res.returncode == 0 and "lr: 0.01" in res.stdout and "max_epochs" in res.stdout


def test_ddp_two_processes_one_summary(tmp_path: Path) -> None:
    res = run_cli(["hardware=cpu", "trainer.devices=2", "trainer.strategy=ddp", *TINY],
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    [summary] = summaries(tmp_path)
    assert summary["status"] == "completed"
    assert summary["hardware"]["world_size"] == 2


def _bad_weights(tmp_path: Path) -> str:
    from effbench.backbones import build_backbone

    path = tmp_path / "cifar_cnn14.pt"
    torch.save(build_backbone("cifar_cnn14").state_dict(), path)
    return str(path)


ERRORS = [
    (["strategy=nosuch"], "strategy"),
    (["optim.optimizer.lr=0"], "optim.optimizer.lr=0"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0"),
    (["dataset.image_size=4"], "dataset.image_size=4"),
    (["dataset=cifar10", "dataset.root=/nonexistent/cifar"], "cifar-10-batches-py"),
    (["backbone.weights=WEIGHTS"], "cifar_cnn14.pt"),
    (["dataset.val_ratio=0.6", "dataset.test_ratio=0.5"], "dataset.val_ratio"),
]
if not torch.cuda.is_available():
    ERRORS.append((["hardware=t4"], "hardware=t4 needs 1 CUDA GPU"))


@pytest.mark.parametrize(("args", "needle"), ERRORS, ids=[" ".join(a) for a, _ in ERRORS])
def test_bad_input_one_sentence_nonzero_exit(tmp_path: Path, args: list[str],
                                             needle: str) -> None:
    args = [a.replace("WEIGHTS", _bad_weights(tmp_path)) for a in args]
    base = TINY
    if any(a.startswith("dataset=") for a in args):  # another dataset: drop synthetic's keys
        base = [a for a in TINY if not a.startswith("dataset")]
    res = run_cli([*base, *args], cwd=tmp_path, timeout=300)
    assert res.returncode != 0
    assert needle in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def test_failed_run_leaves_earlier_runs_untouched(tmp_path: Path) -> None:
    assert run_cli(TINY, cwd=tmp_path).returncode == 0
    [first] = list((tmp_path / "outputs").rglob("summary.json"))
    before = first.read_bytes()
    assert run_cli([*TINY, "optim.optimizer.lr=-1"], cwd=tmp_path).returncode != 0
    assert first.read_bytes() == before
    statuses = sorted(s["status"] for s in summaries(tmp_path))
    assert statuses == ["completed", "failed"]
