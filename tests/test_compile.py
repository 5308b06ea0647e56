"""hardware.compile: the backbone and the head run through torch.compile (in place), and the run
is the same run — the same test metrics within float noise, the same saved model keys, reloaded
by effbench-eval — with the summary saying that compile was on."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import FAST, load_summary
from tests.helpers.cli import run_eval

# Tiny and whole-batch (256 images a split, batches dividing it: no last-batch recompile), SGD:
# compiled kernels differ from eager ones in the last bits, and Adam's normalised steps blow
# that up to ~1e-3 of loss in an epoch where SGD keeps it near 1e-6.
RUN = ["dataset=digits", "backbone=small_cnn", "optim=sgd", "seed=0", "trainer.max_epochs=2",
       "dataset.max_samples=256", "dataset.batch_size=64", "dataset.eval_batch_size=128",
       "hardware=cpu", "hardware.num_workers=0", "tracking.energy=false", *FAST]


def _run(run_dir: Path, compile_: str) -> dict:
    from effbench.run import run_overrides

    summary = run_overrides([*RUN, f"hardware.compile={compile_}"], run_dir)
    assert summary["status"] == "completed", summary["error"]
    return load_summary(run_dir)


def _test_loss(run_dir: Path) -> float:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return next(float(r["test/loss"]) for r in csv.DictReader(f) if r["test/loss"])


def _saved_keys(run_dir: Path) -> tuple[list[str], list[str]]:
    import torch
    from safetensors import safe_open

    [weights] = (run_dir / "model").glob("*.safetensors")
    with safe_open(str(weights), "pt") as f:
        model = sorted(f.keys())
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)
    return model, sorted(ckpt["state_dict"])


@pytest.mark.slow  # inductor compiles the train and eval graphs with gcc: ~a minute on 2 cores
def test_compiled_run_equals_eager_run_and_says_so(tmp_path: Path) -> None:
    eager, compiled = _run(tmp_path / "eager", "false"), _run(tmp_path / "compiled", "true")
    assert eager["hardware"]["compile"] is False
    assert compiled["hardware"]["compile"] == "default"
    test_images = compiled["data"]["sizes"]["test"]
    acc = (eager["metrics"]["test/acc"], compiled["metrics"]["test/acc"])
    assert abs(acc[0] - acc[1]) <= 1 / test_images + 1e-9, acc  # at most one sample apart
    assert _test_loss(tmp_path / "compiled") == pytest.approx(_test_loss(tmp_path / "eager"),
                                                              abs=1e-4)
    # The saved model and the checkpoints keep their keys (no torch.compile wrapper's
    # `_orig_mod.`), and the model reloads through effbench-eval with the run's metrics.
    assert _saved_keys(tmp_path / "compiled") == _saved_keys(tmp_path / "eager")
    res = run_eval([str(tmp_path / "compiled"), "--json"], tmp_path, timeout=300,
                   env={"PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["metrics"]["test/acc"] == pytest.approx(acc[1], abs=1e-6)
    assert got["predictions"]["max_abs_prob_diff"] < 1e-4
