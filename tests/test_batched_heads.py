"""``hydra/launcher=batched_heads``: heads of a precomputed sweep trained as one batched model give
the numbers of the sequential jobs with the same seeds; every job keeps its own run dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from effbench.losses import CrossEntropy
from effbench.techniques.precomputed.batched import PRETRAINED, HeadJob, not_batchable
from effbench.techniques.precomputed.head_training import HeadTraining
from effbench.techniques.precomputed.heads import build_head
from effbench.techniques.precomputed.launcher import group_jobs, pretrain
from tests.conftest import TINY, compose_cfg, run_cli, run_job

PRE = ["strategy=precomputed", "backbone=resnet18", "backbone.weights=null",
       "dataset.resolution=16", "dataset.image_size=16", "strategy.precomputed.save_model=false"]
# K=3 heads differing in every head-level key (lr, weight decay, dropout, ambiguity weight).
HEADS = [["optim.optimizer.lr=0.01", "strategy.precomputed.dropout=0.1"],
         ["optim.optimizer.lr=0.001", "strategy.precomputed.ambiguity_weight=0",
          "strategy.precomputed.dropout=0.5"],
         ["optim.optimizer.lr=0.003", "optim.optimizer.weight_decay=0.01"]]


def _task(overrides: list[str], base: list[str] = PRE):
    cfg = compose_cfg([*TINY, *base, *overrides])
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    return cfg


def test_batched_heads_give_the_sequential_jobs_numbers(tmp_path: Path) -> None:
    assert run_job(tmp_path / "first", PRE)["status"] == "completed"  # builds cache + index
    sequential = [run_job(tmp_path / f"s{i}", [*PRE, *h]) for i, h in enumerate(HEADS)]
    pretrain([_task(h) for h in HEADS], tmp_path / "work")
    assert len(PRETRAINED) == 3
    batched = [run_job(tmp_path / f"b{i}", [*PRE, *h]) for i, h in enumerate(HEADS)]
    assert not PRETRAINED  # every job took its own head
    for s, b in zip(sequential, batched):
        assert b["status"] == "completed", b["error"]
        group = b["strategy"]["precomputed"]["batched"]
        assert group["heads"] == 3 and group["share_s"] == pytest.approx(group["group_s"] / 3)
        assert "batched" not in s["strategy"]["precomputed"]
        assert b["metrics"] == pytest.approx(s["metrics"], abs=1e-5)
        # Batched and per-head matmuls round differently; lr 0.01 amplifies it in the loss.
        assert b["best_val"] == pytest.approx(s["best_val"], rel=1e-3, abs=1e-5)
        assert b["epochs"] == s["epochs"]


def test_only_head_level_variations_are_grouped() -> None:
    jobs = [["strategy=precomputed", "optim.optimizer.lr=0.1", "seed=0"],
            ["strategy=precomputed", "optim.optimizer.lr=0.2", "seed=0"],
            ["strategy=precomputed", "optim.optimizer.lr=0.1", "seed=1"],  # random init: seed
            ["strategy=precomputed", "optim.optimizer.lr=0.1", "dataset.image_size=24"],
            ["strategy=finetune", "optim.optimizer.lr=0.1"]]
    tasks = [_task(j, []) for j in jobs]
    groups, notice = group_jobs(jobs, tasks)
    assert groups == [[0, 1], [2], [3], [4]]
    assert notice.startswith("3 of 5 job(s) run one after another: ")
    assert "not strategy=precomputed" in notice and "\n" not in notice
    pretrained = [[*j[:-1], "backbone.weights=imagenet", j[-1]] for j in jobs[:3]]
    assert group_jobs(pretrained, [_task(j, []) for j in pretrained])[0] == [[0, 1, 2]]


def test_heads_of_different_shapes_are_not_batched() -> None:
    def job(hidden: int, epochs: int = 2) -> HeadJob:
        return HeadJob(build_head("mlp", 8, 3, hidden), CrossEntropy(), None,
                       HeadTraining(epochs, 4), lambda r, s: None)

    assert not_batchable([job(4), job(4)]) is None
    assert "hidden" in not_batchable([job(4), job(8)])
    assert "epochs" in not_batchable([job(4), job(4, 3)])
    linear = HeadJob(torch.nn.Linear(8, 3), CrossEntropy(), None, HeadTraining(2, 4),
                     lambda r, s: None)
    assert "linear or all mlp" in not_batchable([job(4), linear])


def test_cli_sweep_with_the_batched_launcher(tmp_path: Path) -> None:
    """The user's door: one run dir + summary per job, readable like any sweep."""
    args = ["-m", *TINY, *PRE, "optim.optimizer.lr=1e-3,1e-2",
            "strategy.precomputed.dropout=0.1,0.3", "hydra/launcher=batched_heads",
            "hydra.sweep.dir=sweep"]
    res = run_cli(args, cwd=tmp_path, env={"EFFBENCH_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-3000:]
    summaries = sorted((json.loads(p.read_text()) for p in (tmp_path / "sweep").glob(
        "*/summary.json")), key=lambda s: s["run_dir"])
    assert len(summaries) == 4 and all(s["status"] == "completed" for s in summaries)
    batched = [s["strategy"]["precomputed"].get("batched") for s in summaries]
    # The first job builds the cache alone; the other three train as one batched model.
    assert batched[0] is None and [b["heads"] for b in batched[1:]] == [3, 3, 3]


def test_a_batched_job_carries_its_share_of_the_group_energy() -> None:
    """The group's training ran outside each job's tracker: the job's energy adds its share."""
    from effbench.results import with_batched_share as _with_batched_share

    own = {"kwh": 0.001, "co2_kg": 0.0004, "mode": {"cpu": "tdp_x_load_estimate"}}
    facts = {"precomputed": {"batched": {"heads": 4, "energy_kwh_share": 0.002,
                                         "co2_kg_share": 0.0008}}}
    energy = _with_batched_share(own, facts)
    assert energy["kwh"] == pytest.approx(0.003) and energy["co2_kg"] == pytest.approx(0.0012)
    assert energy["kwh_batched_share"] == 0.002 and energy["mode"] == own["mode"]
    assert _with_batched_share(own, {"precomputed": {}}) == own  # a job trained on its own
