"""Shared fixtures: tests run offline on CPU, write into tmp dirs, and never touch the network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FAST = ["trainer.enable_progress_bar=false", "tracking.country=USA"]
# A tiny multilabel job for CLI runs of strategies that report AUROC.
TINY_MULTILABEL = ["backbone=small_cnn", "dataset=synthetic", "dataset.multilabel=true",
                   "dataset.num_train=64", "dataset.num_val=32", "dataset.num_test=32",
                   "tracking.energy=false", *FAST]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EFFBENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def compose_cfg(overrides: list[str] | None = None):
    """The composed config exactly as the CLI would build it."""
    import effbench.cli  # noqa: F401 - registers the resolvers

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides or [], return_hydra_config=True)


def run_cli(args: list[str], cwd: Path, timeout: int = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs ``effbench`` as a user would, in ``cwd`` (so outputs/ lands there)."""
    full_env = {**os.environ, **(env or {})}
    Path(cwd).mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "effbench.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=full_env)
