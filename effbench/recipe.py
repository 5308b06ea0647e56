"""The training recipe (``optim`` config group), read once and shared by every technique: the
optimizer factory, ReduceLROnPlateau, early stopping, the checkpoint that gets tested, class
weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint

from effbench.errors import EffbenchError


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
