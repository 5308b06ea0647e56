"""The config's typed schema: every value effbench reads as a number, a choice, a flag or a path,
with its type, its range, whether it may be null and whether it must be there at all.

One table, checked in one place (``check``) before anything runs — by the CLI's preflight for
every job a command would start (a sweep's included), and again by ``validate.validate`` in each
job (a job started by a launcher or from Python). Each refusal is one sentence naming the key,
the bad value and the fix. Groups whose options differ in their keys (a dataset without
``val_ratio``) are checked where the key exists; ``required`` keys exist in every option, so their
absence means the user deleted them (``~optim.optimizer.lr``).

A table rather than Hydra structured configs: the groups are open (any ``_target_``, any
``+key=…`` a constructor accepts), so a closed dataclass per group would refuse what works today;
the constructors still refuse the options they do not have (errors.user_message).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from effbench.errors import EffbenchError

ABSENT = object()
# optim.scheduler.name → the keys only that schedule reads (min_lr, the rate's floor: both)
SCHEDULES: dict[str, tuple[str, ...]] = {
    "plateau": ("patience", "factor"),
    "cosine": ("warmup_epochs", "warmup_start_factor"),
}
SEED_MAX = 2**32 - 1  # numpy's seeds (Lightning's seed_everything seeds numpy too)
# hardware.compile: false, true (torch.compile's default mode) or one of torch.compile's modes
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class Field:
    """One key: ``kind`` is int | float | str | bool; ``low``/``high`` bound numbers (``open_low``:
    the bound itself is refused); ``choices`` lists a string's values; ``fix`` ends the sentence."""

    key: str
    kind: str
    fix: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    nullable: bool = False
    required: bool = False
    choices: tuple[str, ...] = ()

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "bool|str":
            return isinstance(value, bool) or (isinstance(value, str) and value in self.choices)
        if self.kind == "str":
            return isinstance(value, str) and value.strip() != "" and (
                not self.choices or value in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if not math.isfinite(value):  # inf / nan pass every comparison below or none
            return False
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.open_high
                                                               and value == self.high))


def _count(key: str, low: int, example: int, nullable: bool = False, required: bool = False,
           what: str = "") -> Field:
    null = ", or null" if nullable else ""
    return Field(key, "int", f"use an integer >= {low}{what} such as {key}={example}{null}",
                 low=low, nullable=nullable, required=required)


def _fraction(key: str, example: float) -> Field:
    return Field(key, "float", f"use a fraction in [0, 1) such as {key}={example}", low=0, high=1,
                 open_high=True)


FIELDS: tuple[Field, ...] = (
    Field("seed", "int", f"use an integer seed in 0..{SEED_MAX} such as seed=0", low=0,
          high=SEED_MAX, required=True),
    Field("data_dir", "str", "use a folder such as data_dir=data", required=True),
    Field("cache_dir", "str", "use a folder such as cache_dir=~/.cache/effbench", required=True),
    Field("resume", "str", "use the path of a checkpoint such as "
          "resume=outputs/<run>/checkpoints/last.ckpt, or null", nullable=True),
    Field("objective_on_test", "bool", "use objective_on_test=false or true"),
    Field("tracking.energy", "bool", "use tracking.energy=true or false"),
    # the training recipe
    Field("optim.optimizer.lr", "float", "use a positive, finite learning rate such as "
          "optim.optimizer.lr=1e-3", low=0, open_low=True, required=True),
    Field("optim.optimizer.weight_decay", "float", "use optim.optimizer.weight_decay=0 or a "
          "positive, finite value", low=0),
    Field("optim.optimizer.momentum", "float", "use a momentum in [0, 1) such as "
          "optim.optimizer.momentum=0.9", low=0, high=1, open_high=True),
    Field("optim.scheduler.name", "str", f"use optim.scheduler.name={' or '.join(SCHEDULES)} "
          "(optim=cosine sets the cosine's keys), or optim.scheduler=null for a constant rate",
          choices=tuple(SCHEDULES)),
    # null: a key of another schedule (validate.check_schedule refuses one set with the wrong name)
    Field("optim.scheduler.patience", "int", "use an integer >= 0 (epochs without improvement) "
          "such as optim.scheduler.patience=5", low=0, nullable=True),
    Field("optim.scheduler.factor", "float", "use a factor in (0, 1) such as "
          "optim.scheduler.factor=0.1", low=0, high=1, open_low=True, open_high=True,
          nullable=True),
    Field("optim.scheduler.min_lr", "float", "use optim.scheduler.min_lr=0 or a small positive "
          "value such as 1e-5", low=0),
    Field("optim.scheduler.warmup_epochs", "float", "use a number of epochs >= 0 (a fraction "
          "allowed) such as optim.scheduler.warmup_epochs=1, or 0 for no warm-up", low=0,
          nullable=True),
    Field("optim.scheduler.warmup_start_factor", "float", "use a factor in (0, 1] such as "
          "optim.scheduler.warmup_start_factor=0.01 (the warm-up starts at it × the lr)", low=0,
          high=1, open_low=True, nullable=True),
    _count("optim.early_stopping.patience", 0, 15, nullable=True,
           what=" (epochs without improvement)"),
    Field("optim.checkpoint", "bool", "use optim.checkpoint=true or false"),
    Field("optim.class_weights", "bool", "use optim.class_weights=false or true"),
    # the Trainer (the rest: validate.check_trainer against Lightning's own signature)
    _count("trainer.max_epochs", 1, 15, required=True),
    Field("trainer.gradient_clip_val", "float", "use a positive, finite value such as "
          "trainer.gradient_clip_val=1.0, or null", low=0, open_low=True, nullable=True),
    # the data
    Field("dataset.root", "str", "give the dataset's folder, e.g. dataset.root=data/<dataset>, "
          "or drop the override (the default is ${data_dir}/<dataset>)", nullable=True,
          required=True),
    _count("dataset.batch_size", 1, 64, required=True),
    _count("dataset.eval_batch_size", 1, 256),
    Field("dataset.image_size", "int", "use dataset.image_size=8 or more, or null for the "
          "backbone's own size", low=8, nullable=True),
    _fraction("dataset.val_ratio", 0.15),
    _fraction("dataset.test_ratio", 0.15),
    _count("dataset.max_samples", 1, 1000, nullable=True, what=" (images per split)"),
    _count("hardware.num_workers", 0, 2, what=" (0: load in the main process)"),
    _count("dataset.num_workers", 0, 2, what=" (0: load in the main process)"),
    Field("hardware.lr_scaling", "str", "use hardware.lr_scaling=linear or none",
          choices=("linear", "none")),
    Field("hardware.compile", "bool|str", "use hardware.compile=false, true (torch.compile's "
          f"default mode) or one of its modes {', '.join(COMPILE_MODES)}", choices=COMPILE_MODES),
)
BY_KEY = {f.key: f for f in FIELDS}


def select(cfg: DictConfig, key: str) -> Any:
    """The value at ``key`` (interpolations resolved), or ``ABSENT``."""
    return OmegaConf.select(cfg, key, default=ABSENT, throw_on_missing=False)


def check(cfg: DictConfig, fields: Iterable[Field] = FIELDS) -> None:
    """Raises :class:`EffbenchError` naming the first key whose value the schema refuses."""
    for field in fields:
        parent = field.key.rpartition(".")[0]
        if parent and select(cfg, parent) in (None, ABSENT):
            continue  # optim.early_stopping=null: its keys are off, not missing
        value = select(cfg, field.key)
        if value is ABSENT:
            if field.required:
                raise EffbenchError(f"{field.key} is required but missing (deleted with "
                                    f"~{field.key}?): {field.fix}.")
            continue
        if not field.ok(value):
            raise EffbenchError(f"invalid value {field.key}={value!r}: {field.fix}.")
