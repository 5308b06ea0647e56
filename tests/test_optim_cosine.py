"""``optim=cosine``: a linear warm-up from ``warmup_start_factor`` × lr to lr over
``warmup_epochs``, then a cosine down to ``min_lr`` at the end of training, stepped after every
optimizer step — in Lightning's fit, in the precomputed head loops (one by one and batched), under
SWA; and the refusals of keys that do not belong to the chosen schedule."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from pytorch_lightning.trainer.states import TrainerFn

from effbench.losses import CrossEntropy
from effbench.recipe import PendingSchedule, Recipe, cosine_schedule
from effbench.system import ClassifierSystem
from effbench.techniques.precomputed.batched import PRETRAINED, HeadJob, train_heads
from effbench.techniques.precomputed.head_training import (
    HeadTraining,
    bind_schedule,
    head_steps,
    train_head,
)
from effbench.techniques.precomputed.heads import build_head
from effbench.techniques.precomputed.launcher import pretrain
from tests.conftest import TINY, compose_cfg, run_cli, run_job
from tests.helpers.cli import one_error_line
from tests.helpers.tiny import tiny

LR, START, MIN = 0.01, 0.01, 1e-4
# 64 training images in batches of 16: 4 optimizer steps per epoch.
SMALL = ["backbone=small_cnn", "dataset.batch_size=16", f"optim.optimizer.lr={LR}"]


def _recipe(*overrides: str) -> Recipe:
    return Recipe.from_config(compose_cfg(["optim=cosine", *overrides]).optim)


def _system(recipe: Recipe, head: torch.nn.Module | None = None) -> ClassifierSystem:
    return ClassifierSystem(torch.nn.Identity(), head or torch.nn.Linear(8, 3), CrossEntropy(),
                            "multiclass", ["a", "b", "c"],
                            {"factory": recipe.optimizer, "lr": recipe.lr}, recipe.scheduler,
                            recipe.monitor)


def _fitting(system: ClassifierSystem, total: int, per_epoch: int) -> None:
    """What configure_optimizers reads of Lightning's trainer during a fit."""
    system._trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING),
                                      estimated_stepping_batches=total,
                                      num_training_batches=per_epoch, accumulate_grad_batches=1)


def _expected(k: int, total: int, warm: int, lr: float = LR, low: float = MIN) -> float:
    """The rate after ``k`` optimizer steps (the one step ``k`` uses)."""
    if k < warm:
        return lr * (START + (1 - START) * k / warm)
    return low + (lr - low) * (1 + math.cos(math.pi * (k - warm) / (total - warm))) / 2


def _driven(sched: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    opt = sched.optimizer
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(steps):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("warmup_epochs, warm", [(1, 4), (0.5, 2), (0, 0)])
def test_configure_optimizers_follows_warmup_then_cosine(warmup_epochs: float, warm: int) -> None:
    system = _system(_recipe(f"optim.optimizer.lr={LR}", f"optim.scheduler.min_lr={MIN}",
                             f"optim.scheduler.warmup_epochs={warmup_epochs}"))
    _fitting(system, total=20, per_epoch=4)
    answer = system.configure_optimizers()
    assert answer["lr_scheduler"]["interval"] == "step"
    lrs = _driven(answer["lr_scheduler"]["scheduler"], 20)
    assert lrs[0] == pytest.approx(START * LR if warm else LR)
    assert lrs[warm] == pytest.approx(LR)
    assert lrs[-1] == pytest.approx(MIN)
    assert lrs == pytest.approx([_expected(k, 20, warm) for k in range(21)])
    after = lrs[warm:]
    assert all(a > b for a, b in zip(after, after[1:]))  # a monotone cosine after the warm-up


def test_plateau_stays_the_default_and_a_group_added_later_follows_the_cosine() -> None:
    default = Recipe.from_config(compose_cfg([]).optim)
    answer = _system(default).configure_optimizers()
    plateau = answer["lr_scheduler"]["scheduler"]
    assert isinstance(plateau, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert (plateau.patience, plateau.factor) == (5, 0.1)
    assert answer["lr_scheduler"]["monitor"] == "val/loss"
    # A parameter group joins during the warm-up (layers unfrozen): it keeps its ratio.
    first = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([first], lr=LR)
    sched = cosine_schedule(opt, _recipe().scheduler, total=12, per_epoch=4)
    _driven(sched, 2)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))],
                         "lr": opt.param_groups[0]["lr"] * 0.1})
    for _ in range(10):
        opt.step()
        sched.step()
        head, added = (g["lr"] for g in opt.param_groups)
        assert added == pytest.approx(0.1 * head)
    assert head == pytest.approx(0.0)  # optim=cosine: min_lr 0


def _lrs_per_epoch(run_dir: Path) -> list[float]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return [float(r["lr-Adam"]) for r in csv.DictReader(f) if r.get("lr-Adam")]


def test_a_run_records_the_schedule_per_epoch(tmp_path: Path) -> None:
    summary = run_job(tmp_path, [*tiny(epochs=4), *SMALL, "optim=cosine"])
    assert summary["status"] == "completed", summary["error"]
    assert summary["epochs"] == 4
    # Logged at each epoch's start: steps 0, 4, 8, 12 of 16, warm-up 4 steps, min_lr 0.
    lrs = _lrs_per_epoch(tmp_path / "run")
    assert lrs == pytest.approx([_expected(k, 16, 4, low=0.0) for k in (0, 4, 8, 12)])
    assert lrs[1] > lrs[2] > lrs[3]


def test_swa_takes_over_from_the_cosine(tmp_path: Path) -> None:
    """SWA swaps its own schedule in when averaging starts (epoch 4 of 5): the cosine until then,
    then the rate averaging started with (swa_lrs: null), held."""
    summary = run_job(tmp_path, [*tiny(epochs=5), *SMALL, "optim=cosine", "strategy=swa"])
    assert summary["status"] == "completed", summary["error"]
    lrs = _lrs_per_epoch(tmp_path / "run")
    cosine = [_expected(k, 20, 4, low=0.0) for k in (0, 4, 8, 12)]
    assert lrs == pytest.approx([*cosine, cosine[-1]])
    assert summary["strategy"]["swa"]["swa_lrs_used"] == pytest.approx([cosine[-1]])


def _features(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def test_the_head_loops_step_it_per_optimizer_step() -> None:
    """Outside Lightning's fit the schedule waits for the loop's steps; both head loops build it
    for epochs × batches per epoch and step it after every optimizer step."""
    recipe = _recipe(f"optim.optimizer.lr={LR}", f"optim.scheduler.min_lr={MIN}")
    train, val = _features(50, 0), _features(20, 1)
    cfg = HeadTraining(epochs=3, batch_size=16)  # 3 batches of 16 and one of 2: 4 steps
    assert head_steps(50, 16) == 4 and head_steps(49, 16) == 3  # a batch of one is skipped
    expected = [_expected(k, 12, 4) for k in range(12)]

    def traced(answer: dict) -> tuple[dict, list[float]]:
        lrs: list[float] = []
        answer["optimizer"].register_step_pre_hook(
            lambda opt, *_: lrs.append(opt.param_groups[0]["lr"]))
        return answer, lrs

    head = build_head("linear", 8, 3)
    answer, lrs = traced(_system(recipe, head).configure_optimizers())
    assert isinstance(answer["lr_scheduler"], PendingSchedule)
    train_head(head, CrossEntropy(), answer, train, val, "multiclass", ["a", "b", "c"], cfg,
               lambda row, step: None)
    assert lrs == pytest.approx(expected)
    assert answer["optimizer"].param_groups[0]["lr"] == pytest.approx(MIN)

    jobs, traces = [], []
    for _ in range(2):
        head = build_head("linear", 8, 3)
        answer, lrs = traced(_system(recipe, head).configure_optimizers())
        jobs.append(HeadJob(head, CrossEntropy(), bind_schedule(answer, cfg.epochs, 4), cfg,
                            lambda row, step: None))
        traces.append(lrs)
    train_heads(jobs, train, val, "multiclass", ["a", "b", "c"], torch.device("cpu"))
    assert traces == [pytest.approx(expected)] * 2


PRE = ["strategy=precomputed", "backbone=resnet18", "backbone.weights=null",
       "dataset.resolution=16", "dataset.image_size=16", "strategy.precomputed.save_model=false"]


def test_precomputed_jobs_with_the_cosine_one_by_one_and_batched(tmp_path: Path) -> None:
    """A precomputed job trains its head under the cosine; the batched launcher's heads (the
    schedule bound in ``pretrain``) give the numbers of the jobs trained one by one."""
    cosine = [*PRE, "optim=cosine", "trainer.max_epochs=3"]
    first = run_job(tmp_path / "first", cosine)  # builds the feature cache
    assert first["status"] == "completed", first["error"]
    assert first["strategy"]["precomputed"]["head_epochs"] == 3
    heads = [["optim.optimizer.lr=0.01"], ["optim.optimizer.lr=0.003"]]
    alone = [run_job(tmp_path / f"s{i}", [*cosine, *h]) for i, h in enumerate(heads)]
    tasks = [compose_cfg([*TINY, *cosine, *h]) for h in heads]
    for task in tasks:
        OmegaConf.set_struct(task, False)
        del task["hydra"]
    pretrain(tasks, tmp_path / "work")
    batched = [run_job(tmp_path / f"b{i}", [*cosine, *h]) for i, h in enumerate(heads)]
    assert not PRETRAINED  # each job took its head
    for a, b in zip(alone, batched):
        assert b["strategy"]["precomputed"]["batched"]["heads"] == 2
        assert b["metrics"] == pytest.approx(a["metrics"], abs=1e-5)
        assert b["best_val"] == pytest.approx(a["best_val"], rel=1e-3, abs=1e-5)


BAD = [
    (["optim=cosine", "optim.scheduler.patience=3"],
     ["optim.scheduler.patience=3", "optim.scheduler.name=cosine", "patience=null"]),
    (["optim=cosine", "optim.scheduler.factor=0.5"], ["optim.scheduler.factor=0.5", "plateau"]),
    (["optim.scheduler.name=cosine"], ["optim.scheduler.patience=5", "optim=cosine"]),
    (["optim.scheduler.warmup_epochs=2"],
     ["optim.scheduler.warmup_epochs=2", "optim.scheduler.name=plateau", "optim=cosine"]),
    (["optim.scheduler.name=step"], ["optim.scheduler.name='step'", "plateau or cosine"]),
    (["optim=cosine", "optim.scheduler.warmup_epochs=-1"],
     ["optim.scheduler.warmup_epochs=-1", ">= 0"]),
    (["optim=cosine", "optim.scheduler.warmup_start_factor=0"],
     ["optim.scheduler.warmup_start_factor=0", "(0, 1]"]),
    (["optim=cosine", "optim.scheduler.warmup_start_factor=1.5"],
     ["optim.scheduler.warmup_start_factor=1.5", "(0, 1]"]),
    (["optim=cosine", "optim.scheduler.warmup_epochs=null"],
     ["optim.scheduler.warmup_epochs=null", "warmup_epochs=1"]),
    (["optim=cosine", "optim.scheduler.warmup_epochs=2"],
     ["optim.scheduler.warmup_epochs=2", "trainer.max_epochs=2", "shorter warm-up"]),
    # Steps are known once the run starts: trainer.max_steps cuts the training to the warm-up.
    (["optim=cosine", *SMALL, "+trainer.max_steps=4"],
     ["optim.scheduler.warmup_epochs=1", "4 optimizer steps", "shorter warm-up"]),
]


@pytest.mark.parametrize("overrides, named", BAD, ids=lambda v: " ".join(v)[:60])
def test_refusals_are_one_sentence(tmp_path: Path, overrides: list[str],
                                   named: list[str]) -> None:
    line = one_error_line(run_cli([*tiny(epochs=2), *overrides], cwd=tmp_path))
    assert all(n in line for n in named), line
