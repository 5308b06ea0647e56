"""mixup: training batches are mixed with the batch reversed, images and targets in the same
proportion λ (mixup: λ·x + (1-λ)·x'; cutmix: a box of x' covering a 1-λ share); validation and
test see the true images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.data import Mixup

from effbench import pipeline
from effbench.errors import EffbenchError
from effbench.losses import CrossEntropy, WeightedBCE
from effbench.techniques.mixup import MixBatch, MixUp
from tests.conftest import run_cli
from tests.helpers.cli import one_error_line
from tests.helpers.runs import configured
from tests.helpers.tiny import tiny


def _mix(x: torch.Tensor, y: torch.Tensor, multilabel: bool = False, **options: Any,
         ) -> tuple[torch.Tensor, torch.Tensor, MixBatch]:
    np.random.seed(0)  # timm draws λ from numpy's global generator
    batch = MixBatch(Mixup(label_smoothing=0.0, num_classes=4, multi_label=multilabel,
                           **{"mixup_alpha": 1.0, **options}))
    out, target = batch(x.clone(), y)
    return out, target, batch


def _onehot(y: torch.Tensor) -> torch.Tensor:
    return F.one_hot(y, 4).float()


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_a_mixed_batch_reads_nothing_back_from_the_device(mode: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """No tensor is read back to the host while batches are mixed (on a GPU each read is a
    synchronisation, once a step: per-image λ of pair/elem is a device tensor); the counts and
    mean λ are read once, by the facts, and equal the batches' own λ."""
    x, y = torch.randn(9, 3, 6, 6), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0])
    np.random.seed(0)
    batch = MixBatch(Mixup(mixup_alpha=1.0, label_smoothing=0.0, num_classes=4, mode=mode))
    reads: list[str] = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)

        def record(self, *a, _name=name, _real=real, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            reads.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, record)
    lams = []
    for _ in range(3):
        batch(x.clone(), y)
        lams.append(batch.last_lambda.clone())
    monkeypatch.undo()
    assert reads == []
    facts, lam = batch.facts(), torch.cat(lams)
    mixed = lam < 1
    assert (facts["batches"], facts["odd_batches"], facts["images"]) == (3, 3, 27)
    assert facts["images_mixed"] == int(mixed.sum()) and facts["batches_mixed"] == 3
    assert facts["mean_lambda"] == pytest.approx(float(lam[mixed].mean()), rel=1e-6)


def test_mixup_blends_images_and_targets_by_the_same_lambda() -> None:
    x, y = torch.randn(8, 3, 6, 6), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    out, target, batch = _mix(x, y)
    lam = float(batch.last_lambda[0])
    assert 0 < lam < 1 and torch.all(batch.last_lambda == lam)  # mode=batch: one λ
    assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    assert torch.allclose(target, lam * _onehot(y) + (1 - lam) * _onehot(y.flip(0)))
    assert batch.facts()["mean_lambda"] == pytest.approx(lam)


def test_per_image_lambdas_mix_each_image_and_its_target_alike() -> None:
    x, y = torch.randn(6, 3, 4, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    out, target, batch = _mix(x, y, mode="elem")
    lam = batch.last_lambda[:, None]
    assert len(set(lam.flatten().tolist())) == 6  # its own λ each
    assert torch.allclose(out, lam[:, :, None, None] * x + (1 - lam[:, :, None, None]) * x.flip(0),
                          atol=1e-6)
    assert torch.allclose(target, lam * _onehot(y) + (1 - lam) * _onehot(y.flip(0)))


def test_cutmix_pastes_a_box_whose_area_is_one_minus_lambda() -> None:
    # Image i is the constant i + 1: a pixel tells which image it comes from.
    x = torch.arange(1.0, 9.0).view(8, 1, 1, 1).expand(8, 3, 16, 16).contiguous()
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    out, target, batch = _mix(x, y, mixup_alpha=0.0, cutmix_alpha=1.0)
    lam = float(batch.last_lambda[0])
    assert 0 < lam < 1
    from_partner = out == x.flip(0)                     # pixels pasted from image N-1-i
    assert torch.all(from_partner | (out == x))          # every pixel is one of the two
    share = from_partner.float().mean((1, 2, 3))
    assert torch.allclose(share, torch.full((8,), 1 - lam))
    rows, cols = from_partner[0, 0].any(1), from_partner[0, 0].any(0)
    assert int(from_partner[0, 0].sum()) == int(rows.sum()) * int(cols.sum())  # one rectangle
    assert torch.allclose(target, lam * _onehot(y) + (1 - lam) * _onehot(y.flip(0)))


def test_multilabel_targets_mix_the_multi_hot_vectors() -> None:
    x = torch.randn(4, 3, 4, 4)
    y = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1]]).float()
    out, target, batch = _mix(x, y, multilabel=True)
    lam = float(batch.last_lambda[0])
    assert torch.allclose(target, lam * y + (1 - lam) * y.flip(0))
    assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-6)


def test_an_odd_batch_mixes_all_but_its_last_image() -> None:
    x, y = torch.randn(7, 3, 4, 4), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    out, target, batch = _mix(x, y)
    lam = float(batch.last_lambda[0])
    assert torch.allclose(out[:6], lam * x[:6] + (1 - lam) * x[:6].flip(0), atol=1e-6)
    assert torch.equal(out[6], x[6]) and torch.equal(target[6], _onehot(y[6:])[0])
    facts = batch.facts()
    assert facts["odd_batches"] == 1 and facts["images_mixed"] == 6 and facts["images"] == 7


def test_the_run_losses_take_soft_targets_with_their_weights() -> None:
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 2])
    lam, soft = 0.7, 0.7 * _onehot(y) + 0.3 * _onehot(y.flip(0))
    weights, sample = torch.tensor([1.0, 2.0, 0.5, 3.0]), torch.rand(6)
    ce = CrossEntropy(weights)
    # Cross-entropy is linear in its target: the mixed target's loss is the mix of the losses,
    # class weights and sample weights included.
    mixed = lam * ce(logits, y, sample) + (1 - lam) * ce(logits, y.flip(0), sample)
    assert ce(logits, soft, sample).item() == pytest.approx(mixed.item(), rel=1e-6)
    bce = WeightedBCE(torch.tensor([2.0, 1.0, 3.0, 1.0]), 6)
    multi = (torch.rand(6, 4) < 0.5).float()
    mixed_multi = lam * multi + (1 - lam) * multi.flip(0)
    w = mixed_multi * bce.w_pos + (1 - mixed_multi) * bce.w_neg  # weight from the mixed target
    expected = F.binary_cross_entropy_with_logits(logits, mixed_multi, weight=w,
                                                  reduction="none").mean(1)
    assert bce(logits, mixed_multi, sample).item() == pytest.approx(
        ((expected * sample).sum() / sample.sum()).item(), rel=1e-6)


# 64 / 32 / 32 images, batches of 16: 4 training batches an epoch. α=1 (λ uniform): a mixed
# image is far from every true one (the closest here, λ = 0.9998, by ~1e-2).
RUN = [*tiny(epochs=2), "dataset.batch_size=16", "backbone=small_cnn", "strategy=mixup",
       "strategy.mixup.mixup_alpha=1.0"]


def test_a_run_mixes_training_batches_only(tmp_path: Path) -> None:
    ctx = configured(tmp_path, RUN)
    seen: list[tuple[bool, torch.Tensor]] = []
    ctx.system.backbone.register_forward_pre_hook(
        lambda _m, args: seen.append((ctx.system.training, args[0].detach().clone())))
    technique = ctx.techniques[0]
    pipeline.fit_and_test(ctx, ctx.recipe, technique.callbacks(ctx))
    facts, _ = pipeline.finalize(ctx, ctx.techniques)
    dm = ctx.datamodule
    true = {split: dm.normalize(dm.datasets[split].images).flatten(1) for split in dm.datasets}

    def distance(rows: torch.Tensor, split: str) -> torch.Tensor:
        return torch.cdist(rows.flatten(1), true[split],
                           compute_mode="donot_use_mm_for_euclid_dist").min(1).values  # exact

    train = torch.cat([x for training, x in seen if training])
    evaluated = torch.cat([x for training, x in seen if not training])
    assert len(train) == 2 * 64 and len(evaluated) == 2 * 32 + 32  # 2 validations, 1 test
    assert torch.all(distance(train, "train") > 1e-4)  # every training image was mixed
    assert torch.all(torch.minimum(distance(evaluated, "val"), distance(evaluated, "test"))
                     < 1e-4)  # validation and test: the true images
    s = facts["mixup"]
    assert s["batches"] == s["batches_mixed"] == 8 and s["batches_not_mixed"] == 0
    assert s["images_mixed"] == 128 and s["odd_batches"] == 0 and 0 < s["mean_lambda"] < 1
    assert s["mixup_alpha"] == 1.0 and s["mixes"] == "mixup"
    headline = technique.headline({"strategy": facts})
    assert "8 of 8 batches mixed" in headline and "validation and test unmixed" in headline


def test_a_batch_of_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EffbenchError, match="dataset.batch_size=1 has none"):
        configured(tmp_path, [*RUN, "dataset.batch_size=1"])


@pytest.mark.parametrize(("options", "says"), [
    ({"cutmix_alpha": "big"}, "cutmix_alpha='big' must be a number >= 0"),
    ({"prob": 0}, "prob=0 must be a probability in (0, 1]"),
    ({"switch_prob": 1.5}, "switch_prob=1.5 must be a probability in [0, 1]"),
    ({"mode": "row"}, "mode='row' must be one of batch, pair, elem"),
    ({"cutmix_minmax": [0.8, 0.4]}, "cutmix_minmax=[0.8, 0.4] must be null or [low, high]"),
    ({"mixup_alpha": 0.0}, "mixup_alpha=0 and strategy.mixup.cutmix_alpha=0 mix nothing"),
])
def test_bad_options_are_refused_in_one_sentence(options: dict, says: str) -> None:
    with pytest.raises(EffbenchError) as err:
        MixUp(**options)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_a_bad_option_is_one_line_from_the_command(tmp_path: Path) -> None:
    res = run_cli([*RUN, "strategy.mixup.mixup_alpha=-1"], tmp_path)
    line = one_error_line(res)
    assert "strategy.mixup.mixup_alpha=-1 must be a number >= 0" in line and "0: off" in line
