"""ema: the exponential moving average of the weights (not the last step's weights) is what is
validated, kept as the best checkpoint, tested and saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pytorch_lightning.callbacks import Callback
from safetensors.torch import load_file

from effbench import pipeline
from effbench.model.saved import evaluate, load
from tests.conftest import TINY, run_cli, run_job
from tests.helpers.cli import one_error_line
from tests.helpers.runs import configured

# TINY: 96 training images in batches of 32, 2 epochs = 6 optimizer steps. A short horizon
# (decay 0.5) so that the average of 6 steps is far from both the first and the last weights.
EMA = ["strategy=ema", "strategy.ema.decay=0.5"]


class StepWeights(Callback):
    """Every parameter and buffer of the model after each optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.steps.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def _context(tmp_path: Path, overrides: list[str]):
    return configured(tmp_path, [*TINY, *EMA, *overrides])


def test_the_model_tested_is_the_moving_average_of_the_steps(tmp_path: Path) -> None:
    # No best checkpoint: the test takes the weights training leaves, which must be the average.
    ctx = _context(tmp_path, ["optim.checkpoint=false"])
    steps = StepWeights()
    pipeline.fit_and_test(ctx, ctx.recipe, [*ctx.techniques[0].callbacks(ctx), steps])
    assert len(steps.steps) == 6
    expected = dict(steps.steps[0])  # the first update copies the weights
    for weights in steps.steps[1:]:
        expected = {k: 0.5 * v + 0.5 * weights[k] if v.is_floating_point() else v
                    for k, v in expected.items()}
    tested = {k: v.detach() for k, v in ctx.system.state_dict().items()}
    last = steps.steps[-1]
    floats = [k for k, v in expected.items() if v.is_floating_point()]
    for k in floats:
        assert torch.allclose(tested[k], expected[k], atol=1e-6), k
    assert any(not torch.allclose(tested[k], last[k], atol=1e-4) for k in floats)
    assert ctx.system.test_results["scalars"], "the average was tested"


def test_the_best_checkpoint_tested_and_saved_holds_the_average(tmp_path: Path) -> None:
    summary = run_job(tmp_path, EMA)
    assert summary["status"] == "completed", summary["error"]
    run = tmp_path / "run"
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    average, raw = best["state_dict"], best["current_model_state"]  # raw: kept for resuming
    saved = load_file(run / "model" / "weights.safetensors")
    assert any(not torch.equal(average[k], raw[k]) for k in saved)
    for k, v in saved.items():  # the average, not the raw weights of the best epoch
        assert torch.equal(v, average[k]), k
    # What was tested is what was saved: reloaded, it gives the run's test predictions.
    assert evaluate(load(run))["predictions"]["max_abs_prob_diff"] < 1e-5
    facts = summary["strategy"]["ema"]
    assert facts["decay"] == 0.5 and facts["updates"] == facts["steps"] == 6
    assert facts["first_update_share"] == 0.5 ** 5
    assert "ema: weights averaged with decay 0.5 over 6 updates" in summary["headline"]


def test_before_the_first_update_the_raw_weights_are_validated_and_never_tested(
        tmp_path: Path) -> None:
    # Updates from step 3 on: epoch 0 (steps 0-2) has no average yet. Its validation sees the
    # raw weights, as the baseline's does (same seed: the same weights), not the copy of the
    # initial weights the callback holds; and only epoch 1 may be the checkpoint tested.
    summary = run_job(tmp_path / "ema", [*EMA, "strategy.ema.start_step=3"])
    plain = run_job(tmp_path / "ft", ["strategy=finetune"])
    assert summary["status"] == plain["status"] == "completed", summary["error"]
    assert summary["strategy"]["ema"]["updates"] == 3
    assert _val_losses(tmp_path / "ema")[0] == pytest.approx(_val_losses(tmp_path / "ft")[0])
    best = torch.load(tmp_path / "ema" / "run" / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["epoch"] == 1 and "current_model_state" in best


def _val_losses(case: Path) -> list[float]:
    import pandas as pd

    rows = pd.read_csv(case / "run" / "csv" / "metrics.csv")
    return [float(v) for v in rows["val/loss"].dropna()]


def test_a_start_step_never_reached_fails_the_run(tmp_path: Path) -> None:
    summary = run_job(tmp_path, [*EMA, "strategy.ema.start_step=100"])
    assert summary["status"] == "failed"
    assert "strategy.ema.start_step=100 was never reached" in summary["error"]


def test_an_out_of_range_decay_is_one_line(tmp_path: Path) -> None:
    res = run_cli([*TINY, "strategy=ema", "strategy.ema.decay=1.5"], cwd=tmp_path)
    line = one_error_line(res)
    assert "strategy.ema.decay=1.5 must be a fraction in (0, 1)" in line, line
