"""``swa``: stochastic weight averaging (Izmailov et al. 2018, "Averaging Weights Leads to Wider
Optima and Better Generalization"): from epoch ``swa_epoch_start`` on, the learning rate is
annealed to ``swa_lrs`` and the weights at the end of each epoch are averaged with equal weights;
after training the average replaces the weights, BatchNorm statistics are recomputed for it on
the training data, and that model is tested and saved.

Lightning's ``StochasticWeightAveraging`` does the schedule (``SWALR`` in place of the recipe's
scheduler), the running average and its checkpointed state (resumable). :class:`SWACallback`
changes three things in it, each for the model delivered to be the average of the SWA epochs:

- Lightning averages at the *start* of each epoch from ``swa_epoch_start`` to the last, i.e. the
  weights of the epoch before the first one trained at the SWA learning rate (the untrained
  initial weights when it is 1), and never the last epoch's. Here the weights of each SWA
  epoch's end (its last training batch, before that epoch's checkpoint is written) are averaged.
- Lightning recomputes BatchNorm statistics in one extra training epoch (counted as an epoch,
  its images as trained images). Here it is one forward pass over the training loader when
  training ends, as ``torch.optim.swa_utils.update_bn`` does; BatchNorm layers held in eval
  mode (frozen by ``freeze``) keep their statistics, which that pass would otherwise reset.
- Training stopped early (early stopping) after averaging began still delivers the average of
  the epochs averaged so far (Lightning would leave the raw weights).

No epoch's weights are the average, so no best checkpoint is chosen (``checkpoint_ready`` is
never true): the test takes the model as training leaves it, the average. Validation, early
stopping and ``best_val`` see the raw weights of each epoch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, StochasticWeightAveraging
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from effbench.errors import EffbenchError
from effbench.technique import Technique, register
from effbench.techniques.ema import averaging_conflict

if TYPE_CHECKING:
    from effbench.context import RunContext

STRATEGIES = ("cos", "linear")


def recompute_batchnorm(model: nn.Module, batches: Iterator[torch.Tensor]) -> int:
    """Running statistics of every BatchNorm layer in training mode, recomputed as the plain
    average over ``batches`` (``torch.optim.swa_utils.update_bn``); returns how many layers."""
    layers = [m for m in model.modules()
              if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    momenta = {m: m.momentum for m in layers}
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    if layers:
        with torch.no_grad():
            for x in batches:
                model(x)
    for m, momentum in momenta.items():
        m.momentum = momentum
    return len(layers)


class SWACallback(StochasticWeightAveraging):
    """``StochasticWeightAveraging`` averaging each SWA epoch's final weights, recomputing
    BatchNorm statistics without an extra epoch (see the module docstring)."""

    def __init__(self, swa_lrs: float | None, swa_epoch_start: int | float,
                 annealing_epochs: int, annealing_strategy: str) -> None:
        # swa_lrs=None: each parameter group's own learning rate when averaging starts (set
        # then); Lightning wants a number now.
        super().__init__(swa_lrs=1.0 if swa_lrs is None else float(swa_lrs),
                         swa_epoch_start=swa_epoch_start, annealing_epochs=annealing_epochs,
                         annealing_strategy=annealing_strategy)  # type: ignore[arg-type]
        self.keep_lrs = swa_lrs is None
        self.batchnorm_layers = 0
        self.transferred = False
        self.epochs_run = 0

    @staticmethod
    def pl_module_contains_batch_norm(pl_module: pl.LightningModule) -> bool:
        return False  # no extra BatchNorm epoch: on_train_end recomputes the statistics

    def checkpoint_ready(self, trainer: pl.Trainer) -> bool:
        return False  # the average exists only once training ends; the test takes it there

    @property
    def averages(self) -> int:
        return int(self.n_averaged) if self.n_averaged is not None else 0

    @property
    def averaged_epochs(self) -> list[int]:
        """The epochs in the average, 1-based: consecutive, up to the last one averaged (from
        the checkpointed state, so a resumed run lists them all)."""
        last = self._latest_update_epoch + 1
        return list(range(last - self.averages + 1, last + 1))

    @property
    def lrs(self) -> list[float]:
        """The SWA learning rate of each parameter group (known once averaging started)."""
        lrs = self._swa_lrs
        return [float(lr) for lr in (lrs if isinstance(lrs, list) else [lrs])]

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.keep_lrs and not self._initialized:
            self._swa_lrs = [float(g["lr"]) for g in trainer.optimizers[0].param_groups]
        # Lightning would average here the weights the previous epoch left: marking this epoch
        # as averaged skips that; on_train_batch_end averages the epoch's own final weights.
        latest = self._latest_update_epoch
        self._latest_update_epoch = max(latest, trainer.current_epoch)
        super().on_train_epoch_start(trainer, pl_module)
        self._latest_update_epoch = latest

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        epoch = trainer.current_epoch
        # The epoch's last batch, before its validation and checkpoint (so a resume from that
        # checkpoint has this epoch in the average).
        if (trainer.fit_loop.epoch_loop.batch_progress.is_last_batch and self._initialized
                and self.swa_start <= epoch <= self.swa_end
                and epoch > self._latest_update_epoch):
            assert self.n_averaged is not None and self._average_model is not None
            self.update_parameters(self._average_model, pl_module, self.n_averaged,
                                   self._avg_fn)
            self._latest_update_epoch = epoch

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs_run = int(trainer.current_epoch)
        if not self.averages:
            return  # stopped before the first SWA epoch ended: nothing to deliver (finalize)
        assert self._average_model is not None
        self.transfer_weights(self._average_model, pl_module)
        with trainer.precision_plugin.forward_context():
            self.batchnorm_layers = recompute_batchnorm(pl_module, _train_inputs(trainer))
        self.transferred = True


def _train_inputs(trainer: pl.Trainer) -> Iterator[torch.Tensor]:
    """The training loader's images as the training step receives them, as many batches as an
    epoch has: ``batch_to_device`` runs the batch transfer hooks (the datamodule's on-device
    preprocessing) as the fit loop does."""
    batches = trainer.num_training_batches
    limit = int(batches) if math.isfinite(batches) else None
    for batch in itertools.islice(trainer.train_dataloader, limit):
        yield trainer.strategy.batch_to_device(batch)[0]


def _start_ok(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return value >= 1 if isinstance(value, int) else 0 < value <= 1


@register
class SWA(Technique):
    """Stochastic weight averaging of the last epochs, tested and saved (see the module
    docstring)."""

    name = "swa"
    order = 65  # after the techniques that shape the model and loss, before conversions
    acts_on = frozenset({"callbacks", "checkpoint"})
    # Replaces the trained weights by an average of them; two such techniques cannot share a run.
    averages_weights = True

    def __init__(self, name: str = "swa", swa_lrs: float | None = None,
                 swa_epoch_start: int | float = 0.8, annealing_epochs: int = 2,
                 annealing_strategy: str = "cos") -> None:
        super().__init__(name)
        key = f"strategy.{self.name}"
        if swa_lrs is not None and (isinstance(swa_lrs, bool) or not isinstance(
                swa_lrs, int | float) or not swa_lrs > 0):
            raise EffbenchError(f"{key}.swa_lrs={swa_lrs!r} must be a positive learning rate, "
                                "e.g. 1e-4, or null (each group's rate when averaging starts).")
        if not _start_ok(swa_epoch_start):
            raise EffbenchError(f"{key}.swa_epoch_start={swa_epoch_start!r} must be an epoch >= 1 "
                                "(1-based) or a fraction of trainer.max_epochs in (0, 1], e.g. "
                                "0.8.")
        if isinstance(annealing_epochs, bool) or not isinstance(annealing_epochs, int) \
                or annealing_epochs < 0:
            raise EffbenchError(f"{key}.annealing_epochs={annealing_epochs!r} must be a whole "
                                "number of epochs >= 0, e.g. 2.")
        if annealing_strategy not in STRATEGIES:
            raise EffbenchError(f"{key}.annealing_strategy={annealing_strategy!r} is not one of "
                                f"{', '.join(STRATEGIES)}; set {key}.annealing_strategy=cos.")
        self.swa_lrs = None if swa_lrs is None else float(swa_lrs)
        self.swa_epoch_start, self.annealing_epochs = swa_epoch_start, annealing_epochs
        self.annealing_strategy = annealing_strategy
        self._callback: SWACallback | None = None

    def incompatible(self, other: Technique) -> str | None:
        if other.unfreezes_during_fit:
            return (f"{other.name}'s gradual unfreezing adds parameter groups to the optimizer "
                    f"that {self.name}'s learning-rate schedule, set when averaging starts, does "
                    f"not have; freeze a fixed set (strategy.{other.name}.unfreeze_at_epochs=[])")
        return averaging_conflict(self, other)

    def first_epoch(self, max_epochs: int) -> int:
        """The first averaged epoch, 1-based (Lightning's reading of ``swa_epoch_start``)."""
        start = self.swa_epoch_start
        return max(1, int(start) if isinstance(start, int) else int(max_epochs * start))

    def check(self, ctx: RunContext) -> None:
        epochs = int(ctx.cfg.trainer.max_epochs)
        if self.first_epoch(epochs) > epochs:
            raise EffbenchError(f"strategy.{self.name}.swa_epoch_start={self.swa_epoch_start} is "
                                f"past trainer.max_epochs={epochs}: nothing would be averaged; "
                                f"use an epoch <= {epochs} or a fraction such as 0.8.")

    def callbacks(self, ctx: RunContext) -> list[Callback]:
        self._callback = SWACallback(self.swa_lrs, self.swa_epoch_start, self.annealing_epochs,
                                     self.annealing_strategy)
        return [self._callback]

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        cb = self._callback
        first = self.first_epoch(int(ctx.cfg.trainer.max_epochs))
        if cb is None or not cb.transferred:
            run = cb.epochs_run if cb else 0
            raise EffbenchError(f"training stopped after {run} epoch(s), before the end of "
                                f"strategy.{self.name}'s first averaged epoch ({first}), so the "
                                "model is not averaged; lower strategy.swa.swa_epoch_start or "
                                "set optim.early_stopping=null.")
        return {"averaged_epochs": cb.averaged_epochs, "averages": cb.averages,
                "swa_lrs_used": cb.lrs,
                "stopped_early": cb.epochs_run < int(ctx.cfg.trainer.max_epochs),
                "batchnorm_layers_recomputed": cb.batchnorm_layers,
                "evaluated": "validation: the raw weights of each epoch; test and saved model: "
                             "the average (BatchNorm statistics recomputed for it)"}

    def headline(self, summary: dict[str, Any]) -> str | None:
        s = self.facts(summary)
        epochs = s.get("averaged_epochs") or [0]
        lrs = ", ".join(f"{lr:g}" for lr in sorted(set(s.get("swa_lrs_used") or [])))
        early = ", stopped early" if s.get("stopped_early") else ""
        return (f"weights of {s.get('averages')} epochs averaged ({epochs[0]}–{epochs[-1]}"
                f"{early}) at lr {lrs}; BatchNorm statistics of "
                f"{s.get('batchnorm_layers_recomputed')} layers recomputed; tested and saved: "
                "the average")
