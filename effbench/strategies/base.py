"""The strategy contract: hooks around one shared Lightning fit (DESIGN.md §5).

A strategy is one class in ``effbench/strategies/<name>.py`` selected by
``conf/strategy/<name>.yaml`` (``_target_``). The pipeline calls, in order:
``configure_model(ctx)`` → ``fit(ctx)`` (default: ``Trainer.fit`` + ``Trainer.test`` on the
best-val-loss checkpoint, with ``callbacks(ctx)``) → ``finalize(ctx)`` (extra summary entries).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint

if TYPE_CHECKING:
    from effbench.context import RunContext


class Strategy:
    """Shared options: optimiser (Adam/AdamW/SGD, ``lr``, weight decay), ReduceLROnPlateau,
    early stopping, optional class weights for imbalanced multiclass data."""

    # The precision this technique needs (None: any); the hardware plan uses it instead of the
    # preset's and refuses an explicit trainer.precision that differs.
    requires_precision: str | None = None
    # Trainer arguments honoured (None: all — training goes through Lightning's fit). A technique
    # with its own loop lists what it honours; any other trainer.* set is refused.
    trainer_keys: frozenset[str] | None = None

    def __init__(self, name: str, lr: float = 1e-3, optimizer: str = "adam",
                 weight_decay: float = 0.0, momentum: float = 0.9,
                 scheduler: dict[str, Any] | None = None,
                 early_stopping: dict[str, Any] | None = None, class_weights: bool = False,
                 checkpoint: bool = True, monitor: str = "val/loss") -> None:
        self.name, self.lr, self.optimizer = name, float(lr), optimizer
        self.weight_decay, self.momentum = float(weight_decay), float(momentum)
        self.scheduler, self.early_stopping = scheduler, early_stopping
        self.class_weights, self.checkpoint, self.monitor = class_weights, checkpoint, monitor

    # -- hooks --------------------------------------------------------------------------------
    def optim_config(self) -> dict[str, Any]:
        return {"name": self.optimizer, "lr": self.lr, "weight_decay": self.weight_decay,
                "momentum": self.momentum}

    def check(self, ctx: RunContext) -> None:
        """Refuse options that cannot take effect in this run (before anything trains)."""

    def configure_model(self, ctx: RunContext) -> None:
        """Change the model before training (freeze, insert fake-quant, …). Default: nothing."""

    def callbacks(self, ctx: RunContext) -> list[Callback]:
        cbs: list[Callback] = []
        if self.checkpoint:
            cbs.append(ModelCheckpoint(dirpath=ctx.run_dir / "checkpoints", monitor=self.monitor,
                                       mode="min", save_last=True, filename="best"))
        if self.early_stopping and self.early_stopping.get("patience") is not None:
            # strict=False: trainer.max_steps may end training mid-epoch, before any validation.
            cbs.append(EarlyStopping(monitor=self.monitor, mode="min", strict=False,
                                     patience=int(self.early_stopping["patience"])))
        return cbs

    def fit(self, ctx: RunContext) -> None:
        """Lightning fit, then test the best-val-loss checkpoint."""
        trainer = ctx.make_trainer(self.callbacks(ctx))
        with ctx.phase("train"):
            # weights_only: a checkpoint is data from outside; loading it must not run code.
            trainer.fit(ctx.system, datamodule=ctx.datamodule, ckpt_path=ctx.resume_from,
                        weights_only=True)
        ctx.epochs = trainer.current_epoch
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        with ctx.phase("eval"):
            trainer.test(ctx.system, datamodule=ctx.datamodule, ckpt_path=best or None,
                         verbose=False, weights_only=True)

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        """After testing: make changes permanent, measure, return extra summary entries."""
        return {}

    def headline(self, summary: dict[str, Any]) -> str | None:
        """One line for the end-of-run report: the outcome of the technique itself."""
        return None

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}
