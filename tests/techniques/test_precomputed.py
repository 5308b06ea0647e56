"""``precomputed``: BN adaptation + cached features + head, end to end and across a sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from effbench import pipeline
from effbench.backbones.base import Backbone
from effbench.run import build_run
from effbench.techniques.precomputed.cache import FeatureCache
from tests.conftest import TINY, compose_cfg, load_summary, run_cli, run_job

# ResNet-18 (random init, it has BatchNorm) at 16 px keeps every job to seconds on a CPU.
PRE = ["strategy=precomputed", "backbone=resnet18", "backbone.weights=null",
       "dataset.resolution=16", "dataset.image_size=16"]


@pytest.mark.parametrize("multilabel", [False, True], ids=["multiclass", "multilabel"])
def test_end_to_end(tmp_path: Path, multilabel: bool) -> None:
    summary = run_job(tmp_path, [*PRE, f"dataset.multilabel={str(multilabel).lower()}"])
    assert summary["status"] == "completed", summary["error"]
    s = load_summary(tmp_path / "run")
    assert set(s["time_s"]) >= {"setup", "bn_adapt", "extract", "train", "eval", "total"}
    st = s["strategy"]["precomputed"]
    assert st["cache_hit"] is False and not any(st["cache"]["hits"].values())
    bn = st["bn_adaptation"]
    # EMA statistics (default): passes until the change < threshold, or bn_max_passes; each pass
    # recorded with its relative change.
    assert 1 <= bn["passes"] <= 10 and len(bn["changes"]) == bn["passes"]
    assert bn["converged"] == (bn["passes"] < 10 or (bn["changes"][-1] or 1) < 0.01)
    assert not bn["from_cache"] and bn["time_s"] > 0
    assert all(Path(p).is_file() for p in st["cache"]["paths"].values())
    # Only the head trains; the model is the adapted backbone + the MLP head.
    assert s["model"]["params_trainable"] == s["model"]["head_params"] < s["model"]["params_total"]
    for key in ["test/acc", "test/f1_macro", "test/auroc_macro"]:
        assert 0.0 <= s["metrics"][key] <= 1.0, key
    assert set(s["per_class"]["test/auroc_per_class"]) == {f"class_{i}" for i in range(4)}
    assert s["data"]["task"] == ("multilabel" if multilabel else "multiclass")
    assert s["epochs"] == 2 and s["best_val"]["val/loss"] > 0
    # Learning curves: one row per head epoch in the run's CSV log.
    rows = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()
    assert "val/loss" in rows[0] and "train/loss" in rows[0] and len(rows) >= 3


def test_head_learns(tmp_path: Path) -> None:
    summary = run_job(tmp_path, [*PRE, "trainer.max_epochs=10", "dataset.num_train=256"])
    assert summary["status"] == "completed", summary["error"]
    assert summary["metrics"]["test/acc"] > 0.6  # 4 classes: chance is 0.25


def test_second_job_hits_the_cache_and_never_runs_the_backbone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = run_job(tmp_path / "a", PRE)  # tests the live adapted backbone + head on images
    calls: list[int] = []
    forward = Backbone.forward
    monkeypatch.setattr(Backbone, "forward", lambda self, x: calls.append(1) or forward(self, x))
    second = run_job(tmp_path / "b", [*PRE, "strategy.precomputed.eval_on=features"])
    third = run_job(tmp_path / "c", [*PRE, "strategy.precomputed.eval_on=features",
                                     "optim.optimizer.lr=1e-4",
                                     "strategy.precomputed.hidden=64"])
    assert calls == []
    assert first["strategy"]["precomputed"]["cache_hit"] is False
    for job in (second, third):
        assert job["status"] == "completed", job["error"]
        assert job["strategy"]["precomputed"]["cache_hit"] is True
        assert all(job["strategy"]["precomputed"]["cache"]["hits"].values())
        keys = job["strategy"]["precomputed"]["cache"]["keys"]
        assert keys == first["strategy"]["precomputed"]["cache"]["keys"]
        assert job["strategy"]["precomputed"]["bn_adaptation"]["from_cache"]
    # Same head recipe on cached features ≡ the final model's live forward on the test images.
    assert second["metrics"] == pytest.approx(first["metrics"], abs=1e-6)


def test_cached_features_equal_a_live_eval_forward(tmp_path: Path) -> None:
    cfg = compose_cfg([*TINY, *PRE])
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    ctx = build_run(cfg, tmp_path)
    strategy = ctx.techniques[0]
    strategy.configure_model(ctx)
    pipeline.fit(ctx, ctx.techniques, ctx.recipe)
    dm, backbone = ctx.datamodule, ctx.system.backbone.eval()
    for split in ("train", "test"):
        cached = FeatureCache(cfg.cache_dir).load(ctx.extra["precomputed"]["cache"]["keys"][split])
        images = dm.datasets[split].images
        with torch.no_grad():
            live = backbone(dm.normalize(images))
        assert torch.allclose(cached["features"], live, atol=1e-5), split
        assert torch.equal(cached["labels"], dm.labels[split])


def test_truncated_cache_file_is_rebuilt(tmp_path: Path) -> None:
    first = run_job(tmp_path / "a", PRE)
    path = Path(first["strategy"]["precomputed"]["cache"]["paths"]["train"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    second = run_job(tmp_path / "b", PRE)
    assert second["status"] == "completed", second["error"]
    hits = second["strategy"]["precomputed"]["cache"]["hits"]
    assert hits == {"bn": True, "train": False, "val": True, "test": True}
    assert FeatureCache(path.parents[1]).load(path.stem) is not None  # whole again
    assert second["metrics"] == pytest.approx(first["metrics"], abs=1e-6)


def test_backbone_without_batchnorm_skips_adaptation(tmp_path: Path) -> None:
    summary = run_job(tmp_path, ["strategy=precomputed", "backbone=small_cnn"])
    assert summary["status"] == "completed", summary["error"]
    bn = summary["strategy"]["precomputed"]["bn_adaptation"]
    assert bn["passes"] == 0 and "no BatchNorm" in bn["skipped"]


def test_linear_head_and_no_ambiguity_weighting(tmp_path: Path) -> None:
    summary = run_job(tmp_path, [*PRE, "strategy.precomputed.head=linear",
                                 "strategy.precomputed.ambiguity_weight=0"])
    assert summary["status"] == "completed", summary["error"]
    assert summary["model"]["head_params"] == 512 * 4 + 4


@pytest.mark.parametrize(("setting", "threads"), [("auto", 1), ("null", 2), ("2", 2)])
def test_head_trains_with_the_threads_it_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 setting: str, threads: int) -> None:
    """``head_threads=auto`` trains the head on one CPU thread whatever hardware.cpu_threads gives
    the backbone passes; null leaves the hardware's; the summary says which it was."""
    from effbench.techniques.precomputed import technique

    seen: list[int] = []
    train_head = technique.train_head

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return train_head(*args, **kwargs)

    monkeypatch.setattr(technique, "train_head", spy)
    before = torch.get_num_threads()
    try:  # the run sets this process's threads (hardware.cpu_threads=2): give them back
        summary = run_job(tmp_path, [*PRE, "hardware.cpu_threads=2",
                                     f"strategy.precomputed.head_threads={setting}"])
    finally:
        torch.set_num_threads(before)
    assert summary["status"] == "completed", summary["error"]
    assert seen == [threads]
    assert summary["strategy"]["precomputed"]["head_threads"] == threads


@pytest.mark.parametrize(("override", "named"), [
    ("strategy.precomputed.head_threads=many", "strategy.precomputed.head_threads='many'"),
    ("strategy.precomputed.head=deep", "strategy.precomputed.head='deep'"),
    ("strategy.precomputed.bn_momentum=2", "strategy.precomputed.bn_momentum=2"),
    ("strategy.precomputed.bn_max_passes=0", "strategy.precomputed.bn_max_passes=0"),
    ("strategy.precomputed.eval_on=images", "strategy.precomputed.eval_on='images'"),
    ("strategy.precomputed.bn_shuffle_seed=-1", "strategy.precomputed.bn_shuffle_seed=-1"),
])
def test_bad_values_are_one_clear_sentence(tmp_path: Path, override: str, named: str) -> None:
    summary = run_job(tmp_path, ["strategy=precomputed", override])
    assert summary["status"] == "failed" and named in summary["error"]


@pytest.mark.slow
def test_cli_sweep_extracts_once(tmp_path: Path) -> None:
    """A real ``effbench -m`` sweep: the first job extracts, every later job loads the cache."""
    cache = tmp_path / "shared-cache"
    args = ["-m", *PRE, "optim.optimizer.lr=1e-3,1e-4", "strategy.precomputed.hidden=32,64", *TINY,
            "hydra.sweep.dir=sweep"]
    result = run_cli(args, cwd=tmp_path, env={"EFFBENCH_CACHE_DIR": str(cache)})
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob(
        "*/summary.json"))]
    assert len(summaries) == 4 and all(s["status"] == "completed" for s in summaries)
    hits = [s["strategy"]["precomputed"]["cache_hit"] for s in summaries]
    assert hits == [False, True, True, True]
    assert len(list((cache / "features").glob("*.pt"))) == 4  # BN state + 3 splits, once


@pytest.mark.slow
def test_concurrent_jobs_share_one_extraction(tmp_path: Path) -> None:
    """Two jobs at once (joblib launcher, separate processes): one extracts, the other waits on
    the cache lock and loads; the cache ends up whole, without temp files."""
    cache = tmp_path / "shared-cache"
    args = ["-m", *PRE, "optim.optimizer.lr=1e-3,1e-4", *TINY, "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2", "hydra.sweep.dir=sweep"]
    result = run_cli(args, cwd=tmp_path, env={"EFFBENCH_CACHE_DIR": str(cache)})
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/summary.json")]
    assert all(s["status"] == "completed" for s in summaries) and len(summaries) == 2
    assert sorted(s["strategy"]["precomputed"]["cache_hit"] for s in summaries) == [False, True]
    assert len(list((cache / "features").glob("*.pt"))) == 4
    assert not list((cache / "features").glob("*.tmp"))
