"""What the studies measure: the multilabel headline, energy per phase, whole-image resizing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import TINY_MULTILABEL, run_cli
from tests.helpers.cli import run_compare


def compare_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_compare(args, cwd, timeout=300)


def one_summary(root: Path) -> dict:
    [path] = root.rglob("summary.json")
    return json.loads(path.read_text())


# -- multilabel data: macro AUROC, not per-label accuracy ------------------------------------
def test_multilabel_objective_and_headline_are_macro_auroc(tmp_path: Path) -> None:
    res = run_cli([*TINY_MULTILABEL, "trainer.max_epochs=1"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = one_summary(tmp_path / "outputs")
    # A sweeper (Optuna) receives this value: per-label accuracy at 0.5 is not a study's figure.
    assert summary["objective"]["metric"] == "val/auroc_macro"
    assert summary["objective"]["value"] == summary["best_val"]["val/auroc_macro"]
    assert "objective val/auroc_macro =" in res.stdout and "test auroc_macro" in res.stdout
    # The search-cost view picks each search's best job by the same default.
    out = compare_cli([str(tmp_path / "outputs"), "--search-cost", "strategy"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "best val/auroc_macro" in out.stdout


# -- energy per phase: Δ CO₂ over the phases of Δ time ----------------------------------------
def test_energy_per_phase_and_compare_co2_of_the_train_phases(tmp_path: Path) -> None:
    args = [a for a in TINY_MULTILABEL if a != "tracking.energy=false"]
    res = run_cli(["-m", "strategy=finetune,qat", *args, "trainer.max_epochs=1",
                   "tracking.energy=true"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    runs = {s["choices"]["strategy"]: s for s in
            (json.loads(p.read_text()) for p in (tmp_path / "outputs").rglob("summary.json"))}
    qat = runs["qat"]
    energy, times = qat["energy"], qat["time_s"]
    assert energy["kwh"] and energy["phases_kwh"]["train"] > 0, energy
    # Each timed phase after set-up (the tracker starts after it) has its energy, and only those:
    # int8 conversion is its own phase, never inside train's figure. The tracker's own start and
    # stop and the process's start-up are times outside every phase.
    outside = {"setup", "total", "energy_tracker", "startup"}
    assert set(energy["phases_kwh"]) - {"other"} == set(times) - outside
    assert {"train", "convert"} <= set(energy["phases_co2_kg"])
    assert sum(energy["phases_kwh"].values()) == pytest.approx(energy["kwh"], rel=1e-6)
    out = compare_cli([str(tmp_path / "outputs"), "--no-plots", "--out", str(tmp_path / "c")],
                      tmp_path)
    assert out.returncode == 0, out.stderr
    table = pd.read_csv(tmp_path / "c" / "compare.csv").set_index("strategy")
    train_co2 = {k: s["energy"]["phases_co2_kg"]["train"] for k, s in runs.items()}
    assert table.loc["qat", "train_co2_kg"] == pytest.approx(train_co2["qat"])
    assert table.loc["qat", "energy.co2_kg"] == pytest.approx(energy["co2_kg"])
    assert table.loc["qat", "d_co2_pct"] == pytest.approx(
        (train_co2["qat"] / train_co2["finetune"] - 1) * 100)


# -- dataset.resize: the whole image (Keras, studies 003/004) or torchvision's centre crop ------
def test_whole_resize_keeps_the_whole_image_crop_cuts_the_sides() -> None:
    import torch

    from effbench.backbones.base import Preprocessing
    from effbench.data.base import resize_crop

    # A 460×700 slide (BreakHis' shape) whose left and right 100 columns are marked.
    image = torch.full((1, 3, 460, 700), 128, dtype=torch.uint8)
    image[..., :100], image[..., -100:] = 0, 255
    pre = Preprocessing(crop_size=224, resize_size=256)
    crop = resize_crop(image, pre)[0]
    whole = resize_crop(image, pre.with_resize("whole"))[0]
    assert crop.shape == whole.shape == (3, 224, 224)
    # crop: short side to 256 → 389 px wide, centre 224 kept: the marked sides are gone.
    assert crop.min() > 100 and crop.max() < 200
    # whole: every column kept, squashed 700 → 224 (the sides become 32 px each).
    assert (whole[:, :, :28] < 10).all() and (whole[:, :, -28:] > 245).all()
    assert (whole[:, :, 40:184] == 128).all()


def test_resize_option_is_recorded_or_refused(tmp_path: Path) -> None:
    bad = run_cli([*TINY_MULTILABEL, "dataset.resize=squash"], cwd=tmp_path / "bad")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "dataset.resize='squash'" in bad.stderr and "use crop" in bad.stderr
    res = run_cli([*TINY_MULTILABEL, "trainer.max_epochs=1", "dataset.resize=whole"],
                  cwd=tmp_path / "good")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = one_summary(tmp_path / "good" / "outputs")
    assert summary["data"]["preprocessing"]["resize"] == "whole"
    assert json.loads((tmp_path / "good" / "outputs").glob("*/model/manifest.json").__next__()
                      .read_text())["preprocessing"]["resize"] == "whole"
