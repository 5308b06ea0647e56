"""``strategy.precomputed.probes``: k-NN and logistic-regression probes on the cached features say
how separable the features are (near 1 on separable clusters, chance on random labels), run on
a cache miss, a cache hit and in batched sweeps alike, and give the same numbers either way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from effbench.task import MULTICLASS, MULTILABEL
from effbench.techniques.precomputed import probes
from effbench.techniques.precomputed.probes import ProbeOptions, probe, run_probes
from tests.conftest import TINY, load_summary, run_cli
from tests.helpers.cli import one_error_line

BOTH = ProbeOptions(("knn", "logreg"))
PRE = ["strategy=precomputed", "backbone=small_cnn", "strategy.precomputed.save_model=false",
       "trainer.max_epochs=1", "strategy.precomputed.probes=[knn,logreg]"]
METRICS = {f"{s}/{m}" for s in ("val", "test") for m in ("acc", "f1_macro", "auroc_macro")}


def _clusters(n: int, classes: int, dim: int = 16, gap: float = 8.0,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``classes`` Gaussian clusters (unit variance) whose centres lie ``gap`` apart, shifted
    off the origin so cosine distance sees them apart too."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centres = gap * torch.eye(classes, dim) + 10.0
    return centres[y] + torch.randn(n, dim, generator=g), y


def _splits(x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Half for training, a quarter each for val and test."""
    half, three = len(y) // 2, 3 * len(y) // 4
    return {"train": (x[:half], y[:half]), "val": (x[half:three], y[half:three]),
            "test": (x[three:], y[three:])}


@pytest.fixture(autouse=True)
def _fresh_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probes, "_DONE", {})  # no probe result carried over from another test


@pytest.mark.parametrize("name", ["knn", "logreg"])
def test_separable_features_score_near_one_and_random_labels_near_chance(name: str) -> None:
    x, y = _clusters(800, 3)
    good = probe(name, _splits(x, y), MULTICLASS, ["a", "b", "c"], BOTH)
    assert set(good["metrics"]) == METRICS
    assert good["metrics"]["test/acc"] > 0.97 and good["metrics"]["test/auroc_macro"] > 0.99
    # The same features with labels that carry no information: nothing to find.
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    chance = probe(name, _splits(x, shuffled), MULTICLASS, ["a", "b", "c"], BOTH)
    assert abs(chance["metrics"]["test/acc"] - 1 / 3) < 0.1
    assert abs(chance["metrics"]["test/auroc_macro"] - 0.5) < 0.1
    assert good["fit_s"] >= 0 and good["train_vectors"] == 400 and good["test_vectors"] == 200


@pytest.mark.parametrize("name", ["knn", "logreg"])
def test_multilabel_probes_score_each_label(name: str) -> None:
    """Each label is one cluster's presence (two per image); a constant label is tolerated."""
    x, y = _clusters(800, 4)
    labels = torch.stack([(y == 0) | (y == 1), (y == 1) | (y == 2), (y == 3),
                          torch.zeros_like(y, dtype=torch.bool)], 1).float()
    out = probe(name, _splits(x, labels), MULTILABEL, ["a", "b", "c", "never"], BOTH)
    # The constant label is scored as the head's would be (torchmetrics' AUROC of a label with
    # no positive is 0), so check the three labels that carry information through accuracy.
    assert out["metrics"]["test/acc"] > 0.97
    if name == "logreg":
        assert out["options"]["per_label"] and out["options"]["constant_labels"] == 1


def test_k_above_the_training_set_uses_all_of_it_and_says_so() -> None:
    x, y = _clusters(40, 2)
    out = probe("knn", _splits(x, y), MULTICLASS, ["a", "b"], ProbeOptions(("knn",), knn_k=500))
    assert out["options"]["k"] == 500 and out["options"]["k_used"] == 20


def test_a_later_job_on_the_same_features_reuses_the_probes() -> None:
    feats = _splits(*_clusters(200, 2))
    source = {"keys": {"train": "t", "val": "v", "test": "s"}, "test_rows": 50}
    first = run_probes(feats, MULTICLASS, ["a", "b"], BOTH, source, "run-a")
    again = run_probes(feats, MULTICLASS, ["a", "b"], BOTH, source, "run-b")
    other = run_probes(feats, MULTICLASS, ["a", "b"], BOTH, {**source, "test_rows": 40}, "run-c")
    for name in ("knn", "logreg"):
        assert first[name]["reused_from"] is None and first[name]["computed_by"] == "run-a"
        assert again[name]["reused_from"] == "run-a"
        assert again[name]["metrics"] == first[name]["metrics"]
        assert other[name]["reused_from"] is None  # other test rows: computed again
    assert probes.headline(again, MULTICLASS).endswith("by run-a)")


def _run(tmp_path: Path, name: str, extra: list[str] | None = None) -> dict:
    res = run_cli([*TINY, *PRE, *(extra or []), f"hydra.run.dir={tmp_path / name}"],
                  cwd=tmp_path, env={"EFFBENCH_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-3000:]
    return load_summary(tmp_path / name)


def test_a_run_records_both_probes_and_a_cache_hit_the_same_numbers(tmp_path: Path) -> None:
    miss, hit = _run(tmp_path, "miss"), _run(tmp_path, "hit")
    assert not miss["strategy"]["precomputed"]["cache_hit"]
    assert hit["strategy"]["precomputed"]["fast_path"]["used"]
    for s in (miss, hit):
        found = s["strategy"]["precomputed"]["probes"]
        assert set(found) == {"knn", "logreg"}
        for record in found.values():
            assert set(record["metrics"]) == METRICS
            assert all(0 <= v <= 1 for v in record["metrics"].values())
            assert record["reused_from"] is None  # its own process: computed, not reused
        assert s["time_s"]["probes"] > 0
        assert "probes: knn test acc" in s["headline"]
    for name in ("knn", "logreg"):  # same config + seed: same numbers, whatever was cached
        a, b = (s["strategy"]["precomputed"]["probes"][name] for s in (miss, hit))
        assert a["metrics"] == b["metrics"] and a["options"] == b["options"]
    assert miss["metrics"] == hit["metrics"]


def test_no_probes_by_default(tmp_path: Path) -> None:
    res = run_cli([*TINY, "strategy=precomputed", "backbone=small_cnn", "trainer.max_epochs=1",
                   f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    s = load_summary(tmp_path / "run")
    assert s["strategy"]["precomputed"]["probes"] == {} and "probes" not in s["time_s"]
    assert "probes:" not in s["headline"]


def test_a_batched_sweep_runs_the_probes_in_every_job(tmp_path: Path) -> None:
    """``hydra/launcher=batched_heads``: every job records the probes; the first one fits them
    and the jobs on the same features take its results."""
    args = ["-m", *TINY, *PRE, "optim.optimizer.lr=1e-3,1e-2,3e-3", "hydra/launcher=batched_heads",
            "hydra.sweep.dir=sweep"]
    res = run_cli(args, cwd=tmp_path, env={"EFFBENCH_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-3000:]
    summaries = sorted((json.loads(p.read_text()) for p in (tmp_path / "sweep").glob(
        "*/summary.json")), key=lambda s: s["run_dir"])
    assert [s["strategy"]["precomputed"].get("batched", {}).get("heads") for s in summaries] \
        == [None, 2, 2]
    first = summaries[0]["strategy"]["precomputed"]["probes"]
    assert set(first) == {"knn", "logreg"} and first["knn"]["reused_from"] is None
    for s in summaries[1:]:
        got = s["strategy"]["precomputed"]["probes"]
        assert {n: r["metrics"] for n, r in got.items()} == {
            n: r["metrics"] for n, r in first.items()}
        assert all(r["reused_from"] == summaries[0]["run_dir"] for r in got.values())


@pytest.mark.parametrize(("override", "named"), [
    ("strategy.precomputed.probes=[svm]", "probes=[svm]: 'svm' is not a probe"),
    ("strategy.precomputed.probes=[knn,knn]", "a probe is named twice"),
    ("strategy.precomputed.probe_knn_k=0", "strategy.precomputed.probe_knn_k=0"),
    ("strategy.precomputed.probe_logreg_c=0", "strategy.precomputed.probe_logreg_c=0"),
    ("strategy.precomputed.probe_logreg_c=-1.5", "strategy.precomputed.probe_logreg_c=-1.5"),
    ("strategy.precomputed.probe_logreg_max_iter=0", "probe_logreg_max_iter=0"),
])
def test_bad_probe_values_are_one_sentence_with_the_fix(tmp_path: Path, override: str,
                                                        named: str) -> None:
    res = run_cli([*TINY, "strategy=precomputed", "backbone=small_cnn", override], cwd=tmp_path)
    line = one_error_line(res)
    assert named in line and "such as strategy.precomputed." in line


def test_a_run_without_probes_does_not_import_their_estimators() -> None:
    """Probes are off by default: their scikit-learn estimators (0.3–0.4 s of imports) are
    imported where a probe is fitted, not by every precomputed run."""
    import subprocess
    import sys

    code = ("import sys, effbench.techniques.precomputed.technique; "
            "print(sorted(m for m in ('sklearn.neighbors', 'sklearn.linear_model') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
