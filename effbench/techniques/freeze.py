"""``freeze``: train only the end of the backbone (selective freezing, linear probing, "unfreeze
the last N layers") and optionally unfreeze more of it at given epochs with a lower learning rate.

What is frozen (see docs/freeze.md):

- ``frozen_stages=k`` counts the backbone's blocks *after the stem* (``Backbone.stages[1:]``):
  ``k=0`` freezes nothing (full fine-tuning), ``k>=1`` freezes the stem and the first ``k``
  blocks, i.e. ``stages[:k + 1]``; ``k=all`` (= the number of blocks) freezes the whole backbone,
  a linear probe. For ResNet18 the blocks are layer1..layer4, so ``k=0..4`` are the
  selective-freezing study's "0-4 frozen blocks".
- ``unfreeze_last_layers=N`` then makes the last ``N`` *layers* of the backbone trainable again; a
  layer is a module that holds parameters itself (conv, linear, norm), counted from the output in
  definition order, which follows the forward pass (a residual block's shortcut counts after its
  main branch).
- ``unfreeze_at_epochs=[e1, e2, ...]``: at the start of each listed epoch the frozen part nearest
  the output becomes trainable: the last still-frozen stage, or the last ``unfreeze_step_layers``
  frozen layers. Their parameters join the optimizer as a new group at ``backbone_lr_factor``
  times the head's current learning rate (Lightning's ``BaseFinetuning``, whose state dict makes
  it resumable).

Frozen parameters get ``requires_grad=False`` and stay out of the optimizer; the leading stages
with no trainable parameter run under ``torch.no_grad`` (``Backbone.frozen_prefix``), so they keep
no activations for backward. With ``frozen_bn_eval`` (default) frozen BatchNorm layers, and every
module of that frozen prefix (dropout, stochastic depth), are put in eval mode at the start of
every training epoch, so running statistics stay what the pretrained weights had.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BaseFinetuning, Callback
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from effbench.backbones.base import Backbone
from effbench.errors import EffbenchError
from effbench.technique import Technique, register

if TYPE_CHECKING:
    from effbench.context import RunContext

ALL = "all"


# -- what is a layer, what is frozen ------------------------------------------------------------
def _holds_params(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def backbone_layers(backbone: Backbone) -> list[nn.Module]:
    """The backbone's layers (modules holding parameters themselves), input to output."""
    return [m for stage in backbone.stages for m in stage.modules() if _holds_params(m)]


def stage_layers(backbone: Backbone) -> list[list[nn.Module]]:
    return [[m for m in stage.modules() if _holds_params(m)] for stage in backbone.stages]


def frozen_stage_count(backbone: Backbone, frozen_stages: int | str) -> int:
    """How many leading stages ``frozen_stages`` freezes: 0, or the stem plus ``k`` blocks."""
    blocks = len(backbone.stages) - 1
    if frozen_stages == ALL:
        return blocks + 1
    if isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int) or not (
            0 <= frozen_stages <= blocks):
        raise EffbenchError(f"invalid value strategy.freeze.frozen_stages={frozen_stages!r}: "
                            f"{backbone.name} has a stem and {blocks} blocks, so use an integer "
                            f"0..{blocks} (blocks frozen after the stem) or all.")
    return 0 if frozen_stages == 0 else frozen_stages + 1


def _frozen_text(frozen: int | None, total: int | None) -> str:
    """``frozen_stages`` as the user set it: blocks after the stem (the stem goes with them)."""
    if frozen is None or total is None:
        return "frozen n/a"
    if frozen == 0:
        return f"frozen 0/{total - 1} blocks"
    return f"frozen stem + {frozen - 1}/{total - 1} blocks"


def initial_frozen_layers(backbone: Backbone, frozen_stages: int | str,
                          unfreeze_last_layers: int) -> list[nn.Module]:
    """Layers of the first stages, minus the last ``unfreeze_last_layers`` of the backbone."""
    layers = backbone_layers(backbone)
    if unfreeze_last_layers > len(layers):
        raise EffbenchError("invalid value "
                            f"strategy.freeze.unfreeze_last_layers={unfreeze_last_layers}: "
                            f"{backbone.name} has {len(layers)} layers; use 0..{len(layers)}.")
    n = frozen_stage_count(backbone, frozen_stages)
    frozen = [m for stage in stage_layers(backbone)[:n] for m in stage]
    keep = {id(m) for m in layers[len(layers) - unfreeze_last_layers:]}
    return [m for m in frozen if id(m) not in keep]


def set_trainable(modules: Iterable[nn.Module], trainable: bool) -> None:
    for module in modules:
        for p in module.parameters(recurse=False):
            p.requires_grad_(trainable)


def is_frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def fully_frozen_prefix(backbone: Backbone) -> int:
    """Number of leading stages without a trainable parameter (they may run without autograd)."""
    count = 0
    for stage in backbone.stages:
        if not is_frozen(stage):
            break
        count += 1
    return count


def freeze_modes(backbone: Backbone) -> None:
    """Eval mode for the frozen prefix and every frozen BatchNorm: running stats stay as loaded."""
    for stage in backbone.stages[:backbone.frozen_prefix]:
        stage.eval()
    for module in backbone.modules():
        if isinstance(module, _BatchNorm) and _holds_params(module) and is_frozen(module):
            module.eval()


def count_params(modules: Iterable[nn.Module], trainable: bool | None = None) -> int:
    return sum(p.numel() for m in modules for p in m.parameters(recurse=False)
               if trainable is None or p.requires_grad == trainable)


# -- callbacks ------------------------------------------------------------------------------------
class FreezeSchedule(BaseFinetuning):
    """Initial freeze before the optimizer is built, optional unfreezing at given epochs, eval mode
    for frozen BatchNorm at every epoch start (Lightning restores, but never sets, module modes)."""

    def __init__(self, frozen_stages: int | str, unfreeze_last_layers: int, frozen_bn_eval: bool,
                 unfreeze_at_epochs: Sequence[int], unfreeze_step_layers: int | None,
                 backbone_lr_factor: float, unfreeze_lr: float | None = None) -> None:
        super().__init__()
        self.unfreeze_lr = unfreeze_lr
        self.frozen_stages, self.unfreeze_last_layers = frozen_stages, unfreeze_last_layers
        self.frozen_bn_eval, self.milestones = frozen_bn_eval, sorted(unfreeze_at_epochs)
        self.step_layers, self.lr_factor = unfreeze_step_layers, backbone_lr_factor
        self.steps_done = 0
        self.events: list[dict[str, Any]] = []
        # The backbone this schedule freezes, held directly: a later technique may replace
        # system.backbone by a graph that shares its parameters (qat's export).
        self.backbone: Backbone | None = None

    def _bb(self, pl_module: pl.LightningModule) -> Backbone:
        return self.backbone if self.backbone is not None else pl_module.backbone

    # Initial freeze; also what configure_model applies, so the model is correct before any fit.
    def apply_initial(self, backbone: Backbone) -> None:
        set_trainable(backbone_layers(backbone), True)
        set_trainable(initial_frozen_layers(backbone, self.frozen_stages,
                                            self.unfreeze_last_layers), False)
        backbone.frozen_prefix = fully_frozen_prefix(backbone)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":  # testing after fit must not re-freeze what training unfroze
            return
        if self.milestones and trainer.world_size > 1:
            # DDP fixes the set of gradient-synchronised parameters when it wraps the model, so
            # parameters unfrozen later would train differently on every rank.
            raise EffbenchError(f"strategy.freeze.unfreeze_at_epochs={self.milestones} cannot run "
                                "on "
                                f"{trainer.world_size} processes; train on one device or set "
                                f"strategy.freeze.unfreeze_at_epochs=[].")
        super().setup(trainer, pl_module, stage)

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.apply_initial(self._bb(pl_module))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)  # on resume: re-creates the added param groups
        # A resumed run froze everything again in setup; what the optimizer holds must train.
        in_optimizer = {id(p) for opt in trainer.optimizers for g in opt.param_groups
                        for p in g["params"]}
        for p in pl_module.parameters():
            if id(p) in in_optimizer:
                p.requires_grad_(True)
        self._bb(pl_module).frozen_prefix = fully_frozen_prefix(self._bb(pl_module))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)  # calls finetune_function
        if self.frozen_bn_eval:
            freeze_modes(self._bb(pl_module))

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int,
                          optimizer: Optimizer) -> None:
        due = sum(m <= epoch for m in self.milestones)
        while self.steps_done < due:  # catches up if a milestone fell before a resume point
            self._unfreeze_step(self._bb(pl_module), epoch, optimizer)
            self.steps_done += 1

    def _next_layers(self, backbone: Backbone) -> list[nn.Module]:
        if self.step_layers is not None:
            frozen = [m for m in backbone_layers(backbone) if is_frozen(m)]
            return frozen[len(frozen) - self.step_layers:] if frozen else []
        for stage in reversed(stage_layers(backbone)):
            frozen = [m for m in stage if is_frozen(m)]
            if frozen:
                return frozen
        return []

    def _unfreeze_step(self, backbone: Backbone, epoch: int, optimizer: Optimizer) -> None:
        layers = self._next_layers(backbone)
        set_trainable(layers, True)
        # Hand-written rather than BaseFinetuning.unfreeze_and_add_param_group: that filters out
        # parameters *equal in value* to one already in the optimizer (torch.equal), which drops
        # e.g. freshly initialised BatchNorm weights (all ones). Identity is what matters here.
        known = {id(p) for g in optimizer.param_groups for p in g["params"]}
        params = [p for m in layers for p in m.parameters(recurse=False) if id(p) not in known]
        lr = optimizer.param_groups[0]["lr"] * self.lr_factor
        if self.unfreeze_lr is not None:
            # A study's second stage recompiled the whole model at one rate (Keras: head and
            # unfrozen layers at 1e-4): every existing group (the head's) moves to it as well.
            lr = float(self.unfreeze_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
        if params:
            optimizer.add_param_group({"params": params, "lr": lr})
        backbone.frozen_prefix = fully_frozen_prefix(backbone)
        self.events.append({"epoch": epoch, "layers": len(layers),
                            "params": sum(p.numel() for p in params), "lr": lr,
                            "head_lr": optimizer.param_groups[0]["lr"],
                            "frozen_prefix": backbone.frozen_prefix})

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "steps_done": self.steps_done, "events": self.events}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.steps_done = int(state_dict.get("steps_done", 0))
        self.events = list(state_dict.get("events", []))


class EpochTimer(Callback):
    """Wall time of each training epoch, from its start to the start of its validation (data
    loading included: on small data it is often the bottleneck)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._stop()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._start is not None:
            self.times.append(time.perf_counter() - self._start)
            self._start = None

    def state_dict(self) -> dict[str, Any]:
        return {"times": self.times}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.times = list(state_dict.get("times", []))


# -- the strategy ---------------------------------------------------------------------------------
def _check(ok: bool, key: str, value: Any, fix: str) -> None:
    if not ok:
        raise EffbenchError(f"invalid value strategy.freeze.{key}={value!r}: {fix}.")


def _is_int(v: Any, minimum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


@register
class Freeze(Technique):
    """Freeze the stem and the first ``frozen_stages`` blocks (``all``: linear probe), keep the
    last ``unfreeze_last_layers`` layers trainable, optionally unfreeze more at
    ``unfreeze_at_epochs``."""

    name = "freeze"
    order = 10
    acts_on = frozenset({"model", "callbacks"})

    def __init__(self, name: str = "freeze", frozen_stages: int | str = ALL,
                 unfreeze_last_layers: int = 0,
                 frozen_bn_eval: bool = True, unfreeze_at_epochs: Sequence[int] = (),
                 unfreeze_step_layers: int | None = None, backbone_lr_factor: float = 0.1,
                 unfreeze_lr: float | None = None) -> None:
        super().__init__(name)
        _check(frozen_stages == ALL or _is_int(frozen_stages, 0), "frozen_stages", frozen_stages,
               "use a number of blocks such as 2, or all")
        _check(_is_int(unfreeze_last_layers, 0), "unfreeze_last_layers", unfreeze_last_layers,
               "use 0 or a positive number of layers")
        epochs = list(unfreeze_at_epochs or [])
        _check(all(_is_int(e, 1) for e in epochs) and len(set(epochs)) == len(epochs),
               "unfreeze_at_epochs", epochs, "use a list of distinct epochs >= 1 such as [3, 6]")
        _check(unfreeze_step_layers is None or _is_int(unfreeze_step_layers, 1),
               "unfreeze_step_layers", unfreeze_step_layers,
               "use null (one stage per step) or a positive number of layers")
        _check(isinstance(backbone_lr_factor, (int, float)) and backbone_lr_factor > 0,
               "backbone_lr_factor", backbone_lr_factor, "use a positive factor such as 0.1")
        _check(unfreeze_lr is None or (isinstance(unfreeze_lr, (int, float))
                                       and not isinstance(unfreeze_lr, bool) and unfreeze_lr > 0),
               "unfreeze_lr", unfreeze_lr, "use null or a positive learning rate such as 1e-4")
        _check(unfreeze_lr is None or bool(epochs), "unfreeze_lr", unfreeze_lr,
               "it applies at unfreeze_at_epochs, which is empty: use both, or unfreeze_lr=null")
        self.unfreeze_lr = None if unfreeze_lr is None else float(unfreeze_lr)
        self.frozen_stages, self.unfreeze_last_layers = frozen_stages, unfreeze_last_layers
        self.frozen_bn_eval, self.unfreeze_at_epochs = bool(frozen_bn_eval), sorted(epochs)
        self.unfreeze_step_layers, self.backbone_lr_factor = (unfreeze_step_layers,
                                                              float(backbone_lr_factor))
        self._schedule = FreezeSchedule(frozen_stages, unfreeze_last_layers, self.frozen_bn_eval,
                                        epochs, unfreeze_step_layers, self.backbone_lr_factor,
                                        self.unfreeze_lr)
        self._timer = EpochTimer()
        self._start: dict[str, Any] = {}

    @property
    def unfreezes_during_fit(self) -> bool:  # the contract's declaration, from the options
        return bool(self.unfreeze_at_epochs)

    @property
    def holds_batchnorm_in_eval(self) -> bool:
        return self.frozen_bn_eval

    def check(self, ctx: RunContext) -> None:
        epochs = int(ctx.cfg.trainer.max_epochs)
        late = [e for e in self.unfreeze_at_epochs if e >= epochs]
        if late:
            raise EffbenchError(f"strategy.freeze.unfreeze_at_epochs={self.unfreeze_at_epochs} can "
                                "never "
                                f"take effect at epoch(s) {late}: trainer.max_epochs={epochs} "
                                f"(epochs 0..{epochs - 1}); raise trainer.max_epochs or use "
                                "earlier epochs.")

    def configure_model(self, ctx: RunContext) -> None:
        backbone = ctx.system.backbone
        self._schedule.backbone = backbone
        self._schedule.apply_initial(backbone)  # raises on a k or N this backbone cannot have
        layers = backbone_layers(backbone)
        if self.unfreeze_at_epochs and all(not is_frozen(m) for m in layers):
            raise EffbenchError(f"strategy.freeze.unfreeze_at_epochs={self.unfreeze_at_epochs} has "
                                f"nothing to unfreeze: nothing is frozen; set "
                                f"strategy.freeze.frozen_stages to a number of blocks or all.")
        self._start = {
            "stages_total": len(backbone.stages),
            "stages_frozen": frozen_stage_count(backbone, self.frozen_stages),
            "layers_total": len(layers),
            "layers_trainable_start": sum(not is_frozen(m) for m in layers),
            "params_trainable_start": sum(p.numel() for p in ctx.system.parameters()
                                          if p.requires_grad),
        }

    def callbacks(self, ctx: RunContext) -> list[Callback]:
        return [self._schedule, self._timer]

    def headline(self, summary: dict[str, Any]) -> str | None:
        s, m = self.facts(summary), summary["model"]
        return (f"trainable params {s.get('params_trainable_start'):,} at start, "
                f"{m.get('params_trainable'):,} at the end of {m.get('params_total'):,}   "
                f"{_frozen_text(s.get('stages_frozen'), s.get('stages_total'))}   "
                f"unfreeze events {len(s.get('unfreeze_events') or [])}")

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        backbone = self._schedule.backbone or ctx.system.backbone
        layers = backbone_layers(backbone)
        times = self._timer.times
        return {
            **self._start,
            "layers_trainable_end": sum(not is_frozen(m) for m in layers),
            "frozen_prefix_end": backbone.frozen_prefix,
            "params_frozen_backbone": count_params(layers, trainable=False),
            "unfreeze_events": list(self._schedule.events),
            "epoch_times_s": list(times),
            "epoch_time_median_s": statistics.median(times) if times else None,
        }
