"""Strategy ``freeze``: what is frozen stays bit-identical (weights and BN statistics), what trains
changes, trainable counts are the hand-computed ones, gradual unfreezing adds a lower-LR group and
survives a resume, and bad values fail with one sentence."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import nn

from effbench import pipeline
from effbench.backbones import BACKBONES, build_backbone
from effbench.backbones.base import Backbone
from effbench.run import RunContext, build_run
from effbench.techniques.freeze import (
    Freeze,
    FreezeSchedule,
    backbone_layers,
    fully_frozen_prefix,
    is_frozen,
)
from tests.conftest import TINY, compose_cfg, load_summary, run_job

R18 = ["strategy=freeze", "backbone=resnet18", "backbone.weights=null", "dataset.image_size=32",
       "dataset.num_train=64"]  # 2 batches of 32: enough to move every trainable tensor

# ResNet18 parameters by stage, by hand (conv: c_in*c_out*k*k, no bias; BatchNorm: 2*c).
STEM = 3 * 64 * 7 * 7 + 2 * 64                                            # 9,536
BASIC_64 = 2 * (64 * 64 * 9 + 2 * 64)                                     # 73,984
LAYER1 = 2 * BASIC_64                                                     # 147,968


def _layer(c_in: int, c: int) -> int:
    """A down-sampling BasicBlock (3x3 convs + 1x1 shortcut conv, 3 BNs) + a plain BasicBlock."""
    first = c_in * c * 9 + 2 * c + c * c * 9 + 2 * c + c_in * c + 2 * c
    return first + 2 * (c * c * 9 + 2 * c)


LAYER2, LAYER3, LAYER4 = _layer(64, 128), _layer(128, 256), _layer(256, 512)
assert (LAYER2, LAYER3, LAYER4) == (525_568, 2_099_712, 8_393_728)
R18_TOTAL = STEM + LAYER1 + LAYER2 + LAYER3 + LAYER4                      # 11,176,512 (no fc)
# frozen_stages=k freezes the stem and layer1..layer{k} (k=0: nothing).
R18_TRAINABLE = {0: R18_TOTAL, 1: LAYER2 + LAYER3 + LAYER4, 2: LAYER3 + LAYER4, 3: LAYER4, 4: 0}


def _apply(backbone: Backbone, frozen_stages: int | str = "all", last: int = 0) -> Backbone:
    FreezeSchedule(frozen_stages, last, True, [], None, 0.1).apply_initial(backbone)
    return backbone


def _trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, "all"])
def test_resnet18_trainable_counts_match_hand_arithmetic(k: int | str) -> None:
    backbone = _apply(build_backbone("resnet18"), k)
    assert sum(p.numel() for p in backbone.parameters()) == R18_TOTAL == 11_176_512
    assert _trainable(backbone) == R18_TRAINABLE[4 if k == "all" else k]
    # The frozen prefix (run without autograd) is the stem plus k blocks.
    assert backbone.frozen_prefix == {0: 0, 1: 2, 2: 3, 3: 4, 4: 5, "all": 5}[k]


@pytest.mark.parametrize(("name", "n"), [("resnet18", 1), ("resnet18", 5), ("mobilenet_v2", 7),
                                         ("efficientnet_b0", 10), ("small_cnn", 2)])
def test_unfreeze_last_layers_unfreezes_exactly_n(name: str, n: int) -> None:
    backbone = _apply(build_backbone(name, image_size=32), "all", n)
    layers = backbone_layers(backbone)
    trainable = [m for m in layers if not is_frozen(m)]
    assert trainable == layers[-n:]  # exactly the last n, all of their parameters
    assert all(p.requires_grad for m in trainable for p in m.parameters(recurse=False))
    assert backbone.frozen_prefix == fully_frozen_prefix(backbone) < len(backbone.stages)


def test_mobilenet_v2_probe_and_last_layers_match_the_cifar10_study() -> None:
    """12,810 trainable (head only); 745,290 with Keras's "last 10 layers", which hold parameters
    in 7 layers (Conv_1 + BN, block_16 project conv + BN, depthwise conv + BN, expand BN)."""
    head = 1280 * 10 + 10
    backbone = _apply(build_backbone("mobilenet_v2"), "all", 0)
    assert _trainable(backbone) + head == 12_810
    _apply(backbone, "all", 7)
    assert _trainable(backbone) + head == 745_290


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_layers_cover_every_parameter_once(name: str) -> None:
    """Extends tests/backbones' stage-coverage test to the layers this strategy counts; and k=0
    trains everything, k=all nothing."""
    backbone = build_backbone(name, image_size=32)
    held = [id(p) for m in backbone_layers(backbone) for p in m.parameters(recurse=False)]
    assert len(held) == len(set(held)) and set(held) == {id(p) for p in backbone.parameters()}
    assert _trainable(_apply(backbone, 0)) == sum(p.numel() for p in backbone.parameters())
    assert _trainable(_apply(backbone, "all")) == 0
    assert backbone.frozen_prefix == len(backbone.stages)


# -- training ----------------------------------------------------------------------------------
def _context(tmp_path: Path, overrides: list[str]) -> tuple[Freeze, RunContext]:
    """What effbench.run.run does up to configure_model, keeping the context for inspection."""
    cfg = compose_cfg([*TINY, *R18, *overrides])
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    pl.seed_everything(0, verbose=False)
    ctx = build_run(cfg, tmp_path / "run")
    return ctx.techniques[0], ctx


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("bn_eval", [True, False])
def test_frozen_weights_and_bn_stats_stay_bit_identical(tmp_path: Path, bn_eval: bool) -> None:
    strategy, ctx = _context(tmp_path, ["strategy.freeze.frozen_stages=2", "trainer.max_epochs=1",
                                        f"strategy.freeze.frozen_bn_eval={str(bn_eval).lower()}"])
    before = _snapshot(ctx.system.backbone)
    strategy.configure_model(ctx)
    pipeline.fit(ctx, ctx.techniques, ctx.recipe)
    backbone = ctx.system.backbone
    after = _snapshot(backbone)
    frozen = {n for n, p in backbone.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert all(n.startswith(("stages.0.", "stages.1.", "stages.2.")) for n in frozen)
    assert frozen and trainable
    for n in frozen:
        assert torch.equal(before[n], after[n]), n
    for n in trainable:
        assert not torch.equal(before[n], after[n]), n
    stats = [k for k in after if k.rsplit(".", 1)[-1] in ("running_mean", "running_var")]
    frozen_stats = [k for k in stats if k.startswith(("stages.0.", "stages.1.", "stages.2."))]
    changed = {k for k in stats if not torch.equal(before[k], after[k])}
    # With frozen_bn_eval the frozen BN layers keep the loaded statistics; without, they drift.
    assert changed.isdisjoint(frozen_stats) if bn_eval else changed >= set(frozen_stats)
    assert changed >= set(stats) - set(frozen_stats)  # trainable BN layers do update


def test_summary_reports_trainable_params_and_epoch_times(tmp_path: Path) -> None:
    summary = run_job(tmp_path, [*R18, "strategy.freeze.frozen_stages=3", "optim.checkpoint=false"])
    assert summary["status"] == "completed", summary["error"]
    on_disk = load_summary(tmp_path / "run")
    head = 512 * 4 + 4  # synthetic: 4 classes
    assert on_disk["model"]["params_trainable"] == LAYER4 + head
    assert on_disk["model"]["params_total"] == R18_TOTAL + head
    s = on_disk["strategy"]["freeze"]
    assert s["frozen_stages"] == 3 and s["stages_frozen"] == 4 and s["frozen_prefix_end"] == 4
    assert s["params_trainable_start"] == LAYER4 + head
    assert len(s["epoch_times_s"]) == on_disk["epochs"] == 2
    assert all(t > 0 for t in s["epoch_times_s"]) and on_disk["time_s"]["train"] > 0


def test_gradual_unfreezing_adds_lower_lr_group_and_resumes(tmp_path: Path) -> None:
    over = ["strategy.freeze.frozen_stages=all", "strategy.freeze.unfreeze_at_epochs=[1]",
            "strategy.freeze.backbone_lr_factor=0.25", "optim.scheduler=null"]
    strategy, ctx = _context(tmp_path, over)
    before = _snapshot(ctx.system.backbone)
    strategy.configure_model(ctx)
    assert _trainable(ctx.system.backbone) == 0
    pipeline.fit(ctx, ctx.techniques, ctx.recipe)
    backbone = ctx.system.backbone
    assert _trainable(backbone) == LAYER4 and backbone.frozen_prefix == 4
    events = strategy.finalize(ctx)["unfreeze_events"]
    assert events == [{"epoch": 1, "layers": 10, "params": LAYER4, "lr": pytest.approx(2.5e-4),
                       "head_lr": pytest.approx(1e-3), "frozen_prefix": 4}]
    after = _snapshot(backbone)
    assert not torch.equal(before["stages.4.layer4.1.conv2.weight"],
                           after["stages.4.layer4.1.conv2.weight"])
    assert torch.equal(before["stages.3.layer3.1.conv2.weight"],
                       after["stages.3.layer3.1.conv2.weight"])

    # Resume from the last checkpoint for one more epoch: the unfrozen stage trains again, in its
    # own param group at the lower LR, and is not unfrozen twice.
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    strategy2, ctx2 = _context(tmp_path / "resumed",
                               [*over, "trainer.max_epochs=3"])
    strategy2.configure_model(ctx2)
    trainer = ctx2.make_trainer(strategy2.callbacks(ctx2))
    trainer.fit(ctx2.system, datamodule=ctx2.datamodule, ckpt_path=str(last))
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(2.5e-4)
    assert sum(p.numel() for p in groups[1]["params"]) == LAYER4
    assert _trainable(ctx2.system.backbone) == LAYER4
    assert strategy2._schedule.steps_done == 1 and len(strategy2._schedule.events) == 1
    assert len(strategy2._timer.times) == 3  # two restored + one new


def test_unfreeze_lr_moves_the_head_too(tmp_path: Path) -> None:
    """The transfer study's second stage: head *and* unfrozen layers at 1e-4 (the LR monitor's
    per-epoch record shows the head's group leaving 1e-3)."""
    summary = run_job(tmp_path, [*R18, "trainer.max_epochs=2", "optim.scheduler=null",
                                 "optim.optimizer.lr=1e-3",
                                 "strategy.freeze.unfreeze_at_epochs=[1]",
                                 "strategy.freeze.unfreeze_lr=1e-4"])
    assert summary["status"] == "completed", summary["error"]
    (event,) = summary["strategy"]["freeze"]["unfreeze_events"]
    assert event["lr"] == pytest.approx(1e-4) and event["head_lr"] == pytest.approx(1e-4)
    rows = list(csv.DictReader((Path(summary["run_dir"]) / "csv" / "metrics.csv").open()))
    # One group (the head) at epoch 0: "lr-Adam"; two after unfreezing: "lr-Adam/pg1" (the head)
    # and "lr-Adam/pg2" (the unfrozen layers).
    lrs = [{k: float(v) for k, v in r.items() if k.startswith("lr-") and v} for r in rows]
    lrs = [r for r in lrs if r]
    assert lrs[0] == {"lr-Adam": pytest.approx(1e-3)}
    assert lrs[-1] == {"lr-Adam/pg1": pytest.approx(1e-4), "lr-Adam/pg2": pytest.approx(1e-4)}


@pytest.mark.parametrize(("override", "words"), [
    ("strategy.freeze.frozen_stages=5", "strategy.freeze.frozen_stages=5"),
    ("strategy.freeze.frozen_stages=some", "strategy.freeze.frozen_stages='some'"),
    ("strategy.freeze.unfreeze_last_layers=999", "strategy.freeze.unfreeze_last_layers=999"),
    ("strategy.freeze.unfreeze_at_epochs=[0]", "strategy.freeze.unfreeze_at_epochs=[0]"),
    ("strategy.freeze.backbone_lr_factor=0", "strategy.freeze.backbone_lr_factor=0"),
    ("strategy.freeze.unfreeze_lr=1e-4", "strategy.freeze.unfreeze_lr=0.0001"),
])
def test_bad_values_fail_with_one_sentence(tmp_path: Path, override: str, words: str) -> None:
    summary = run_job(tmp_path, [*R18, override])
    assert summary["status"] == "failed"
    assert words in summary["error"] and "use" in summary["error"]


def test_unfreezing_needs_something_frozen(tmp_path: Path) -> None:
    summary = run_job(tmp_path, [*R18, "strategy.freeze.frozen_stages=0",
                                 "strategy.freeze.unfreeze_at_epochs=[1]"])
    assert summary["status"] == "failed" and "nothing to unfreeze" in summary["error"]


def test_gradual_unfreezing_refuses_ddp() -> None:
    """DDP fixes its synchronised parameters when it wraps the model: later unfreezing would let
    ranks diverge, so it is refused with one sentence (a static freeze is fine)."""
    from types import SimpleNamespace

    from effbench.errors import EffbenchError

    ddp = SimpleNamespace(world_size=2)
    module = SimpleNamespace(backbone=build_backbone("small_cnn"))
    with pytest.raises(EffbenchError, match=r"unfreeze_at_epochs=\[2\] cannot run on 2 processes"):
        FreezeSchedule("all", 0, True, [2], None, 0.1).setup(ddp, module, "fit")
    FreezeSchedule(1, 0, True, [], None, 0.1).freeze_before_training(module)
    assert module.backbone.frozen_prefix == 2
