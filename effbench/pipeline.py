"""The stack of techniques of one run: built from ``cfg.strategy`` (one or several), checked for
compatibility before anything runs, and driven through the shared fit."""

from __future__ import annotations

import logging
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import LearningRateMonitor

from effbench.context import RunContext
from effbench.errors import EffbenchError
from effbench.model import saved as saved_model
from effbench.ranks import global_rank
from effbench.recipe import Recipe
from effbench.technique import EXCLUSIVE, Technique

log = logging.getLogger(__name__)


def build_techniques(strategy: DictConfig) -> list[Technique]:
    """One object per selected technique (``strategy.<name>``), in the order they act."""
    techniques = []
    for name, node in strategy.items():
        t = instantiate(node, _convert_="all")
        if not isinstance(t, Technique):
            raise EffbenchError(f"strategy.{name}._target_ does not name an effbench technique; "
                                "use one of the options of `effbench --help`.")
        t.name = str(name)
        techniques.append(t)
    if not techniques:
        raise EffbenchError("strategy=[] selects no technique; use strategy=finetune for the "
                            "plain recipe.")
    return sorted(techniques, key=lambda t: t.order)


def check_compatible(techniques: list[Technique]) -> None:
    """Refuses an impossible stack with one sentence naming both techniques and why."""
    for i, a in enumerate(techniques):
        for b in techniques[i + 1:]:
            reason = a.incompatible(b) or b.incompatible(a) or _shared_exclusive(a, b)
            if reason:
                raise EffbenchError(f"strategy=[{a.name},{b.name}] cannot run together: {reason}; "
                                    "run them separately and compare.")
    needed = {t.requires_precision for t in techniques} - {None}
    if len(needed) > 1:
        raise EffbenchError(f"strategy=[{','.join(t.name for t in techniques)}] need different "
                            f"precisions ({', '.join(sorted(needed))}); run them separately.")


def _shared_exclusive(a: Technique, b: Technique) -> str | None:
    shared = set(a.acts_on) & set(b.acts_on) & set(EXCLUSIVE)
    if shared:
        what = shared.pop()
        return f"both replace the training {what}, and a run has only one"
    if (a.replaces_loop and b.acts_on) or (b.replaces_loop and a.acts_on):
        loop, other = (a, b) if a.replaces_loop else (b, a)
        if "backbone_grad" in other.needs:
            return (f"{other.name} needs gradients through the backbone, which {loop.name} "
                    "never computes (it trains a head on cached features)")
        return (f"{loop.name} trains in its own loop, where {other.name}'s "
                f"{'/'.join(sorted(other.acts_on))} changes would never act")
    return None


def requirement(techniques: list[Technique], attr: str) -> Any:
    values = [getattr(t, attr) for t in techniques if getattr(t, attr) is not None]
    return values[0] if values else None


def fit(ctx: RunContext, techniques: list[Technique], recipe: Recipe) -> None:
    """The one technique that replaces the loop runs it; otherwise Lightning's fit with the
    recipe's callbacks and every technique's, then the best checkpoint is tested, then any
    technique's second phase (``post_fit``)."""
    owner = next((t for t in techniques if t.replaces_loop), None)
    if owner is not None:
        owner.fit(ctx)
        return
    callbacks = [cb for t in techniques for cb in t.callbacks(ctx)]
    fit_and_test(ctx, techniques, recipe, callbacks, resume=ctx.resume_from)
    for t in techniques:
        t.post_fit(ctx)


def fit_and_test(ctx: RunContext, techniques: list[Technique], recipe: Recipe,
                 callbacks: list, resume: str | None = None, subdir: str = "",
                 **trainer_overrides: Any) -> None:
    """One Lightning fit with the recipe's callbacks, then the test of its best checkpoint."""
    ready = [t.best_checkpoint_ready for t in techniques]
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
    """Each technique's facts under its own name; ``"model"`` entries go to summary.model, with
    where the run's model was saved (``saved``)."""
    facts: dict[str, Any] = {}
    model: dict[str, Any] = {}
    for t in techniques:
        t.settle(ctx)
    for t in techniques:
        own = {**t.describe(), **ctx.extra.pop(t.name, {}), **t.finalize(ctx)}
        model.update(own.pop("model", {}))
        facts[t.name] = own
    if global_rank(ctx.cfg.trainer.get("devices")) == 0:  # one writer
        model["saved"] = save_model(ctx, techniques)
    return facts, model


def save_model(ctx: RunContext, techniques: list[Technique]) -> dict[str, Any]:
    """``<run>/model/``: in the form the last technique of the stack that shapes it asks for
    (prune: compressed, qat: int8), else backbone + head as trained. A model that cannot be
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
