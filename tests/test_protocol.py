"""What the studies measure: the multilabel headline, energy per phase, whole-image resizing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
