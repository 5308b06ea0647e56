"""label_smoothing: the training loss is taken against (1-ε)·onehot + ε/C (multi-label
(1-ε)·y + ε/2); validation and test see the true labels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from effbench.run import build_run
from tests.conftest import TINY, compose_cfg, run_job


def _system(tmp_path: Path, overrides: list[str]):
    cfg = compose_cfg([*TINY, "strategy=label_smoothing", *overrides])
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    ctx = build_run(cfg, tmp_path / "run")
    for t in ctx.techniques:
        t.configure_model(ctx)
    return ctx.system


def test_training_loss_uses_the_smoothed_targets(tmp_path: Path) -> None:
    system = _system(tmp_path, ["strategy.label_smoothing.smoothing=0.2"])
    logits, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    system.train()
    assert system.loss_fn(logits, y).item() == pytest.approx(
        F.cross_entropy(logits, y, label_smoothing=0.2).item(), rel=1e-6)
    system.eval()  # validation: the true labels
    assert system.loss_fn(logits, y).item() == pytest.approx(F.cross_entropy(logits, y).item())


def test_a_probability_target_is_smoothed_too(tmp_path: Path) -> None:
    """Soft targets (mixup's λ·y + (1-λ)·y'): t·(1-ε) + ε/C, the loss taken against that."""
    system = _system(tmp_path, ["strategy.label_smoothing.smoothing=0.2"])
    logits, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    onehot = F.one_hot(y, 4).float()
    soft = 0.7 * onehot + 0.3 * onehot.flip(0)
    system.train()
    assert torch.allclose(system.loss_fn.smooth(soft), soft * 0.8 + 0.05)
    assert torch.allclose(system.loss_fn.smooth(onehot), system.loss_fn.smooth(y))
    expected = -(F.log_softmax(logits, 1) * (soft * 0.8 + 0.05)).sum(1).mean()
    assert system.loss_fn(logits, soft).item() == pytest.approx(expected.item(), rel=1e-6)


def test_multilabel_targets_move_towards_one_half(tmp_path: Path) -> None:
    system = _system(tmp_path, ["dataset.multilabel=true",
                                "strategy.label_smoothing.smoothing=0.1"])
    logits, y = torch.randn(4, 4), torch.tensor([[1, 0, 1, 0]] * 4)
    system.train()
    smoothed = system.loss_fn.smooth(y)
    assert torch.allclose(smoothed, torch.tensor([[0.95, 0.05, 0.95, 0.05]] * 4))
    inner = system.loss_fn.loss  # the run's own weighted BCE, kept
    assert system.loss_fn(logits, y).item() == pytest.approx(inner(logits, smoothed).item())
    assert system.loss_fn(logits, y).item() != pytest.approx(inner(logits, y).item())
    system.eval()
    assert system.loss_fn(logits, y).item() == pytest.approx(inner(logits, y).item())


def test_a_run_records_and_reports_the_smoothing(tmp_path: Path) -> None:
    smoothed = run_job(tmp_path / "ls", ["strategy=label_smoothing"])
    plain = run_job(tmp_path / "ft", ["strategy=finetune"])
    assert smoothed["status"] == plain["status"] == "completed", smoothed["error"]
    assert smoothed["strategy"]["label_smoothing"]["smoothing"] == 0.1
    assert "ε=0.1" in smoothed["headline"]
    # Same seed, same data, same initial weights: only the targets differ, so the losses do.
    assert _first_train_loss(tmp_path / "ls") != pytest.approx(_first_train_loss(tmp_path / "ft"))


def _first_train_loss(case: Path) -> float:
    import pandas as pd

    rows = pd.read_csv(case / "run" / "csv" / "metrics.csv")
    return float(rows["train/loss"].dropna().iloc[0])
