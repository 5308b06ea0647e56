"""Checks of config values before anything runs: one clear sentence per bad value."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from effbench.errors import EffbenchError


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _int_at_least(n: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= n


def _ratio(v: Any) -> bool:
    return isinstance(v, (int, float)) and 0 <= v < 1


# (dotted key, is it valid, what to do instead). Missing keys are skipped: not every group has all.
RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("optim.optimizer.lr", _positive,
     "use a positive learning rate such as optim.optimizer.lr=1e-3"),
    ("trainer.max_epochs", _int_at_least(1), "use trainer.max_epochs=1 or more"),
    ("dataset.batch_size", _int_at_least(1), "use dataset.batch_size=1 or more"),
    ("dataset.image_size", lambda v: v is None or _int_at_least(8)(v),
     "use dataset.image_size=8 or more, or null for the backbone's own size"),
    ("dataset.val_ratio", _ratio, "use a fraction in [0, 1) such as dataset.val_ratio=0.15"),
    ("dataset.test_ratio", _ratio, "use a fraction in [0, 1) such as dataset.test_ratio=0.15"),
    ("optim.optimizer.weight_decay", lambda v: isinstance(v, (int, float)) and v >= 0,
     "use optim.optimizer.weight_decay=0 or a positive value"),
    ("seed", lambda v: isinstance(v, int) and not isinstance(v, bool),
     "use an integer seed such as seed=0"),
    ("hardware.lr_scaling", lambda v: v in ("linear", "none"),
     "use hardware.lr_scaling=linear or none"),
]


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


def check_objective(cfg: DictConfig) -> None:
    """A sweeper is never handed a test metric unless the user asks for it (objective_on_test)."""
    if cfg.get("objective") is None:
        return  # the task's headline (run.default_objective), a validation metric
    metric = str(cfg.get("objective"))
    if metric.startswith("test/") and not cfg.get("objective_on_test", False):
        raise EffbenchError(f"objective={metric} would tune on the test set; use a validation "
                            "metric such as objective=val/acc or val/acc_max, or set "
                            "objective_on_test=true if that is really what you want.")
    if not metric.startswith(("val/", "train/", "test/")):
        raise EffbenchError(f"invalid value objective={metric!r}: use a recorded metric such as "
                            "val/acc, val/acc_max or val/auroc_macro.")


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


def validate(cfg: DictConfig) -> None:
    """Raises :class:`EffbenchError` naming the first bad value and the fix."""
    check_trainer(cfg)
    check_objective(cfg)
    for key, ok, fix in RULES:
        value = OmegaConf.select(cfg, key, default="__absent__")
        if value == "__absent__":
            continue
        if not ok(value):
            raise EffbenchError(f"invalid value {key}={value!r}: {fix}.")
    ratios = OmegaConf.select(cfg, "dataset.val_ratio", default=0) + OmegaConf.select(
        cfg, "dataset.test_ratio", default=0)
    if ratios >= 1:
        raise EffbenchError(f"dataset.val_ratio + dataset.test_ratio = {ratios:g} leaves no "
                            "training data; make their sum less than 1.")
