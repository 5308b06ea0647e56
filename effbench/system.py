"""The LightningModule: a backbone (plain ``nn.Module``) + a head, trained as a classifier."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn

from effbench.errors import EffbenchError
from effbench.metrics import build_metrics, probabilities, split_scalars
from effbench.recipe import PendingSchedule, Stepping, lr_scheduler, per_step
from effbench.task import is_multilabel


class Diverged(EffbenchError):
    """A loss that is no longer a number: training stops and the run is recorded as
    ``diverged`` with the epoch (run.py), not as completed with NaN metrics."""

    def __init__(self, metric: str, value: float, epoch: int, lr: float) -> None:
        self.metric, self.value, self.epoch = metric, value, epoch
        super().__init__(f"training diverged at epoch {epoch}: {metric} is {value} with learning "
                         f"rate {lr:g}; lower optim.optimizer.lr or clip the gradients with "
                         "trainer.gradient_clip_val=1.0.")


# A change of the training batch before the forward: (images, targets) → (images, targets). The
# targets it returns may be probabilities (N, C) where the labels were class indices.
BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class ClassifierSystem(pl.LightningModule):
    """Backbone → head → loss, with torchmetrics for val/test and the recipe's lr schedule."""

    def __init__(self, backbone: nn.Module, head: nn.Module, loss: nn.Module, task: str,
                 class_names: list[str], optim: dict[str, Any], scheduler: dict[str, Any] | None,
                 monitor: str = "val/loss") -> None:
        super().__init__()
        self.backbone, self.head, self.loss_fn = backbone, head, loss
        self.task, self.class_names = task, list(class_names)
        self.optim, self.scheduler_cfg, self.monitor = dict(optim), scheduler, monitor
        n = len(class_names)
        # For the train-val gap. No input validation: its checks read values back from the GPU,
        # a synchronisation on every training step.
        self.train_acc = build_metrics(task, n, validate_args=False)["acc"].clone()
        self.val_metrics = build_metrics(task, n, per_class=False)  # a val row: scalars
        self.test_metrics = build_metrics(task, n)
        self.best_val: dict[str, float] = {}
        self.test_results: dict[str, Any] = {}
        # Per test sample, in the test split's order: probabilities and labels (on the CPU once
        # the test ends), written to <run>/predictions.npz (effbench.predictions).
        self.test_predictions: dict[str, torch.Tensor] = {}
        self._test_probs: list[torch.Tensor] = []
        self._test_labels: list[torch.Tensor] = []
        self.val_history: list[dict[str, float]] = []
        self._train_loss_sum: torch.Tensor | None = None
        self._train_seen = 0
        # Applied in order to every training batch (never to validation or test batches); a
        # technique that acts on the batch (``acts_on`` "batch") appends its own.
        self.train_batch_transforms: list[BatchTransform] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def _targets(self, y: torch.Tensor) -> torch.Tensor:
        return y.long() if is_multilabel(self.task) else y

    def on_train_epoch_start(self) -> None:
        self._train_loss_sum, self._train_seen = None, 0
        self.train_acc.reset()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        target = y
        for transform in self.train_batch_transforms:
            x, target = transform(x, target)
        logits = self(x)
        loss = self.loss_fn(logits, target)
        # The epoch's loss and accuracy accumulate on the device and are logged once per epoch:
        # ``self.log`` per step costs milliseconds on small models (Lightning re-walks and moves
        # the logged value every call), most of its overhead against a plain loop
        # (scripts/bench_overhead.py). No .item(): nothing waits for the device here.
        batch_loss = loss.detach() * len(y)
        self._train_loss_sum = (batch_loss if self._train_loss_sum is None
                                else self._train_loss_sum + batch_loss)
        self._train_seen += len(y)
        # Against the true labels of the batch, whatever targets the transforms made of them.
        self.train_acc.update(logits.detach().float(), self._targets(y))
        return loss

    def on_train_epoch_end(self) -> None:
        if not self._train_seen:
            return
        # Each rank's mean, averaged over ranks (equal shares: the sampler pads), as
        # ``self.log(on_epoch=True, sync_dist=True)`` did per step; the metric syncs itself.
        loss = self._train_loss_sum / self._train_seen
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/acc", self.train_acc.compute())
        self.train_acc.reset()
        self._check_finite("train/loss", loss)  # a NaN on one rank reaches all by the gradients

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", self.loss_fn(logits, y), on_epoch=True, prog_bar=True,
                 batch_size=len(y), sync_dist=True)
        self.val_metrics.update(logits.float(), self._targets(y))

    def on_validation_epoch_end(self) -> None:
        scalars, _ = split_scalars(self.val_metrics.compute(), "val", self.class_names)
        self.val_metrics.reset()
        self.log_dict(scalars, prog_bar=False, sync_dist=True)  # identical on every rank
        if self.trainer.sanity_checking:
            return
        loss = self.trainer.callback_metrics.get("val/loss")
        self._check_finite("val/loss", loss)
        row = {**scalars, "val/loss": float(loss) if loss is not None else float("nan"),
               "epoch": self.current_epoch}
        self.val_history.append(row)
        if not self.best_val or row["val/loss"] < self.best_val.get("val/loss", float("inf")):
            self.best_val = row

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("test/loss", self.loss_fn(logits, y), on_epoch=True, batch_size=len(y),
                 sync_dist=True)
        self.test_metrics.update(logits.float(), self._targets(y))
        # Kept on the device (no sync per step); gathered and moved once, at the epoch's end.
        self._test_probs.append(probabilities(logits.detach().float(), self.task))
        self._test_labels.append(y.detach())

    def on_test_epoch_start(self) -> None:
        self._test_probs, self._test_labels = [], []

    def on_test_epoch_end(self) -> None:
        scalars, per_class = split_scalars(self.test_metrics.compute(), "test", self.class_names)
        self.test_metrics.reset()
        self.log_dict(scalars, sync_dist=True)
        self.test_results = {"scalars": scalars, "per_class": per_class}
        if self._test_probs:
            self.test_predictions = {"probs": self._gathered(torch.cat(self._test_probs)).cpu(),
                                     "labels": self._gathered(torch.cat(self._test_labels)).cpu()}
        self._test_probs, self._test_labels = [], []

    def _gathered(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's rows in the test split's order. The distributed sampler deals sample
        ``i·W + r`` to rank ``r`` (equal shares, padded at the end), so rank-major gathered rows
        interleave back; the padding is cut where the predictions are written."""
        if self.trainer.world_size <= 1:
            return t
        gathered = self.all_gather(t)  # (W, n, ...)
        return gathered.transpose(0, 1).reshape(-1, *t.shape[1:])

    def _check_finite(self, metric: str, value: torch.Tensor | None) -> None:
        """Once per epoch: one host sync, not one per step."""
        if value is not None and not math.isfinite(float(value)):
            raise Diverged(metric, float(value), self.current_epoch, self.scaled_lr())

    def scaled_lr(self) -> float:
        """The recipe's lr × the plan's scale (the world size with hardware.lr_scaling=linear)."""
        return float(self.optim["lr"]) * float(self.optim.get("lr_scale", 1.0))

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        # The recipe's optimizer factory (optim.optimizer, a partial); lr scaled by world size.
        opt = self.optim["factory"](params, lr=self.scaled_lr())
        if not self.scheduler_cfg:
            return opt
        if per_step(self.scheduler_cfg) and not self._fitting():
            # Not Lightning's fit: the loop that trains (a hand-written one) knows its steps and
            # builds the schedule from this (recipe.PendingSchedule.build).
            return {"optimizer": opt,
                    "lr_scheduler": PendingSchedule(self.scheduler_cfg, self.monitor)}
        stepping = self._stepping() if per_step(self.scheduler_cfg) else None
        return {"optimizer": opt,
                "lr_scheduler": lr_scheduler(opt, self.scheduler_cfg, self.monitor, stepping)}

    def _fitting(self) -> bool:
        return self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING

    def _stepping(self) -> Stepping:
        """This fit's optimizer steps in all (Lightning's estimate: epochs, max_steps, gradient
        accumulation, the rank's share of the data) and per epoch."""
        trainer = self.trainer
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise EffbenchError(f"the cosine schedule needs a finite number of optimizer steps, "
                                f"and this training has {total}; set trainer.max_epochs.")
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        return int(total), max(1, per_epoch)
