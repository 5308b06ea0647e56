"""``ema``: an exponential moving average of the weights is what the run validates, keeps as its
best checkpoint, tests and saves (Polyak & Juditsky 1992; timm's ``ModelEmaV3``, Composer's
``EMA``).

After every ``every_n_steps``-th optimizer step from ``start_step`` on, ``ema ← decay·ema +
(1 − decay)·w`` for every parameter and buffer (BatchNorm statistics too); the first update copies
the weights. Lightning's ``EMAWeightAveraging`` does the averaging: it swaps the average in for
each validation, writes it as a checkpoint's ``state_dict`` (the raw weights under
``current_model_state``, for resuming) and copies it into the model when training ends. So
``val/*``, early stopping, the best checkpoint, the test and ``<run>/model/`` all see the average.

Three gaps of the stock callback are closed here (:class:`EMACallback`): it would test the raw
weights of the best checkpoint (its ``on_load_checkpoint`` restores ``current_model_state`` in
``trainer.test`` as in a resume), it would validate and checkpoint its untouched copy of the
initial weights before ``start_step``, and it keeps the average where the model is when the
callback is set up, which is the CPU (one host copy per step on a GPU run).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, EMAWeightAveraging

from effbench.errors import EffbenchError
from effbench.technique import Technique, register

if TYPE_CHECKING:
    from effbench.context import RunContext


class EMACallback(EMAWeightAveraging):
    """``EMAWeightAveraging`` whose average is what is tested, and that stays out of the way
    until its first update."""

    def __init__(self, decay: float, every_n_steps: int, start_step: int) -> None:
        super().__init__(decay=decay, update_every_n_steps=every_n_steps,
                         update_starting_at_step=start_step)
        self.steps = 0  # optimizer steps of the fit, for the facts

    @property
    def updates(self) -> int:
        return int(self._average_model.n_averaged) if self._average_model is not None else 0

    def checkpoint_ready(self, trainer: pl.Trainer) -> bool:
        """The best checkpoint is chosen among epochs validated with an average, not with the
        copy of the initial weights the callback holds before ``start_step``."""
        return self.updates > 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # The model is still on the CPU here; the average goes where training happens.
        if stage == "fit" and self._device is None:
            self._device = trainer.strategy.root_device
        super().setup(trainer, pl_module, stage)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                  ) -> None:
        if self.updates:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                ) -> None:
        if self.updates:
            super().on_validation_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.steps = int(trainer.global_step)
        if self.updates:
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self.updates:  # before the first update there is no average to keep
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Outside a fit (the test of the best checkpoint) the checkpoint's state_dict, the
        # average, is the model wanted: the stock callback would put the raw weights back.
        if trainer.state.fn == "fit" and "current_model_state" in checkpoint:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


@register
class EMA(Technique):
    """The exponential moving average of the weights, validated, tested and saved (see the
    module docstring)."""

    name = "ema"
    order = 65  # after the techniques that shape the model and loss, before conversions
    acts_on = frozenset({"callbacks", "checkpoint"})
    # Replaces the trained weights by an average of them; two such techniques cannot share a run.
    averages_weights = True

    def __init__(self, name: str = "ema", decay: float = 0.999, every_n_steps: int = 1,
                 start_step: int = 0) -> None:
        super().__init__(name)
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 < decay < 1:
            raise EffbenchError(f"strategy.{self.name}.decay={decay!r} must be a fraction in "
                                "(0, 1), e.g. 0.999.")
        if not _is_int(every_n_steps, 1):
            raise EffbenchError(f"strategy.{self.name}.every_n_steps={every_n_steps!r} must be a "
                                "whole number of optimizer steps >= 1, e.g. 1.")
        if not _is_int(start_step, 0):
            raise EffbenchError(f"strategy.{self.name}.start_step={start_step!r} must be a "
                                "whole number of optimizer steps >= 0, e.g. 0.")
        self.decay, self.every_n_steps, self.start_step = float(decay), every_n_steps, start_step
        self._callback: EMACallback | None = None

    def incompatible(self, other: Technique) -> str | None:
        return averaging_conflict(self, other)

    def callbacks(self, ctx: RunContext) -> list[Callback]:
        self._callback = EMACallback(self.decay, self.every_n_steps, self.start_step)
        return [self._callback]

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        cb = self._callback
        if cb is None or not cb.updates:
            steps = cb.steps if cb else 0
            raise EffbenchError(f"strategy.{self.name}.start_step={self.start_step} was never "
                                f"reached: training took {steps} optimizer steps, so nothing was "
                                "averaged; lower it.")
        return {"updates": cb.updates, "steps": cb.steps,
                "horizon_steps": round(1 / (1 - self.decay), 1),
                # How much of the average is still the first averaged step's weights.
                "first_update_share": self.decay ** (cb.updates - 1),
                "evaluated": "the average (validation, best checkpoint, test, saved model)"}

    def headline(self, summary: dict[str, Any]) -> str | None:
        s = self.facts(summary)
        share = s.get("first_update_share") or 0.0
        warn = f"   {share:.0%} of it is still the first step's weights" if share > 0.5 else ""
        return (f"weights averaged with decay {self.decay:g} over {s.get('updates')} updates "
                f"(horizon ≈{s.get('horizon_steps') or 0:g} steps); validated, tested and saved: "
                f"the average{warn}")


def averaging_conflict(averaging: Technique, other: Technique) -> str | None:
    """Why a technique that replaces the trained weights by their average (ema, swa) cannot
    run with ``other``, from ``other``'s declarations; None: they stack."""
    a, b = averaging.name, other.name
    if getattr(other, "averages_weights", False):
        return (f"{a} and {b} both replace the trained weights by an average of them, and a run "
                "delivers one model")
    if other.reparametrizes or other.sparsifies:
        return (f"{b} changes the model for good during the fit (masks, zeroed or removed "
                f"weights), which {a}'s average with the weights from before would undo, so the "
                f"model delivered would not be {b}'s")
    if {"model", "export"} <= other.acts_on:  # trains the model it exports (not a conversion after)
        return (f"{b} trains a fake-quantized graph whose observers' buffers (ranges, zero points) "
                f"set its int8 conversion, and {a}'s average of the weights does not keep them "
                "matching")
    return None
