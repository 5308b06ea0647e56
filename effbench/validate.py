"""Checks of config values before anything runs: one clear sentence per bad value."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from effbench.errors import EffbenchError
from effbench.system import OPTIMIZERS


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _int_at_least(n: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= n


def _ratio(v: Any) -> bool:
    return isinstance(v, (int, float)) and 0 <= v < 1


# (dotted key, is it valid, what to do instead). Missing keys are skipped: not every group has all.
RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("strategy.lr", _positive, "use a positive learning rate such as strategy.lr=1e-3"),
    ("trainer.max_epochs", _int_at_least(1), "use trainer.max_epochs=1 or more"),
    ("dataset.batch_size", _int_at_least(1), "use dataset.batch_size=1 or more"),
    ("dataset.image_size", lambda v: v is None or _int_at_least(8)(v),
     "use dataset.image_size=8 or more, or null for the backbone's own size"),
    ("dataset.val_ratio", _ratio, "use a fraction in [0, 1) such as dataset.val_ratio=0.15"),
    ("dataset.test_ratio", _ratio, "use a fraction in [0, 1) such as dataset.test_ratio=0.15"),
    ("strategy.weight_decay", lambda v: isinstance(v, (int, float)) and v >= 0,
     "use strategy.weight_decay=0 or a positive value"),
    ("strategy.optimizer", lambda v: v in OPTIMIZERS,
     f"use one of {', '.join(OPTIMIZERS)}"),
    ("seed", lambda v: isinstance(v, int) and not isinstance(v, bool),
     "use an integer seed such as seed=0"),
    ("hardware.lr_scaling", lambda v: v in ("linear", "none"),
     "use hardware.lr_scaling=linear or none"),
]


def validate(cfg: DictConfig) -> None:
    """Raises :class:`EffbenchError` naming the first bad value and the fix."""
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
