"""The report and the saved model say what happened: a cache hit ran no BN pass, the head's
count is feature vectors × epochs, a random-init model names no weights as its own, and
``frozen_stages`` reads as the user set it."""

from __future__ import annotations

import json
from pathlib import Path

from effbench.run import run_overrides
from tests.conftest import ROOT, TINY
from tests.helpers.cli import run_eval

NET = ["backbone=resnet18", "backbone.weights=null", "dataset.resolution=16",
       "dataset.image_size=16"]


def test_precomputed_report_and_saved_model_labels(tmp_path: Path) -> None:
    cold = run_overrides([*TINY, *NET, "strategy=precomputed"], tmp_path / "cold")
    warm = run_overrides([*TINY, *NET, "strategy=precomputed"], tmp_path / "warm")
    assert cold["status"] == warm["status"] == "completed", (cold["error"], warm["error"])
    # Was "head trained on 192 feature vectors": 96 training vectors seen in each of 2 epochs.
    for summary in (cold, warm):
        assert "head trained 2 epochs on 96 feature vectors" in summary["headline"]
    assert "cache miss: features built here in" in cold["headline"]
    assert "BN passes" in cold["headline"]
    # Was "BN passes 5" on a hit, where none ran.
    assert "BN passes" not in warm["headline"]
    assert "BN statistics loaded (adapted there in" in warm["headline"]
    assert f"by {tmp_path / 'cold'}" in warm["headline"]
    # Was "torchvision weights ResNet18_Weights.IMAGENET1K_V1" for a random-init model.
    manifest = json.loads((tmp_path / "cold" / "model" / "manifest.json").read_text())
    assert "random initialisation" in manifest["preprocessing"]["source"]
    # Was "(network, made by default in strategy=precomputed)".
    res = run_eval([str(tmp_path / "cold")], ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "(network: backbone + head as trained, strategy=precomputed)" in res.stdout
    assert "made by default" not in res.stdout


def test_frozen_stages_read_as_set(tmp_path: Path) -> None:
    summary = run_overrides([*TINY, *NET, "strategy=freeze", "strategy.freeze.frozen_stages=2",
                             "trainer.max_epochs=1"], tmp_path / "run")
    assert summary["status"] == "completed", summary["error"]
    # Was "frozen stages 3/5" (the stem counted as a stage) for frozen_stages=2.
    assert "frozen stem + 2/4 blocks" in summary["headline"]
