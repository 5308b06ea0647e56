"""The pipeline of one run: a list of phases that the techniques of the stack contribute to
(effbench/technique.py), run in this order by :func:`run`:

``fit``      the technique that replaces the loop runs it; otherwise Lightning's fit with the
             recipe's callbacks and every technique's, then the test of the best checkpoint;
``settle``   every technique makes its changes permanent (masks → zeros);
``refit``    a technique's second training phase (a model rebuilt after another's changes),
             given ``train``: one more fit + test, the weights others fixed at zero kept zero;
``finalize`` each technique's facts under its own name;
``save``     ``<run>/model/`` in the form the last technique that shapes it asks for.

The stack itself (order, compatibility) is resolved in effbench/stack.py.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from pytorch_lightning.callbacks import Callback, LearningRateMonitor

from effbench.context import RunContext
from effbench.errors import EffbenchError
from effbench.model import saved as saved_model
from effbench.ranks import is_rank_zero
from effbench.recipe import Recipe
from effbench.stack import loop_owner
from effbench.technique import Technique

log = logging.getLogger(__name__)


def run(ctx: RunContext, techniques: list[Technique], recipe: Recipe,
        ) -> tuple[dict[str, Any], dict]:
    """Every phase in order; returns (each technique's facts, ``summary.model`` entries)."""
    fit(ctx, techniques, recipe)
    settle(ctx, techniques)
    refit(ctx, techniques, recipe)
    return finalize(ctx, techniques)


def fit(ctx: RunContext, techniques: list[Technique], recipe: Recipe) -> None:
    """Phase *fit*: the one technique that replaces the loop runs it; otherwise Lightning's fit
    with the recipe's callbacks and every technique's, then the best checkpoint is tested."""
    owner = loop_owner(techniques)
    if owner is not None:
        owner.fit(ctx)
        return
    callbacks = [cb for t in techniques for cb in t.callbacks(ctx)]
    fit_and_test(ctx, recipe, callbacks, resume=ctx.resume_from)


def settle(ctx: RunContext, techniques: list[Technique]) -> None:
    """Phase *settle*: every technique's changes made permanent (idempotent)."""
    for t in techniques:
        t.settle(ctx)


def refit(ctx: RunContext, techniques: list[Technique], recipe: Recipe) -> None:
    """Phase *refit*: each technique's second training phase, if it has one. ``train`` keeps
    the weights every technique fixed at zero (``kept_zeros``) at zero."""
    zeros = [z for t in techniques for z in t.kept_zeros()]

    def train(callbacks: list[Callback], subdir: str, **trainer_overrides: Any) -> None:
        fit_and_test(ctx, recipe, [KeepZeros(zeros), *callbacks], subdir=subdir,
                     **trainer_overrides)

    for t in techniques:
        t.refit(ctx, train)


class KeepZeros(Callback):
    """Weights an earlier phase fixed at zero (pruning) stay zero while a later phase trains."""

    def __init__(self, zeros: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.zeros = zeros

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # The masks moved once to where their weights train (the masks were taken after the
        # first phase, on the host): a copy from host memory every step would move every mask
        # again and make the host wait for the GPU each time.
        self.zeros = [(weight, zero.to(weight.device)) for weight, zero in self.zeros]

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        with torch.no_grad():
            for weight, zero in self.zeros:
                weight.masked_fill_(zero, 0.0)


def fit_and_test(ctx: RunContext, recipe: Recipe, callbacks: list, resume: str | None = None,
                 subdir: str = "", **trainer_overrides: Any) -> None:
    """One Lightning fit with the recipe's callbacks, then the test of its best checkpoint
    (chosen among epochs where every callback that has a ``checkpoint_ready`` says ready)."""
    ready = [cb.checkpoint_ready for cb in callbacks if hasattr(cb, "checkpoint_ready")]
    run_dir = ctx.run_dir / subdir if subdir else ctx.run_dir
    # The lr per epoch in the CSV/TensorBoard: ReduceLROnPlateau changes it, invisibly otherwise.
    lr_monitor = LearningRateMonitor(logging_interval="epoch")
    trainer = ctx.make_trainer([*recipe.callbacks(run_dir, ready), *callbacks, lr_monitor],
                               **trainer_overrides)
    with ctx.phase("train"):
        # weights_only: a checkpoint is data from outside; loading it must not run code.
        trainer.fit(ctx.system, datamodule=ctx.datamodule, ckpt_path=resume, weights_only=True)
    ctx.epochs = (ctx.epochs or 0) + trainer.current_epoch if subdir else trainer.current_epoch
    best = trainer.checkpoint_callback.best_model_path if recipe.checkpoint else ""
    with ctx.phase("eval"):
        trainer.test(ctx.system, datamodule=ctx.datamodule, ckpt_path=best or None,
                     verbose=False, weights_only=True)


def finalize(ctx: RunContext, techniques: list[Technique]) -> tuple[dict[str, Any], dict]:
    """Phases *finalize* and *save*: each technique's facts under its own name; ``"model"``
    entries go to summary.model, with where the run's model was saved (``saved``)."""
    facts: dict[str, Any] = {}
    model: dict[str, Any] = {}
    settle(ctx, techniques)  # idempotent: finalize may be called alone (benchmarks, tests)
    for t in techniques:
        own = {**t.describe(), **ctx.extra.pop(t.name, {}), **t.finalize(ctx)}
        model.update(own.pop("model", {}))
        facts[t.name] = own
    if is_rank_zero(ctx.cfg):  # one writer
        model["saved"] = save_model(ctx, techniques)
    return facts, model


def save_model(ctx: RunContext, techniques: list[Technique]) -> dict[str, Any]:
    """``<run>/model/``: in the form the last technique of the stack that shapes it asks for
    (compressed, int8, …), else backbone + head as trained. A model that cannot be
    saved does not fail the run that trained it: the summary and the report say why."""
    try:
        with ctx.phase("save"):
            for t in reversed(techniques):
                chosen = t.saved_model(ctx)
                if chosen is not None:
                    return saved_model.save(ctx, chosen, t.name)
            return saved_model.save(ctx, saved_model.network_model(ctx), "default")
    except Exception as err:  # noqa: BLE001 - recorded and reported, the results stay
        message = str(err) if isinstance(err, EffbenchError) else f"{type(err).__name__}: {err}"
        # An expected refusal (a sentence) needs no traceback; anything else keeps one.
        log.warning("the model was not saved: %s", message,
                    exc_info=not isinstance(err, EffbenchError))
        return {"error": message}


def headline(techniques: list[Technique], summary: dict[str, Any]) -> str | None:
    lines = [f"{t.name}: {h}" for t in techniques if (h := t.headline(summary))]
    return "\n  ".join(lines) or None
