"""A cache hit is charged the features it reused: a warm re-run reports the saving of the cold run
(per run, effbench-compare's default), or shares the build (``--amortize``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from effbench.compare.cli import run as compare_run
from effbench.run import run_overrides
from tests.conftest import TINY

NET = ["backbone=resnet18", "backbone.weights=null", "dataset.resolution=16",
       "dataset.image_size=16"]


def _compare(tmp_path: Path, name: str, runs: list[Path], *flags: str) -> pd.DataFrame:
    out = tmp_path / name
    assert compare_run([*map(str, runs), "--out", str(out), "--no-plots", *flags]) == 0
    return pd.read_csv(out / "compare.csv"), pd.read_csv(out / "runs.csv"), (
        out / "compare.md").read_text()


def test_cold_and_warm_runs_report_the_same_saving(tmp_path: Path) -> None:
    base = tmp_path / "finetune"
    run_overrides([*TINY, *NET, "strategy=finetune"], base)
    cold, warm = tmp_path / "cold", tmp_path / "warm"
    first = run_overrides([*TINY, *NET, "strategy=precomputed"], cold)
    second = run_overrides([*TINY, *NET, "strategy=precomputed"], warm)
    assert second["strategy"]["precomputed"]["fast_path"]["used"]
    cache = second["strategy"]["precomputed"]["cache"]
    built = first["time_s"]["bn_adapt"] + first["time_s"]["extract"]
    # The hit job records what it was spared and who built it; the builder its own cost.
    assert cache["hit"] is True and cache["built_by"] == str(cold)
    # (the entries time the work itself; the builder's phases also hold cache reads and writes)
    assert sum(cache["spared_s"].values()) == pytest.approx(built, rel=0.1, abs=0.2)
    assert sum(first["strategy"]["precomputed"]["cache"]["spared_s"].values()) == 0
    assert f"features built in {sum(cache['built_s'].values()):.1f} s by {cold}" in \
        second["headline"]
    assert "BN statistics loaded" in second["headline"] and "BN passes" not in second["headline"]

    speedups = {}
    for name, run in (("c", cold), ("w", warm)):
        table, runs, text = _compare(tmp_path, name, [base, run])
        speedups[name] = float(table.loc[table["strategy"] == "precomputed", "speedup"].iloc[0])
        assert "cost view: per run" in text
        charged = float(runs.loc[runs["run_dir"] == str(run)].iloc[0]["train_s"])
        # Per run, both rows cost the build + their own head training (whose seconds jitter).
        own = (first if run == cold else second)["time_s"]
        paid = built if run == cold else sum(cache["spared_s"].values())
        assert charged == pytest.approx(paid + own["train"], abs=1e-6), name
        # The speed-up is the baseline's time over that charged cost (before, the warm row
        # divided by the head's time alone: ×12.9 where the cold run said ×3.2). Comparing the
        # two rows' speed-ups instead would compare two head trainings' jitter.
        baseline = float(runs.loc[runs["run_dir"] == str(base)].iloc[0]["train_s"])
        assert speedups[name] == pytest.approx(baseline / charged, rel=0.01), name

    # Amortised: the build shared by the two jobs that used it, and said so.
    _, runs, text = _compare(tmp_path, "a", [base, cold, warm], "--amortize")
    assert "cost view: amortised" in text
    share = sum(cache["built_s"].values()) / 2
    for run, summary in ((cold, first), (warm, second)):
        row = runs.loc[runs["run_dir"] == str(run)].iloc[0]
        assert row["train_s"] == pytest.approx(summary["time_s"]["train"] + share, abs=0.2)
