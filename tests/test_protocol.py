"""What the studies measure: the multilabel headline, energy per phase, whole-image resizing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import TINY_MULTILABEL, run_cli


def compare_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effbench.compare.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


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
    # int8 conversion is its own phase, never inside train's figure.
    assert set(energy["phases_kwh"]) - {"other"} == set(times) - {"setup", "total"}
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
