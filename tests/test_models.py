"""Models you can keep: a run's checkpoint is the next run's backbone weights, and the learning
rate is on record every epoch."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from effbench.backbones import build_backbone
from tests.conftest import run_cli
from tests.helpers.tiny import tiny

TINY = tiny(epochs=2)


def _summary(root: Path) -> dict:
    [path] = list((root / "outputs").rglob("summary.json"))
    return json.loads(path.read_text())


def test_checkpoint_of_one_run_is_the_backbone_of_the_next(tmp_path: Path) -> None:
    res = run_cli([*TINY, "strategy=prune", "strategy.prune.end=1"], cwd=tmp_path / "a")
    assert res.returncode == 0, res.stderr[-2000:]
    ckpt = Path(_summary(tmp_path / "a")["run_dir"]) / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    backbone = build_backbone("small_cnn", weights=str(ckpt), image_size=32)
    for name, tensor in backbone.state_dict().items():
        if f"backbone.{name}" in state:
            assert torch.equal(tensor, state[f"backbone.{name}"]), name
        else:  # a pruned weight: stored as weight_orig × weight_mask
            orig, mask = state[f"backbone.{name}_orig"], state[f"backbone.{name}_mask"]
            assert torch.equal(tensor, orig * mask), name
    res = run_cli([*TINY, f"backbone.weights={ckpt}"], cwd=tmp_path / "b")
    assert res.returncode == 0, res.stderr[-2000:]
    assert _summary(tmp_path / "b")["status"] == "completed"


def test_learning_rate_is_logged_every_epoch(tmp_path: Path) -> None:
    res = run_cli(TINY, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    run_dir = Path(_summary(tmp_path)["run_dir"])
    with (run_dir / "csv" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if any(k.startswith("lr-") and r[k] for k in r)]
    assert len(rows) == 2
