"""``progressive_resizing``: training images start smaller and grow to full size (fast.ai's
progressive resizing; Composer's ``ProgressiveResizing``).

The scale of the training images goes linearly from ``initial_scale`` to 1 over the training
between ``delay_fraction`` and ``1 - finetune_fraction`` of its optimizer steps (before: the
initial scale; after: full size, the fine-tuning phase). Each side is ``scale × full``, rounded
to a multiple of ``size_increment`` (so a run trains at few distinct sizes) and never above the
full size. Progress is measured in optimizer steps: step ``s`` of ``S`` planned
(``trainer.estimated_stepping_batches``) trains at the scale of ``s / S``, so the size can change
within an epoch, as Composer's does.

Images are resized on the device with ``F.interpolate`` (``mode``; antialiased for bilinear and
bicubic, which shrinking needs against aliasing), after the datamodule's normalisation and
augmentation and before the forward (``system.train_batch_transforms``). Validation and test
stay at full size. A network whose layers are sized for the full input (a flatten into a dense
layer, a ViT's fixed patch grid) cannot take the smaller ones: ``check`` tries one forward at the
smallest size and refuses the run before anything trains.

Written by hand: Composer's algorithm needs Composer's trainer, and the glue is one interpolation
and one schedule (:func:`scheduled_scale`, a plain function of the progress).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback

from effbench.errors import EffbenchError
from effbench.technique import Technique, register

if TYPE_CHECKING:
    from effbench.context import RunContext

MODES = ("bilinear", "bicubic", "area", "nearest", "nearest-exact")
ANTIALIASED = ("bilinear", "bicubic")  # the modes F.interpolate can antialias


def scheduled_scale(progress: float, initial_scale: float, finetune_fraction: float,
                    delay_fraction: float = 0.0) -> float:
    """The scale at ``progress`` (the share of training done, in [0, 1]): ``initial_scale`` up
    to ``delay_fraction``, linear to 1 at ``1 - finetune_fraction``, 1 after."""
    ramp = 1.0 - finetune_fraction - delay_fraction
    done = min(max((progress - delay_fraction) / ramp, 0.0), 1.0)
    return initial_scale + (1.0 - initial_scale) * done


def scaled_side(full: int, scale: float, increment: int) -> int:
    """``scale × full`` rounded to a multiple of ``increment`` (at least one increment), never
    above ``full``; ``full`` itself at scale 1."""
    if scale >= 1:
        return full
    return min(full, max(increment, round(full * scale / increment) * increment))


def resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """The ``(N, C, H, W)`` batch at ``size`` (unchanged when it is already that size)."""
    if tuple(x.shape[-2:]) == size:
        return x
    smooth = mode in ANTIALIASED
    return F.interpolate(x, size=size, mode=mode, antialias=smooth,
                         align_corners=False if smooth else None)


class ResizeBatch(Callback):
    """The transform of every training batch (``system.train_batch_transforms``) and, as a
    callback, what sets its scale before each training batch from the progress, and records the
    sizes trained (kept in checkpoints: a resumed run records the epochs before too)."""

    def __init__(self, initial_scale: float, finetune_fraction: float, delay_fraction: float,
                 increment: int, mode: str) -> None:
        self.initial_scale, self.finetune_fraction = initial_scale, finetune_fraction
        self.delay_fraction, self.increment, self.mode = delay_fraction, increment, mode
        self.scale: float | None = None  # None: outside the fit this callback drives (no resize)
        self.epochs: list[dict[str, Any]] = []  # per epoch: the sizes trained, in order
        self.pixels = [0, 0]  # pixels trained, pixels the same images hold at full size
        self.first_full_step: int | None = None  # the first step trained at full size (1-based)
        self.steps_planned = 0
        self._loaded: dict[str, Any] | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scale is None:
            return x, y
        h, w = x.shape[-2:]
        size = (scaled_side(h, self.scale, self.increment),
                scaled_side(w, self.scale, self.increment))
        self._record(size, (h, w), len(x))
        return resize(x, size, self.mode), y

    def _record(self, size: tuple[int, int], full: tuple[int, int], n: int) -> None:
        if not self.epochs:  # driven by hand, outside a fit (no epoch start seen)
            self.epochs.append({"epoch": 1, "sizes": [], "batches": 0})
        epoch = self.epochs[-1]
        side = size[0] if size[0] == size[1] else f"{size[0]}x{size[1]}"
        if not epoch["sizes"] or epoch["sizes"][-1] != side:
            epoch["sizes"].append(side)
        epoch["batches"] += 1
        self.pixels[0] += n * size[0] * size[1]
        self.pixels[1] += n * full[0] * full[1]

    # -- Lightning hooks -------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded:
            self.epochs = list(self._loaded.get("epochs", []))
            self.pixels = list(self._loaded.get("pixels", [0, 0]))
            self.first_full_step = self._loaded.get("first_full_step")
            self._loaded = None
        planned = trainer.estimated_stepping_batches
        if not math.isfinite(planned):
            raise EffbenchError("strategy=progressive_resizing schedules the sizes over the "
                                "planned training, and this one has no end: set "
                                "trainer.max_epochs or +trainer.max_steps.")
        self.steps_planned = int(planned)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs.append({"epoch": trainer.current_epoch + 1, "sizes": [], "batches": 0})

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        self.scale = scheduled_scale(step / max(1, self.steps_planned),
                                     self.initial_scale, self.finetune_fraction,
                                     self.delay_fraction)
        full = batch[0].shape[-1]
        if self.first_full_step is None and \
                scaled_side(full, self.scale, self.increment) == full:
            self.first_full_step = step + 1  # 1-based: the n-th optimizer step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.scale = None  # a later training phase without this callback trains at full size

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "pixels": self.pixels,
                "first_full_step": self.first_full_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning also restores callbacks when testing a checkpoint; only a resumed fit counts.
        self._loaded = dict(state_dict)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@register
class ProgressiveResizing(Technique):
    """Smaller training images early on, full size at the end (see the module docstring)."""

    name = "progressive_resizing"
    order = 54  # before a technique mixing the batch: it mixes the images at the trained size
    acts_on = frozenset({"batch", "callbacks"})

    def __init__(self, name: str = "progressive_resizing", initial_scale: float = 0.5,
                 finetune_fraction: float = 0.2, delay_fraction: float = 0.0,
                 size_increment: int = 4, mode: str = "bilinear") -> None:
        super().__init__(name)
        if not _number(initial_scale) or not 0 < initial_scale < 1:
            self._refuse("initial_scale", initial_scale, "must be a fraction in (0, 1), the "
                         "first size as a share of the full one, e.g. 0.5 (for none, run "
                         "finetune)")
        for key, value in (("finetune_fraction", finetune_fraction),
                           ("delay_fraction", delay_fraction)):
            if not _number(value) or not 0 <= value < 1:
                self._refuse(key, value, "must be a fraction of the training in [0, 1), e.g. "
                             f"{0.2 if key == 'finetune_fraction' else 0.0}")
        if delay_fraction + finetune_fraction >= 1:
            raise EffbenchError(f"strategy.{self.name}.delay_fraction={delay_fraction!r} + "
                                f"finetune_fraction={finetune_fraction!r} leave no training "
                                "for the sizes to grow in: keep their sum below 1, e.g. 0 + 0.2.")
        if not isinstance(size_increment, int) or isinstance(size_increment, bool) \
                or size_increment < 1:
            self._refuse("size_increment", size_increment, "must be a whole number of pixels "
                         ">= 1, e.g. 4")
        if mode not in MODES:
            self._refuse("mode", mode, f"must be one of {', '.join(MODES)}")
        self.initial_scale, self.finetune_fraction = float(initial_scale), float(finetune_fraction)
        self.delay_fraction, self.size_increment, self.mode = float(delay_fraction), \
            size_increment, mode
        self._resize: ResizeBatch | None = None
        self._full = 0

    def _refuse(self, key: str, value: Any, why: str) -> None:
        raise EffbenchError(f"strategy.{self.name}.{key}={value!r} {why}.")

    def incompatible(self, other: Technique) -> str | None:
        if {"model", "export"} <= other.acts_on:  # trains the graph it exports (not after)
            return (f"{other.name} trains a graph exported at the full input size, which "
                    f"{self.name}'s smaller training images cannot go through")
        return None

    def check(self, ctx: RunContext) -> None:
        full = ctx.datamodule.preprocessing.crop_size
        side = scaled_side(full, self.initial_scale, self.size_increment)
        if side >= full:
            raise EffbenchError(f"strategy.{self.name}.size_increment={self.size_increment} "
                                f"rounds the first size back to the full {full} px: nothing would "
                                f"be resized; lower it (e.g. 4) or strategy.{self.name}."
                                "initial_scale.")
        if (reason := _cannot_take(ctx.system, side)) is not None:
            raise EffbenchError(f"strategy={self.name} starts training at {side}×{side} px, which "
                                f"backbone {ctx.system.backbone.name} (built for {full} px) "
                                f"cannot take ({reason}): choose a backbone that ends in global "
                                "pooling (e.g. backbone=cifar_cnn14 or resnet18) or, for one "
                                "that only needs a minimum size, raise "
                                f"strategy.{self.name}.initial_scale.")
        self._full = full

    def configure_model(self, ctx: RunContext) -> None:
        transforms = ctx.system.train_batch_transforms
        if self._resize is not None and self._resize in transforms:
            return  # configured already
        self._resize = ResizeBatch(self.initial_scale, self.finetune_fraction,
                                   self.delay_fraction, self.size_increment, self.mode)
        transforms.append(self._resize)

    def callbacks(self, ctx: RunContext) -> list[Callback]:
        if self._resize is None:
            raise EffbenchError(f"strategy={self.name} needs configure_model(ctx) before "
                                "callbacks(); run it through effbench.run.")
        return [self._resize]

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        r = self._resize
        if r is None:
            return {}
        trained, at_full = r.pixels
        full = self._full or ctx.datamodule.preprocessing.crop_size
        return {"full_size": full,
                "first_size": scaled_side(full, self.initial_scale, self.size_increment),
                "epochs": r.epochs, "steps_planned": r.steps_planned,
                "first_full_size_step": r.first_full_step,
                # Convolution cost grows with the pixels: the share of the full-size cost.
                "pixel_share": trained / at_full if at_full else None,
                "applies_to": "training batches (validation and test at full size)"}

    def headline(self, summary: dict[str, Any]) -> str | None:
        s = self.facts(summary)
        share = s.get("pixel_share")
        step = s.get("first_full_size_step")
        planned = s.get("steps_planned")
        when = (f"full size from step {step} of {planned}" if step is not None
                else f"full size never reached in {planned} steps")
        return (f"trained at {s.get('first_size')}→{s.get('full_size')} px ({when}); "
                f"{'n/a' if share is None else f'{share:.0%}'} of the full-size pixels; "
                "validation and test at full size")


def _cannot_take(model: torch.nn.Module, side: int) -> str | None:
    """Why ``model`` cannot run on a ``side`` × ``side`` batch (None: it can). One forward of two
    blank images in eval mode, without gradients; every module's mode is put back."""
    modes = {m: m.training for m in model.modules()}
    param = next(model.parameters(), None)
    x = torch.zeros(2, 3, side, side, device=param.device if param is not None else None)
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    except Exception as err:  # noqa: BLE001 - any failure means the size does not fit
        return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    finally:
        for m, training in modes.items():
            m.training = training
    return None
