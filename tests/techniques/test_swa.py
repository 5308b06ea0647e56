"""swa: the model tested and saved is the equal-weight average of the weights at the end of each
SWA epoch, with BatchNorm statistics recomputed for it on the training data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.callbacks import Callback
from safetensors.torch import load_file
from torch import nn

from effbench import pipeline
from effbench.model.saved import evaluate, load
from tests.conftest import TINY, run_cli, run_job
from tests.helpers.cli import one_error_line
from tests.helpers.runs import configured

# cifar_cnn14 has BatchNorm (small_cnn has none); 3 epochs of 3 steps, averaging epochs 2 and 3.
SWA = ["strategy=swa", "backbone=cifar_cnn14", "trainer.max_epochs=3",
       "strategy.swa.swa_epoch_start=2"]


class EpochEnds(Callback):
    """The parameters at the end of every training epoch (before the average replaces them)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.epochs.append({k: p.detach().clone() for k, p in pl_module.named_parameters()})


def _context(tmp_path: Path, overrides: list[str]):
    return configured(tmp_path, [*TINY, *SWA, *overrides])


def _first_batchnorm_input_mean(ctx: Any) -> torch.Tensor:
    """Per channel, the mean over the training split of what the first BatchNorm layer receives
    (only convolutions before it: the same whatever the batches were made of)."""
    bn = next(m for m in ctx.system.modules() if isinstance(m, nn.BatchNorm2d))
    seen: list[torch.Tensor] = []
    hook = bn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].mean((0, 2, 3))))
    dm = ctx.datamodule
    ctx.system.eval()
    with torch.no_grad():
        for images, _ in dm.loader("train", shuffle=False):
            ctx.system(dm.normalize(images))
    hook.remove()
    return torch.stack(seen).mean(0)  # equal batches (96 = 3 × 32): the mean over all images


def test_the_model_tested_and_saved_is_the_average_of_the_swa_epochs(tmp_path: Path) -> None:
    ctx = _context(tmp_path, [])
    swa, ends = ctx.techniques[0], EpochEnds()
    pipeline.fit_and_test(ctx, ctx.recipe, [*swa.callbacks(ctx), ends])
    facts, _ = pipeline.finalize(ctx, ctx.techniques)
    assert len(ends.epochs) == 3 and ctx.epochs == 3  # no extra BatchNorm epoch
    # The average of the weights at the end of epochs 2 and 3 (1-based), not the last ones.
    params = dict(ctx.system.named_parameters())
    for k, p in params.items():
        assert torch.allclose(p, (ends.epochs[1][k] + ends.epochs[2][k]) / 2, atol=1e-6), k
    assert any(not torch.allclose(p, ends.epochs[2][k], atol=1e-4) for k, p in params.items())
    # BatchNorm statistics are those of the averaged weights on the training split.
    bn = next(m for m in ctx.system.modules() if isinstance(m, nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 3 and bn.momentum == 0.1  # one pass; momentum back
    assert torch.allclose(bn.running_mean, _first_batchnorm_input_mean(ctx), atol=1e-5)
    assert ctx.system.test_results["scalars"], "the average was tested"
    saved = load_file(ctx.run_dir / "model" / "weights.safetensors")
    state = ctx.system.state_dict()
    assert saved and all(torch.equal(v, state[k].cpu()) for k, v in saved.items())
    s = facts["swa"]
    assert s["averaged_epochs"] == [2, 3] and s["averages"] == 2
    assert s["batchnorm_layers_recomputed"] == 14 and not s["stopped_early"]


def test_a_run_records_the_average_and_tests_what_it_saves(tmp_path: Path) -> None:
    summary = run_job(tmp_path, ["strategy=swa", "strategy.swa.swa_lrs=5e-4"])  # small_cnn
    assert summary["status"] == "completed", summary["error"]
    s = summary["strategy"]["swa"]
    assert s["averaged_epochs"] == [1, 2] and s["swa_lrs_used"] == [5e-4]
    assert summary["epochs"] == 2
    assert "swa: weights of 2 epochs averaged (1–2) at lr 0.0005" in summary["headline"]
    # No epoch's weights are the average, so none is kept as the best checkpoint to test.
    assert not (tmp_path / "run" / "checkpoints" / "best.ckpt").exists()
    assert evaluate(load(tmp_path / "run"))["predictions"]["max_abs_prob_diff"] < 1e-5


# A learning rate too small to change any float32 weight: val/loss never improves, so early
# stopping with patience 1 ends training after epoch 2 of 5.
STALLED = ["trainer.max_epochs=5", "optim.early_stopping.patience=1", "optim.optimizer.lr=1e-30"]


def test_stopped_early_after_averaging_began_the_average_is_delivered(tmp_path: Path) -> None:
    summary = run_job(tmp_path, ["strategy=swa", *STALLED, "strategy.swa.swa_epoch_start=1"])
    assert summary["status"] == "completed", summary["error"]
    s = summary["strategy"]["swa"]
    assert summary["epochs"] == 2 and s["averaged_epochs"] == [1, 2] and s["stopped_early"]


def test_stopped_before_the_first_averaged_epoch_fails_the_run(tmp_path: Path) -> None:
    summary = run_job(tmp_path, ["strategy=swa", *STALLED, "strategy.swa.swa_epoch_start=3"])
    assert summary["status"] == "failed"
    assert "before the end of strategy.swa's first averaged epoch (3)" in summary["error"]


def test_a_start_past_the_last_epoch_is_refused(tmp_path: Path) -> None:
    summary = run_job(tmp_path, ["strategy=swa", "strategy.swa.swa_epoch_start=5"])
    assert summary["status"] == "failed"
    assert "strategy.swa.swa_epoch_start=5 is past trainer.max_epochs=2" in summary["error"]


def test_an_out_of_range_start_is_one_line(tmp_path: Path) -> None:
    res = run_cli([*TINY, "strategy=swa", "strategy.swa.swa_epoch_start=0"], cwd=tmp_path)
    line = one_error_line(res)
    assert "strategy.swa.swa_epoch_start=0 must be an epoch >= 1" in line, line
