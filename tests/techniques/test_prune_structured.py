"""``prune`` with ``structure=channel``: channels really go (coupled layers kept consistent), the
model runs and trains on, counts in the summary are the model's, and stacks behave."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import nn

from effbench import pipeline
from effbench.backbones import build_backbone
from effbench.errors import EffbenchError
from effbench.run import RunContext, build_run
from effbench.techniques.prune.channel import conv_layers
from effbench.techniques.prune.technique import ChannelPruning, Prune
from tests.conftest import TINY, TINY_MULTILABEL, compose_cfg, load_summary, run_cli, run_job

R18 = ["strategy=prune", "strategy.prune.structure=channel", "backbone=resnet18",
       "backbone.weights=null", "dataset.image_size=32", "dataset.num_train=64",
       "strategy.prune.latency_batch=4", "strategy.prune.latency_min_time=0.05"]
# Four pruning updates in the first epoch (2 batches of 32 per epoch): 10 % → 50 % in steps.
STEPS = ["strategy.prune.unit=step", "strategy.prune.start=0", "strategy.prune.end=3",
         "strategy.prune.frequency=1"]


class System(nn.Module):
    """The two attributes a strategy reads from ``ClassifierSystem``."""

    def __init__(self, backbone: nn.Module, num_classes: int = 3) -> None:
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(backbone.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def channel_pruner(arch: str, final: float = 0.5, mode: str = "layer",
                   system: System | None = None, start: float = 0.5,
                   end: float = 7.0) -> tuple[System, ChannelPruning]:
    """``arch`` at 32 px under a :class:`ChannelPruning` with 10 steps per epoch, an update every
    epoch (few updates: each ranks every group again, seconds on a busy 2-core machine); by
    default 10 % at step 5 to ``final`` at step 69, the study's window."""
    torch.manual_seed(0)
    system = system or System(build_backbone(arch, weights=None, image_size=32))
    pruner = ChannelPruning(system, conv_layers(system.backbone, "backbone"),
                            torch.randn(2, 3, 32, 32), final, 0.1, 4.0, start, end, "epoch", 1.0,
                            mode)
    pruner.resolve(10)
    return system, pruner


def run_schedule(pruner: ChannelPruning, until: int | None = None) -> None:
    """The updates the callback makes, in order, up to step ``until`` (default: all)."""
    for step in pruner.due_steps():
        if until is not None and step > until:
            break
        if step <= pruner.last_step:
            continue
        pruner.apply(step)
        pruner.last_step = step


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("arch", ["resnet18", "densenet121", "small_cnn"])
def test_channels_removed_to_the_target_and_model_runs(arch: str) -> None:
    system, pruner = channel_pruner(arch, start=0, end=0)  # one shot before the first step
    assert pruner.due_steps() == [0]
    before = _params(system)
    run_schedule(pruner)
    for name, c in pruner.initial_channels.items():
        assert pruner.layers[name].out_channels == math.floor(c * 0.5), name
    assert pruner.sparsity() == pytest.approx(0.5, abs=0.01)
    # The head keeps its outputs; it loses the inputs the last conv no longer makes (small_cnn
    # ends with a Linear, which only loses inputs itself).
    assert system.head.out_features == 3
    assert (system.head.in_features < system.backbone.feature_dim) == (arch != "small_cnn")
    with torch.no_grad():
        assert system.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert _params(system) < 0.5 * before


def test_schedule_is_followed_in_channels() -> None:
    system, pruner = channel_pruner("resnet18", final=0.7)
    assert pruner.due_steps() == [5, 15, 25, 35, 45, 55, 65, 69]
    for until in (5, 25, 45, 69):
        run_schedule(pruner, until)
        want = pruner.scheduled(until)
        for name, c in pruner.initial_channels.items():
            # torch-pruning keeps int(C * (1 - ratio)) of a group's original channels.
            assert pruner.layers[name].out_channels == int(c * (1 - want)), (until, name)


def test_global_mode_ranks_groups_together() -> None:
    system, pruner = channel_pruner("resnet18", mode="global", start=0, end=0)
    run_schedule(pruner)
    kept = [m.out_channels / pruner.initial_channels[n] for n, m in pruner.layers.items()]
    assert 0.2 < pruner.sparsity() < 0.8 and max(kept) - min(kept) > 0.05
    with torch.no_grad():
        assert system.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_optimizer_follows_the_pruned_parameters() -> None:
    """State (Adam moments) is sliced to the kept channels; training goes on in place."""
    system, pruner = channel_pruner("resnet18")
    opt = torch.optim.AdamW(system.parameters(), lr=1e-2)
    pruner.optimizers = [opt]
    x = torch.randn(4, 3, 32, 32)

    def train_step() -> None:
        loss = system(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    train_step()
    run_schedule(pruner, until=15)  # mid-schedule: the optimizer has state for every tensor
    held = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in system.parameters()}
    for p in held:
        assert opt.state[p]["exp_avg"].shape == p.shape
    conv = pruner.layers["backbone.stages.4.layer4.1.conv2"]
    before = conv.weight.detach().clone()
    train_step()
    assert not torch.equal(before, conv.weight.detach())
    assert opt.param_groups[0]["lr"] == 1e-2


def test_frozen_layers_stay_frozen_and_channels_last_is_kept() -> None:
    torch.manual_seed(0)
    system = System(build_backbone("resnet18", weights=None, image_size=32))
    system = system.to(memory_format=torch.channels_last)
    frozen = system.backbone.stages[:2]
    for p in frozen.parameters():
        p.requires_grad_(False)
    system.backbone.frozen_prefix = 2  # those stages run under no_grad, as freeze sets it
    system.train()
    system, pruner = channel_pruner("resnet18", system=system, start=0, end=0)
    assert system.training and system.backbone.frozen_prefix == 2  # tracing put back as it was
    run_schedule(pruner)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in system.backbone.stages[2:].parameters())
    stem = pruner.layers["backbone.stages.0.conv1"]
    assert stem.out_channels == 32
    assert stem.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"structure": "bogus"}, "strategy.prune.structure='bogus'"),
    ({"structure": "channel", "scope": "all"}, "strategy.prune.scope=conv"),
    ({"structure": "channel", "include_head": True}, "include_head=false"),
    ({"structure": "channel", "latency_batch": 0}, "strategy.prune.latency_batch=0"),
])
def test_bad_options_name_the_key(kwargs: dict, fragment: str) -> None:
    with pytest.raises(EffbenchError, match=fragment) as err:
        Prune("prune", **kwargs)
    assert "\n" not in str(err.value)


def _context(tmp_path: Path, overrides: list[str]) -> RunContext:
    """What effbench.run.run does up to configure_model, keeping the context for inspection."""
    cfg = compose_cfg([*TINY, *R18, *overrides])
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    pl.seed_everything(0, verbose=False)
    ctx = build_run(cfg, tmp_path / "run")
    ctx.resume = None
    for t in ctx.techniques:
        t.check(ctx)
    for t in ctx.techniques:
        t.configure_model(ctx)
    return ctx


def test_lightning_fit_prunes_mid_training_and_frozen_weights_never_train(tmp_path: Path) -> None:
    """[freeze,prune]: torch-pruning resizes frozen layers; they keep requires_grad=False and
    their surviving values are untouched (a subset of the initial ones)."""
    ctx = _context(tmp_path, ["strategy=[freeze,prune]", "strategy.freeze.frozen_stages=1",
                              *STEPS])
    prune_t = next(t for t in ctx.techniques if t.name == "prune")
    stem = prune_t._pruner.layers["backbone.stages.0.conv1"]
    initial = set(stem.weight.detach().flatten().tolist())
    pipeline.fit(ctx, ctx.techniques, ctx.recipe)
    pruner = prune_t._pruner
    assert [h["step"] for h in pruner.history] == [0, 1, 2, 3]
    assert pruner.history[-1]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert stem.out_channels == 32 and not stem.weight.requires_grad
    assert set(stem.weight.detach().flatten().tolist()) <= initial
    (opt,) = pruner.optimizers
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in ctx.system.parameters() if p.requires_grad}
    facts = prune_t.finalize(ctx)
    assert facts["model"]["params_after"] == _params(ctx.system)


def test_end_to_end_summary_counts_are_the_models(tmp_path: Path) -> None:
    summary = run_job(tmp_path, [*R18, *STEPS])
    assert summary["status"] == "completed", summary["error"]
    s = load_summary(tmp_path / "run")
    st, m = s["strategy"]["prune"], s["model"]
    assert st["schedule_completed"] and st["channel_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert [h["step"] for h in st["schedule_history"]] == [0, 1, 2, 3]
    assert st["schedule_history"][0]["sparsity"] == pytest.approx(0.1, abs=0.02)
    # The model tested and measured is the pruned one: summary params are its parameters.
    assert m["params_after"] == m["params_total"] < 0.5 * m["params_before"]
    assert m["macs_after"] < 0.5 * m["macs_before"]
    assert m["size_bytes_structured"] == m["size_bytes"] < m["size_bytes_before"]
    assert m["speedup"] == pytest.approx(m["latency_ms_before"] / m["latency_ms_after"])
    assert s["time_s"]["latency"] > 0
    assert "channels removed 50.0%" in s["headline"]

    # Resuming a channel-pruned run is refused in one sentence (its layers are smaller).
    again = run_job(tmp_path / "again", [*R18, *STEPS,
                                         f"resume={tmp_path / 'run/checkpoints/last.ckpt'}"])
    assert again["status"] == "failed" and "cannot continue" in again["error"]
    assert "\n" not in again["error"]


def test_prune_then_qat_quantizes_the_pruned_model(tmp_path: Path) -> None:
    summary = run_job(tmp_path, [*R18, *STEPS, "strategy=[prune,qat]",
                                 "strategy.qat.latency_min_time=0.05",
                                 "strategy.qat.latency_batch=4", "strategy.qat.int8_eval=false"])
    assert summary["status"] == "completed", summary["error"]
    s = load_summary(tmp_path / "run")
    m, q = s["model"], s["strategy"]["qat"]
    assert m["params_after"] < 0.5 * m["params_before"]
    # QAT's fp32 reference is the pruned model: its size is the structured size.
    assert m["size_bytes_fp32"] == pytest.approx(m["size_bytes_structured"], rel=0.02)
    assert m["size_bytes_int8"] < m["size_bytes_fp32"] and q["latency_ms"]["int8"] > 0


def test_cli_run(tmp_path: Path) -> None:
    res = run_cli(["strategy=prune", "strategy.prune.structure=channel", *TINY_MULTILABEL,
                   "trainer.max_epochs=2", "strategy.prune.end=1.5",
                   "strategy.prune.latency_min_time=0.05",
                   f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    s = load_summary(tmp_path / "run")
    assert s["status"] == "completed" and "test/auroc_macro" in s["metrics"]
    assert s["strategy"]["prune"]["channel_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert "channels removed" in res.stdout + res.stderr


def test_cli_bad_structure_is_one_line(tmp_path: Path) -> None:
    res = run_cli(["strategy=prune", "strategy.prune.structure=bogus", *TINY_MULTILABEL,
                   f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert res.returncode == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("effbench: error:")]
    assert len(lines) == 1 and "strategy.prune.structure='bogus'" in lines[0]
