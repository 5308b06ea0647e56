"""The technique contract: a self-contained plug-in on one shared pipeline (DESIGN.md §5).

A technique is one class in ``effbench/techniques/<name>.py`` selected by
``conf/strategy/<name>.yaml`` (its keys under ``<name>:``); ``strategy=[freeze,prune]`` stacks
several. Like Composer's algorithms and Lightning's callbacks, each technique declares what it
changes (``acts_on``) and what it needs (``needs``, ``requires_precision``), and acts through
hooks the pipeline (effbench/pipeline.py) calls for every technique of the stack, in ``order``:

``check(ctx)`` → ``configure_model(ctx)`` (model surgery) → the shared Lightning fit with every
technique's ``callbacks(ctx)`` (or, for the one technique that ``replaces_loop``, its ``fit``) →
``finalize(ctx)`` (its own facts, under ``summary.strategy.<name>``) → ``saved_model(ctx)`` (the
form of the model kept in ``<run>/model/``).

The training recipe (optimizer, scheduler, early stopping, checkpoint) is not a technique's: it is
the ``optim`` config group, read once by the pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pytorch_lightning.callbacks import Callback

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from omegaconf import DictConfig
    from torch import nn

    from effbench.context import RunContext
    from effbench.data.base import ImageDataModule
    from effbench.model.saved import SavedModel

# What a technique may change. Two techniques that both own a "sampling" or a "loop" conflict.
ACTS_ON = ("model", "callbacks", "sampling", "loop", "checkpoint", "export")
EXCLUSIVE = ("sampling", "loop")


class Technique:
    """Base: a technique that changes nothing (``finetune``: the plain recipe)."""

    name = "technique"
    order = 50                                   # place in a stack: earlier acts first
    acts_on: frozenset[str] = frozenset()
    # "backbone_grad": gradients flow through the backbone (training the backbone's weights).
    needs: frozenset[str] = frozenset()
    replaces_loop = False
    # Model changes made through hooks (pruning masks) that a graph export cannot carry until
    # ``settle`` makes them permanent: a later model-rebuilding technique (qat) waits for it.
    reparametrizes = False
    # The precision this technique needs (None: any); the hardware plan uses it instead of the
    # preset's and refuses an explicit trainer.precision that differs.
    requires_precision: str | None = None
    # Trainer arguments honoured (None: all — training goes through Lightning's fit). A technique
    # with its own loop lists what it honours; any other trainer.* set is refused.
    trainer_keys: frozenset[str] | None = None

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self.name = name

    # -- composition ----------------------------------------------------------------------------
    def incompatible(self, other: Technique) -> str | None:
        """Why this technique cannot run with ``other`` (None: they stack)."""
        return None

    # -- hooks ----------------------------------------------------------------------------------
    def check(self, ctx: RunContext) -> None:
        """Refuse options that cannot take effect in this run (before anything trains)."""

    def configure_model(self, ctx: RunContext) -> None:
        """Change the model before training (freeze, insert fake-quant, …). Default: nothing."""

    def callbacks(self, ctx: RunContext) -> list[Callback]:
        """Lightning callbacks this technique acts through during the shared fit."""
        return []

    def best_checkpoint_ready(self, trainer: pl.Trainer) -> bool:
        """False while the model is not yet what this technique delivers (e.g. pruning not at
        its target): the best checkpoint is chosen among epochs where every technique is ready."""
        return True

    def settle(self, ctx: RunContext) -> None:
        """Make this technique's model changes permanent (e.g. pruning masks → zeros). Called
        before a later technique rebuilds the model (qat after prune) and before finalize;
        must be idempotent."""

    def kept_zeros(self) -> list[tuple[Any, Any]]:
        """(parameter, boolean mask) pairs this technique fixed at zero (after ``settle``), for
        later training phases to keep zero."""
        return []

    def post_fit(self, ctx: RunContext) -> None:
        """After the shared fit and test: a second phase (qat fine-tunes a pruned model)."""

    def fit(self, ctx: RunContext) -> None:
        """Only for a technique that ``replaces_loop``."""
        raise NotImplementedError(f"{self.name} does not replace the training loop")

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        """After testing: make changes permanent, measure, return this technique's facts (a
        ``"model"`` entry is merged into ``summary["model"]``)."""
        return {}

    def cached_parts(self, cfg: DictConfig) -> tuple[nn.Module, ImageDataModule] | None:
        """Before anything is built: a technique that can serve the whole job from a cache
        (precomputed's index hit) returns a stand-in backbone and a labels-only datamodule, so
        no image is decoded and no backbone built. None: build as usual."""
        return None

    def saved_model(self, ctx: RunContext) -> SavedModel | None:
        """After ``finalize``: the form in which this technique's model is kept in
        ``<run>/model/`` (``prune``: compressed, ``qat``: int8). None: the technique leaves the
        model's form alone. The last technique of the stack that returns one decides; when none
        does, backbone + head are saved as they are (effbench/model/saved.py)."""
        return None

    def headline(self, summary: dict[str, Any]) -> str | None:
        """One line for the end-of-run report: the outcome of the technique itself.
        ``summary["strategy"][self.name]`` holds this technique's facts."""
        return None

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def facts(self, summary: dict[str, Any]) -> dict[str, Any]:
        """This technique's own entry of a summary."""
        return summary.get("strategy", {}).get(self.name, {})
