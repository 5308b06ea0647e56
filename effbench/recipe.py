"""The training recipe (``optim`` config group), read once and shared by every technique: the
optimizer factory, the learning-rate schedule (ReduceLROnPlateau, or a cosine with linear warm-up),
early stopping, the checkpoint that gets tested, class weights."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from effbench.errors import EffbenchError, unknown_keyword

log = logging.getLogger(__name__)

# (optimizer steps in the whole training, optimizer steps per epoch)
Stepping = tuple[int, int]


@dataclass
class Recipe:
    optimizer: Callable[..., Any]          # params → torch.optim.Optimizer (a partial)
    lr: float
    scheduler: dict[str, Any] | None
    early_stopping: dict[str, Any] | None
    checkpoint: bool
    monitor: str
    class_weights: bool

    @classmethod
    def from_config(cls, optim: DictConfig) -> Recipe:
        node = optim.optimizer
        target = node.get("_target_")
        try:
            factory = instantiate(node)
        except Exception as err:  # noqa: BLE001 - Hydra wraps import/constructor errors
            raise EffbenchError(f"optim.optimizer._target_={target} cannot be built "
                                f"({type(err).__name__}); use a torch.optim class such as "
                                "torch.optim.Adam, or optim=sgd / adamw.") from err
        if not isinstance(factory, partial):
            raise EffbenchError("optim.optimizer needs _partial_: true (the pipeline passes the "
                                "parameters); keep it as in conf/optim/default.yaml.")
        check_builds(factory, target, float(node.get("lr", 1e-3)))
        return cls(optimizer=factory, lr=float(node.get("lr", 1e-3)),
                   scheduler=_plain(optim.get("scheduler")),
                   early_stopping=_plain(optim.get("early_stopping")),
                   checkpoint=bool(optim.get("checkpoint", True)),
                   monitor=str(optim.get("monitor", "val/loss")),
                   class_weights=bool(optim.get("class_weights", False)))

    def callbacks(self, run_dir: Path, ready: list[Callable[[pl.Trainer], bool]]) -> list[Callback]:
        """The best-``monitor`` checkpoint (chosen among epochs where every gate is ready)
        with ``last.ckpt`` for resuming, and early stopping."""
        cbs: list[Callback] = []
        ckpt_dir = run_dir / "checkpoints"
        if self.checkpoint:
            cbs.append(GatedCheckpoint(ready, dirpath=ckpt_dir, monitor=self.monitor, mode="min",
                                       filename="best"))
        cbs.append(last_checkpoint(ckpt_dir))
        if self.early_stopping and self.early_stopping.get("patience") is not None:
            # strict=False: trainer.max_steps may end training mid-epoch, before any validation.
            cbs.append(EarlyStopping(monitor=self.monitor, mode="min", strict=False,
                                     patience=int(self.early_stopping["patience"])))
        return cbs


def unfused_for_clipping(recipe: Recipe, optim: DictConfig, precision: str,
                         clip: float | None, fused_by_user: bool) -> Recipe:
    """The recipe that can run gradient clipping under mixed precision.

    Lightning refuses to clip the gradients of an optimizer that unscales them itself (fused
    Adam: "does not allow for gradient clipping") whenever a mixed precision is on. The recipe's
    fused default then steps with torch's multi-tensor path instead (the same update, a few
    per-cent slower on CPU), said once and recorded in resolved_config.yaml; a ``fused=true`` the
    user set is refused with the fix."""
    keywords = recipe.optimizer.keywords
    if not clip or not precision.endswith("-mixed") or not keywords.get("fused"):
        return recipe
    if fused_by_user:
        raise EffbenchError(f"optim.optimizer.fused=true cannot run with trainer.gradient_clip_val="
                            f"{clip:g} under trainer.precision={precision} (Lightning cannot clip "
                            "the gradients a fused optimizer unscales itself); remove "
                            "optim.optimizer.fused=true or the clipping.")
    log.warning("trainer.gradient_clip_val under %s: the optimizer steps unfused "
                "(optim.optimizer.fused=false foreach=true), as Lightning cannot clip the "
                "gradients a fused optimizer unscales itself", precision)
    optim.optimizer.fused, optim.optimizer.foreach = False, True
    factory = partial(recipe.optimizer.func, *recipe.optimizer.args,
                      **{**keywords, "fused": False, "foreach": True})
    return dataclasses.replace(recipe, optimizer=factory)


def check_builds(factory: partial, target: str, lr: float) -> None:
    """Build the optimizer once, on a one-element parameter, before the run starts: an option
    torch refuses (an unknown keyword, betas outside [0, 1), ``fused`` with ``foreach``) is one
    sentence naming optim.optimizer, not a traceback from inside Lightning's set-up."""
    try:
        factory([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    except TypeError as err:
        key = unknown_keyword(err)
        if key is None:
            raise
        raise EffbenchError(f"optim.optimizer.{key} is not an option of {target}; remove "
                            f"optim.optimizer.{key}=… (see `effbench --cfg job` for the "
                            "options).") from err
    except (ValueError, RuntimeError) as err:
        raise EffbenchError(f"{target} refuses optim.optimizer ({str(err).rstrip('.')}); change "
                            "that option (conf/optim/default.yaml has the recipe's).") from err


def last_checkpoint(ckpt_dir: Path) -> ModelCheckpoint:
    """``last.ckpt`` after every validated epoch, whatever the gates say, so ``resume=…``
    continues a killed run. Lightning's ``save_last=True`` with ``save_top_k=0`` writes it only
    when training ends; an unmonitored top-1 checkpoint named ``last`` is rewritten each epoch."""
    return ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1,
                           every_n_epochs=1, enable_version_counter=False)


class GatedCheckpoint(ModelCheckpoint):
    """Tracks the best checkpoint only at epochs where every gate (a technique's callback's
    ``checkpoint_ready``) says the model is what it delivers (e.g. at its final sparsity), so
    the model tested is that one."""

    def __init__(self, ready: list[Callable[[pl.Trainer], bool]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._ready = list(ready)

    def _all_ready(self, trainer: pl.Trainer) -> bool:
        return all(r(trainer) for r in self._ready)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._all_ready(trainer):
            super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._all_ready(trainer):
            super().on_train_epoch_end(trainer, pl_module)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def schedule_name(scheduler: dict[str, Any] | None) -> str | None:
    """``optim.scheduler.name`` (a config without one: plateau, what it meant before names), or
    None when the schedule is off."""
    return str(scheduler.get("name") or "plateau") if scheduler else None


def per_step(scheduler: dict[str, Any] | None) -> bool:
    """Whether the schedule is stepped after every optimizer step and so needs the loop's
    :data:`Stepping` to be built."""
    return schedule_name(scheduler) == "cosine"


@dataclass
class PendingSchedule:
    """A per-step schedule not built yet, in ``configure_optimizers``' answer outside Lightning's
    fit: only the loop that trains knows its optimizer steps, so it calls :meth:`build`."""

    scheduler: dict[str, Any]
    monitor: str

    def build(self, opt: torch.optim.Optimizer, stepping: Stepping) -> dict[str, Any]:
        entry = lr_scheduler(opt, self.scheduler, self.monitor, stepping)
        assert entry is not None
        return entry


def lr_scheduler(opt: torch.optim.Optimizer, scheduler: dict[str, Any] | None, monitor: str,
                 stepping: Stepping | None = None) -> dict[str, Any] | None:
    """The recipe's schedule for ``opt`` as Lightning's ``lr_scheduler`` entry (the one place it
    is built: the system's ``configure_optimizers`` and any hand-written loop use it); None when
    off. A per-step schedule needs ``stepping``."""
    name = schedule_name(scheduler)
    if name is None:
        return None
    assert scheduler is not None
    if name == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=scheduler["factor"], patience=scheduler["patience"],
            min_lr=scheduler["min_lr"])
        # strict=False: trainer.max_steps may end training before any validation.
        return {"scheduler": sched, "monitor": monitor, "strict": False}
    if stepping is None:
        raise ValueError(f"the {name} schedule needs the loop's optimizer steps")
    return {"scheduler": cosine_schedule(opt, scheduler, *stepping), "interval": "step"}


def warmup_steps(warmup_epochs: float, per_epoch: int) -> int:
    """Warm-up epochs (a float allowed) in optimizer steps."""
    return round(float(warmup_epochs) * per_epoch)


def cosine_schedule(opt: torch.optim.Optimizer, scheduler: dict[str, Any], total: int,
                    per_epoch: int) -> LRScheduler:
    """The rate rises linearly from ``warmup_start_factor`` × lr to lr over ``warmup_epochs``,
    then follows a cosine down to ``min_lr``, reached when the ``total``-th (last) optimizer step
    is done. Stepped once per optimizer step, as Lightning steps ``interval: step``.

    torch's own schedulers: ``SequentialLR`` restores the initial rate the second scheduler's
    constructor overwrote and switches to the cosine at the milestone with its closed form
    (lr itself), so the warm-up's last value and the cosine's first agree."""
    warm = warmup_steps(scheduler["warmup_epochs"], per_epoch)
    if warm >= total:
        raise EffbenchError(f"optim.scheduler.warmup_epochs={scheduler['warmup_epochs']} is "
                            f"{warm} optimizer steps, not fewer than the {total} steps of the "
                            "whole training, so the cosine after it would have no step; use a "
                            "shorter warm-up (e.g. optim.scheduler.warmup_epochs="
                            f"{total / 2 / per_epoch:g}) or train longer.")
    if warm == 0:
        return CosineAnnealingLR(opt, T_max=total, eta_min=float(scheduler["min_lr"]))
    start = float(scheduler["warmup_start_factor"])
    warmup = LinearLR(opt, start_factor=start, end_factor=1.0, total_iters=warm)
    cosine = CosineAnnealingLR(opt, T_max=total - warm, eta_min=float(scheduler["min_lr"]))
    return WarmupThenCosine(opt, [warmup, cosine], milestones=[warm])


class WarmupThenCosine(SequentialLR):
    """torch's ``SequentialLR``, told of parameter groups added to the optimizer after it was
    built (a technique that unfreezes layers during the fit adds them). At the milestone it starts
    the cosine from the cosine's base rates, one per group it was built with, and torch refuses a
    group it has none for (``zip(strict=True)``); a new group gets the base rate that keeps its
    ratio to the first group, so it follows the same curve. Between milestones torch's linear and
    cosine steps scale every group's own rate and need nothing."""

    def step(self) -> None:  # type: ignore[override]
        groups = self.optimizer.param_groups
        for sched in self._schedulers:
            known = len(sched.base_lrs)
            if known < len(groups):
                scale = sched.base_lrs[0] / float(groups[0]["lr"] or sched.base_lrs[0])
                sched.base_lrs.extend(float(g["lr"]) * scale for g in groups[known:])
        super().step()
