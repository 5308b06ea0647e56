"""``precomputed``'s cache-hit fast path: a hit decodes no image, builds and runs no backbone,
gives the miss job's numbers, and its lookup key misses whenever the content would change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import effbench.backbones
from effbench.backbones.base import Backbone
from effbench.data.synthetic import SyntheticDataModule
from effbench.run import build_run
from effbench.techniques.precomputed import lookup
from effbench.techniques.precomputed.cache import FeatureCache
from effbench.techniques.precomputed.technique import CachedBackbone, Precomputed
from tests.conftest import TINY, compose_cfg, run_job

PRE = ["strategy=precomputed", "backbone=resnet18", "backbone.weights=null",
       "dataset.resolution=16", "dataset.image_size=16"]


def _count(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_hit_decodes_no_image_runs_no_backbone_and_matches_the_miss(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    miss = run_job(tmp_path / "a", PRE)
    assert miss["status"] == "completed", miss["error"]
    m = miss["strategy"]["precomputed"]
    assert m["fast_path"]["used"] is False and m["equivalence"]["ok"]
    assert m["equivalence"]["test_images"] == 32 and m["equivalence"]["max_abs_logit_diff"] < 1e-4
    decoded = _count(monkeypatch, SyntheticDataModule, "load")
    built = _count(monkeypatch, effbench.backbones, "build_backbone")
    forwards = _count(monkeypatch, Backbone, "forward")
    # save_model=false: keeping the model is the one thing that builds a hit job's backbone.
    hit = run_job(tmp_path / "b", [*PRE, "strategy.precomputed.save_model=false"])
    assert hit["status"] == "completed", hit["error"]
    assert decoded == built == forwards == []
    h = hit["strategy"]["precomputed"]
    assert h["fast_path"]["used"] and h["cache_hit"] and h["equivalence"] == m["equivalence"]
    assert set(h["fixed_costs_s"]) >= {"lookup", "load", "setup", "eval"}
    # Same config and seed: the same numbers, whether the job computed or loaded.
    assert hit["metrics"] == miss["metrics"] and hit["best_val"] == miss["best_val"]
    assert hit["data"] == miss["data"] and hit["epochs"] == miss["epochs"]
    assert hit["model"]["params_total"] == miss["model"]["params_total"]
    assert abs(hit["model"]["size_bytes"] - miss["model"]["size_bytes"]) < 4096


def test_the_backbone_of_a_hit_is_rebuilt_as_the_run_built_it(tmp_path: Path) -> None:
    """``ensure_backbone``: same initial weights (checked against the cached digest) and the
    cached adapted BN statistics, so it reproduces the cached test features."""
    assert run_job(tmp_path / "a", PRE)["status"] == "completed"
    cfg = compose_cfg([*TINY, *PRE])
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    pl.seed_everything(int(cfg.seed), verbose=False)
    ctx = build_run(cfg, tmp_path / "b")
    strategy = ctx.techniques[0]
    assert isinstance(strategy, Precomputed) and isinstance(ctx.system.backbone, CachedBackbone)
    backbone = strategy.ensure_backbone(ctx).eval()
    assert strategy.ensure_backbone(ctx) is backbone  # idempotent
    dm = ctx.datamodule
    dm.setup()  # the labels-only datamodule decodes on demand
    key = strategy._hit.entry["keys"]["test"]
    cached = FeatureCache(cfg.cache_dir).load(key)["features"]
    with torch.no_grad():
        live = backbone(dm.normalize(dm.datasets["test"].images))
    assert torch.allclose(cached, live, atol=1e-5)


def _key(overrides: list[str], dataset_files: list[Path] | None = None) -> str | None:
    cfg = compose_cfg([*TINY, *PRE, *overrides])
    bn = instantiate(cfg.strategy.precomputed)._bn_settings(cfg.dataset.batch_size)
    parts = lookup.lookup_parts(cfg, dataset_files or [], SyntheticDataModule, bn)
    return lookup.lookup_key(parts) if parts else None


def test_the_lookup_key_misses_whenever_the_content_would_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = _key([])
    assert base == _key(["optim.optimizer.lr=0.1", "strategy.precomputed.hidden=8",
                         "dataset.num_workers=2", "dataset.eval_batch_size=7"])  # head-level
    for change in (["dataset.image_size=24"], ["strategy.precomputed.bn_threshold=0.5"],
                   ["strategy.precomputed.bn_adapt=false"], ["seed=1"],
                   ["strategy.precomputed.bn_shuffle_seed=1"], ["dataset.noise=0.5"],
                   ["backbone.normalize=false"], ["dataset.batch_size=16"]):
        assert _key(change) != base, change
    # Pretrained weights do not depend on the seed; random initialisation does.
    assert _key(["backbone.weights=imagenet"]) == _key(["backbone.weights=imagenet", "seed=1"])
    monkeypatch.setattr(lookup, "EXTRACTOR_VERSION", "test")
    assert _key([]) != base
    monkeypatch.undo()
    # A weights file or a data file that changes (size or modification time) misses.
    weights, data = tmp_path / "w.pt", tmp_path / "data"
    torch.save({"w": torch.zeros(2)}, weights)
    data.mkdir()
    (data / "a.png").write_bytes(b"x")
    keys = {_key([f"backbone.weights={weights}"], [data])}
    os.utime(weights, ns=(1, 1))
    keys.add(_key([f"backbone.weights={weights}"], [data]))
    (data / "a.png").write_bytes(b"y2")
    keys.add(_key([f"backbone.weights={weights}"], [data]))
    (data / "b.png").write_bytes(b"z")
    keys.add(_key([f"backbone.weights={weights}"], [data]))
    assert len(keys) == 4 and None not in keys
    assert _key([f"backbone.weights={tmp_path / 'absent.pt'}"]) is None  # ordinary path


def test_eval_on_model_takes_the_ordinary_path_and_tests_the_model(tmp_path: Path) -> None:
    first = run_job(tmp_path / "a", PRE)
    again = run_job(tmp_path / "b", [*PRE, "strategy.precomputed.eval_on=model"])
    assert again["status"] == "completed", again["error"]
    s = again["strategy"]["precomputed"]
    assert not s["fast_path"]["used"] and s["cache_hit"] and s["equivalence"]["ok"]
    assert again["metrics"] == pytest.approx(first["metrics"], abs=1e-6)


def test_a_bad_save_model_value_is_one_sentence(tmp_path: Path) -> None:
    summary = run_job(tmp_path, ["strategy=precomputed", "strategy.precomputed.save_model=maybe"])
    assert summary["status"] == "failed"
    assert "strategy.precomputed.save_model='maybe'" in summary["error"]


def test_the_code_fingerprint_reads_every_file_it_names() -> None:
    """The index key covers the code that makes pixels and features: a path that no longer
    exists (a file moved) would silently drop out of it, and edits would not invalidate."""
    paths = [lookup._PACKAGE / p for p in lookup.CODE]
    assert all(p.exists() for p in paths), [str(p) for p in paths if not p.exists()]
    assert len(lookup.code_fingerprint()) >= len(paths)
