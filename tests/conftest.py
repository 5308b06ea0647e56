"""Shared fixtures: tests run offline on CPU, write into tmp dirs, and never touch the network."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tests.helpers.cli import run_cli, run_compare, run_eval  # noqa: F401 - the tests' door

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FAST = ["trainer.enable_progress_bar=false", "tracking.country=USA"]
# A tiny in-process job (``run_job``): synthetic data, 2 epochs, no energy tracking.
TINY = ["dataset=synthetic", "dataset.num_train=96", "dataset.num_val=32", "dataset.num_test=32",
        "dataset.batch_size=32", "trainer.max_epochs=2", "tracking.energy=false", *FAST]
# A tiny multilabel job for CLI runs of strategies that report AUROC.
TINY_MULTILABEL = ["backbone=small_cnn", "dataset=synthetic", "dataset.multilabel=true",
                   "dataset.num_train=64", "dataset.num_val=32", "dataset.num_test=32",
                   "tracking.energy=false", *FAST]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs ``-n 2``), each worker and every process it starts
    (the zygote's commands, real subprocesses, DDP ranks) keep to their own share of the cores:
    effbench's ``hardware.cpu_threads=auto`` then gives each worker's torch those cores only.
    Two workers each with torch threads on every core made small runs several times slower
    (oversubscribed OpenMP threads spin against each other)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get(
        "PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count or not hasattr(os, "sched_setaffinity"):
        return
    cores, index, n = sorted(os.sched_getaffinity(0)), int(worker.lstrip("gw")), int(count)
    if len(cores) >= n > 1:
        os.sched_setaffinity(0, set(cores[index % n::n]))


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setenv("EFFBENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
    _forget_mlflow_stores()


def _forget_mlflow_stores() -> None:
    """A passed test's tmp_path is removed (``tmp_path_retention_policy``), so the next test of
    the same name prefix gets the *same* path back. MLflow caches one store (an SQLAlchemy engine
    with pooled connections) per tracking URI for the life of the process; a second in-process
    client of ``sqlite:///<that path>`` then talks to the deleted file ("attempt to write a
    readonly database"). Each test starts with no cached store."""
    import sys

    registry = sys.modules.get("mlflow.tracking._tracking_service.registry")
    cached = getattr(getattr(registry, "TrackingStoreRegistry", None),
                     "_get_store_with_resolved_uri", None)
    if cached is not None and hasattr(cached, "cache_clear"):
        cached.cache_clear()
    store = sys.modules.get("mlflow.store.tracking.sqlalchemy_store")
    engines = getattr(getattr(store, "SqlAlchemyStore", None), "_engine_map", None)
    if isinstance(engines, dict):  # and one engine per URI, shared by every store of that URI
        for engine in engines.values():
            engine.dispose()
        engines.clear()


def compose_cfg(overrides: list[str] | None = None):
    """The composed config exactly as the CLI would build it."""
    import effbench.cli  # noqa: F401 - registers the resolvers

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides or [], return_hydra_config=True)


def run_job(tmp_path: Path, overrides: list[str]) -> dict:
    """One job in this process (composed as the CLI would) into ``tmp_path/run``."""
    from effbench.run import run_overrides

    summary = run_overrides([*TINY, *overrides], tmp_path / "run")
    assert_predictions(tmp_path / "run", summary)
    return summary


def load_summary(run_dir: Path) -> dict:
    """``run_dir/summary.json``, validated against the schema."""
    import json

    import jsonschema

    from effbench.summary import SCHEMA

    summary = json.loads((run_dir / "summary.json").read_text())
    jsonschema.validate(summary, SCHEMA)
    assert_predictions(run_dir, summary)
    return summary


def assert_predictions(run_dir: Path, summary: dict, limited: bool = False) -> None:
    """Every completed run keeps predictions.npz: one row per test sample (the first ones only
    where trainer.limit_test_batches cuts the test short)."""
    if summary.get("status") != "completed":
        return
    import numpy as np

    record = summary.get("predictions") or {}
    assert "error" not in record and record.get("file") == "predictions.npz", record
    with np.load(Path(run_dir) / "predictions.npz", allow_pickle=False) as z:
        rows = len(z["ids"])
        assert len(z["probs"]) == len(z["labels"]) == rows == record["rows"]
    config = Path(run_dir) / "resolved_config.yaml"  # the run's own trainer.limit_test_batches
    limited = limited or (config.is_file() and "limit_test_batches: null" not in
                          config.read_text() and "limit_test_batches:" in config.read_text())
    assert rows == record["test_split"] or (limited and 0 < rows < record["test_split"]), record


# Shrinks any preset to seconds on a CPU: one batch, 32 px, random init, no energy tracking.
SHRINK = ["hardware=cpu", "hardware.num_workers=0", "backbone.weights=null",
          "dataset.image_size=32", "tracking.energy=false", "trainer.max_epochs=1",
          "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
          "trainer.limit_test_batches=1", "dataset.batch_size=8", "dataset.eval_batch_size=8",
          "dataset.max_samples=48",
          *FAST]
# The studies' absolute image counts exceed the generated data (later overrides win).
SHRINK_STRATEGY = {"dynamic": ["strategy.dynamic.alpha=0.5"],
                   # one epoch: a pruning schedule that cannot end is refused
                   "prune": ["strategy.prune.start=0", "strategy.prune.end=1"],
                   # one epoch: a later unfreezing epoch could never take effect (refused)
                   "freeze": ["strategy.freeze.unfreeze_at_epochs=[]",
                              "strategy.freeze.unfreeze_lr=null"],
                   # latency fp32 vs int8 measured for 0.1 s each, not the default 1 s
                   "qat": ["strategy.qat.latency_min_time=0.1"],
                   "ptq": ["strategy.ptq.latency_min_time=0.1"]}


def not_honoured(strategy: str) -> set[str]:
    """The shrinking trainer.* keys a stack refuses because a technique's own loop cannot
    honour them (what it does honour is its declared ``trainer_keys``)."""
    keys = {o.split("=")[0] for o in SHRINK if o.startswith("trainer.")}
    return {k for k in keys if any(_refuses(n, k) for n in strategy.split("+"))}


def _refuses(name: str, key: str) -> bool:
    from effbench.technique import technique_class

    honoured = technique_class(name).trainer_keys
    return honoured is not None and key.split(".", 1)[1] not in honoured


def run_preset_job(tmp_path: Path, overrides: list[str]) -> dict:
    """One job in-process, the user's overrides then the shrinking ones (unlike ``run_job``, no
    ``dataset=synthetic`` that would beat a preset's dataset)."""
    strategy = "+".join(compose_cfg(overrides).strategy)
    shrink = [o for o in SHRINK if o.split("=")[0] not in not_honoured(strategy)]
    cfg = compose_cfg([*overrides, *shrink, *SHRINK_STRATEGY.get(strategy, [])])
    choices = dict(cfg.hydra.runtime.choices)
    from omegaconf import OmegaConf

    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    from effbench.run import run

    summary = run(cfg, tmp_path / "run", choices, overrides)
    assert_predictions(tmp_path / "run", summary, limited=True)  # SHRINK: one test batch
    return summary
