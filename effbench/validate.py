"""Checks of config values before anything runs: one clear sentence per bad value.

The light checks (the typed schema of effbench/schema.py, the objective, the strategy list, the
data's sizes) run in the CLI's preflight for every job a command would start, before Hydra starts
any; ``validate`` runs them again in the job with the ones that need Lightning (trainer keys).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from effbench import schema
from effbench.errors import EffbenchError
from effbench.task import is_multilabel


def _int_at_least(n: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= n


PRECISIONS = ("auto", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true",
              "transformer-engine", "32", "16", "bf16", "64")


def _trainer_parameters() -> dict[str, inspect.Parameter]:
    import pytorch_lightning as pl

    return dict(inspect.signature(pl.Trainer.__init__).parameters)


def check_trainer(cfg: DictConfig) -> None:
    """Every ``trainer.*`` key must be a Lightning ``Trainer`` argument (it is passed through
    as is); the ones the pipeline owns are refused, since setting them would change nothing."""
    from effbench.context import PIPELINE_TRAINER_KEYS

    params = _trainer_parameters()
    for key in cfg.trainer:
        if key in PIPELINE_TRAINER_KEYS:
            raise EffbenchError(f"trainer.{key} cannot be set: {PIPELINE_TRAINER_KEYS[key]}; "
                                f"remove trainer.{key}=….")
        if key not in params or key == "self":
            close = difflib.get_close_matches(str(key), [p for p in params if p != "self"], n=3)
            hint = f" (did you mean {', '.join('trainer.' + c for c in close)}?)" if close else ""
            raise EffbenchError(f"trainer.{key} is not an argument of Lightning's Trainer"
                                f"{hint}; every trainer.* key is passed to pytorch_lightning."
                                "Trainer, so use one of its argument names.")
    precision = str(cfg.trainer.get("precision"))
    if precision not in PRECISIONS:
        raise EffbenchError(f"invalid value trainer.precision={precision!r}: use one of "
                            f"{', '.join(PRECISIONS[:6])} (auto: bf16/fp16 mixed on a GPU, 32-true "
                            "on CPU).")
    devices = cfg.trainer.get("devices")
    if devices in (0, "0") or (isinstance(devices, int) and devices < -1):
        raise EffbenchError(f"invalid value trainer.devices={devices!r}: use 1 or more devices, "
                            "or auto.")
    nodes = cfg.trainer.get("num_nodes", 1)
    if not _int_at_least(1)(nodes):
        raise EffbenchError(f"invalid value trainer.num_nodes={nodes!r}: use 1 or more.")


# What a run records, by the name an objective uses: ``best_val`` holds the best-val-loss epoch's
# validation scalars (system.py), ``metrics`` the test scalars and the best validation accuracy /
# AUROC over epochs (results.val_max).
METRICS = ("acc", "f1_macro", "auroc_macro")
OBJECTIVES = (*(f"val/{m}" for m in (*METRICS, "loss")), "val/acc_max", "val/auroc_macro_max",
              *(f"test/{m}" for m in METRICS))


def check_objective(cfg: DictConfig) -> None:
    """A sweeper is never handed a test metric unless the user asks for it (objective_on_test),
    nor a name no run records (its value would always be null)."""
    if cfg.get("objective") is None:
        return  # the task's headline (results.default_objective), a validation metric
    metric = str(cfg.get("objective"))
    if metric.startswith("test/") and not cfg.get("objective_on_test", False):
        raise EffbenchError(f"objective={metric} would tune on the test set; use a validation "
                            "metric such as objective=val/acc or val/acc_max, or set "
                            "objective_on_test=true if that is really what you want.")
    if metric not in OBJECTIVES:
        close = difflib.get_close_matches(metric, OBJECTIVES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise EffbenchError(f"invalid value objective={metric!r}: no run records it{hint}; use "
                            f"one of {', '.join(o for o in OBJECTIVES if o.startswith('val/'))}.")


def check_strategies(overrides: list[str]) -> None:
    """``strategy=[a,a]`` composes to one ``a`` (Hydra merges the same option twice):
    a technique named twice is refused rather than silently applied once."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key != "strategy" or not value.startswith("["):
            continue
        names = [n.strip() for n in value.strip("[]").split(",") if n.strip()]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            unique = list(dict.fromkeys(names))
            raise EffbenchError(f"strategy={value} names {', '.join(twice)} twice; a technique "
                                f"acts once per run, so use strategy=[{','.join(unique)}].")


# The preset that sets each schedule's keys (and the other's to null): the fixes named below.
SCHEDULE_PRESETS = {"plateau": "optim=default", "cosine": "optim=cosine"}


def check_schedule(cfg: DictConfig) -> None:
    """``optim.scheduler``'s keys belong to its ``name``: a key of the other schedule that is set
    would be ignored, one of its own that is null could not be used; a warm-up must end before
    the training does (in epochs here; in optimizer steps when the run starts, recipe.py)."""
    node = OmegaConf.select(cfg, "optim.scheduler", default=None)
    if not isinstance(node, DictConfig):
        return  # null: a constant rate
    name = str(node.get("name") or "plateau")  # no name: plateau, what it meant before names
    for owner, keys in schema.SCHEDULES.items():
        for key in keys:
            value = node.get(key)
            if owner != name and value is not None:
                raise EffbenchError(f"optim.scheduler.{key}={value!r} is a key of the {owner} "
                                    f"schedule, but optim.scheduler.name={name}: it would be "
                                    f"ignored; set optim.scheduler.{key}=null (as "
                                    f"{SCHEDULE_PRESETS[name]} does) or use "
                                    f"{SCHEDULE_PRESETS[owner]} for the {owner} schedule.")
            if owner == name and value is None:
                fix = schema.BY_KEY[f"optim.scheduler.{key}"].fix
                raise EffbenchError(f"optim.scheduler.{key}=null, but the {name} schedule reads "
                                    f"it: {fix}.")
    warmup, epochs = node.get("warmup_epochs"), cfg.trainer.get("max_epochs")
    if name == "cosine" and isinstance(epochs, int) and warmup >= epochs:
        raise EffbenchError(f"optim.scheduler.warmup_epochs={warmup} is not shorter than "
                            f"trainer.max_epochs={epochs}, so the cosine after it would have no "
                            "step; use a shorter warm-up (e.g. optim.scheduler.warmup_epochs="
                            f"{min(1, epochs / 2):g}) or raise trainer.max_epochs.")


def check_light(cfg: DictConfig, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """The checks that need neither torch nor Lightning (the CLI's preflight runs these)."""
    schema.check(cfg)
    check_schedule(cfg)
    check_objective(cfg)
    check_strategies(list(overrides))
    val = OmegaConf.select(cfg, "dataset.val_ratio", default=0)
    test = OmegaConf.select(cfg, "dataset.test_ratio", default=0)
    if val + test >= 1:
        raise EffbenchError(f"dataset.val_ratio + dataset.test_ratio = {val + test:g} leaves no "
                            "training data; make their sum less than 1.")
    classes = OmegaConf.select(cfg, "dataset.num_classes", default=None)
    train = OmegaConf.select(cfg, "dataset.num_train", default=None)
    if isinstance(classes, int) and isinstance(train, int) and 0 < train < classes:
        raise EffbenchError(f"dataset.num_classes={classes} is more than the "
                            f"dataset.num_train={train} training images; use at least one image "
                            f"per class (dataset.num_train={classes} or more).")


def check_data(num_classes: int, task: str, train_images: int) -> None:
    """After the data is read: a class the train split cannot hold one image of is never learnt
    (what dataset.max_samples or a tiny folder leads to)."""
    if not is_multilabel(task) and train_images < num_classes:
        raise EffbenchError(f"the train split holds {train_images} images for {num_classes} "
                            "classes; use at least one image per class (raise "
                            "dataset.max_samples or give more data).")


def check_strategy_trainer_keys(strategy: Any, cfg: DictConfig) -> None:
    """A strategy with its own training loop honours only some Trainer arguments; any other one
    set to a non-default value would be silently ignored, so it is refused."""
    honoured = getattr(strategy, "trainer_keys", None)
    if honoured is None:
        return
    params = _trainer_parameters()
    for key, value in cfg.trainer.items():
        if key in honoured or key in ("devices", "strategy", "precision") or value is None:
            continue
        default = params[key].default if key in params else None
        if value != default:
            raise EffbenchError(f"trainer.{key}={value} has no effect with strategy="
                                f"{strategy.name} (it trains without Lightning's loop); "
                                f"remove trainer.{key}=….")


def validate(cfg: DictConfig, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Raises :class:`EffbenchError` naming the first bad value and the fix."""
    check_light(cfg, overrides)
    check_trainer(cfg)
