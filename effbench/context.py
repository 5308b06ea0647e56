"""The run context a strategy works with: config, run dir, data, model, the Trainer factory, phase
timers, and the records that must survive a resume (time, images, energy, the CSV history)."""

from __future__ import annotations

import csv
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.io import AsyncCheckpointIO

from effbench.data.base import ImageDataModule
from effbench.loggers import build_loggers, log_config
from effbench.reproducible import AtomicCheckpointIO, EpochSeed
from effbench.resident import ResidentData
from effbench.system import ClassifierSystem

# Trainer arguments the pipeline owns: a user setting them would silently lose them (callbacks,
# loggers) or move the records (default_root_dir); the accelerator belongs to the hardware plan.
PIPELINE_TRAINER_KEYS = {"callbacks": "the strategy adds its callbacks",
                         "logger": "choose trackers with logger=tensorboard_csv | mlflow | wandb",
                         "default_root_dir": "outputs go to the run dir (hydra.run.dir)",
                         "plugins": "checkpoints are written atomically by effbench's own IO",
                         "accelerator": "the accelerator comes from hardware=… "
                                        "(or hardware.accelerator=…)"}
# Resolved by the hardware plan (hardware.trainer_kwargs) and passed from ``trainer_args``.
PLAN_KEYS = ("devices", "strategy", "precision")


class RunRecord(Callback):
    """Training images, training seconds and energy of the whole run, across resumes: the values
    of the interrupted part travel inside the checkpoint (Lightning saves a callback's
    ``state_dict``) and are added to the resumed part's."""

    def __init__(self, energy_kwh: Callable[[], float | None] = lambda: None) -> None:
        self.images = 0
        self.before = {"train_s": 0.0, "images": 0, "kwh": 0.0, "epochs": 0}
        self.resumed_at_epoch: int | None = None
        self._energy_kwh = energy_kwh
        self._fit_start: float | None = None
        self._fit_s = 0.0
        self._loaded: dict[str, Any] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.images += len(batch[1]) * trainer.world_size

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit_start is not None:
            self._fit_s += time.perf_counter() - self._fit_start
            self._fit_start = None

    def total_images(self) -> int:
        """Training images of the whole run, the interrupted part included."""
        return int(self.before["images"]) + self.images

    def fit_seconds(self) -> float:
        running = time.perf_counter() - self._fit_start if self._fit_start is not None else 0.0
        return self._fit_s + running

    def state_dict(self) -> dict[str, Any]:
        kwh = self._energy_kwh()
        return {"train_s": self.before["train_s"] + self.fit_seconds(),
                "images": self.before["images"] + self.images,
                "kwh": self.before["kwh"] + (kwh or 0.0)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Lightning also restores callbacks when testing a checkpoint; only a resumed fit counts.
        self._loaded = {k: state.get(k, 0) for k in ("train_s", "images", "kwh")}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded:
            self.before.update(self._loaded)
            self._loaded = {}


class HistoryCSVLogger(CSVLogger):
    """Lightning's CSV logger, which keeps the rows of the run being resumed.

    Lightning's writer deletes an existing ``metrics.csv`` when it starts (and a resume into a new
    folder starts an empty one). Here the rows up to the resumed checkpoint's epoch are read first
    and written back ahead of the new ones, so the file describes the whole run.
    """

    def __init__(self, *args: Any, history: list[dict[str, str]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._history = history or []

    @property
    def experiment(self) -> Any:
        first = self._experiment is None
        exp = super().experiment
        if first and self._history:
            exp.metrics[:0] = [{k: v for k, v in row.items() if v != ""}
                               for row in self._history]
            self._history = []
        return exp


def csv_history(csv_path: Path, upto_epoch: int) -> list[dict[str, str]]:
    """Rows of an earlier part of the run with ``epoch <= upto_epoch`` (later rows were logged
    after the checkpoint and will be logged again)."""
    if not csv_path.is_file():
        return []
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))

    def epoch(row: dict[str, str]) -> float:
        try:
            return float(row.get("epoch") or 0)
        except ValueError:
            return 0.0

    return [r for r in rows if epoch(r) <= upto_epoch]


@dataclass
class RunContext:
    """Everything a strategy needs; strategies add phase times and ``extra`` summary entries."""

    cfg: DictConfig
    run_dir: Path
    datamodule: ImageDataModule
    system: ClassifierSystem
    trainer_args: dict[str, Any]
    times: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None
    record: RunRecord = field(default_factory=RunRecord)
    world_size: int = 1
    recipe: Any = None  # effbench.recipe.Recipe: optimizer, scheduler, early stopping, checkpoint
    plan: Any = None  # effbench.hardware.HardwarePlan: resolved once, read by everything
    resident: Any = None  # the last Trainer's ResidentData (what it did: facts)
    techniques: list = field(default_factory=list)  # the stack, in the order they act
    resume: dict[str, Any] | None = None  # {"path", "epoch", "run_dir"} of the checkpoint
    history_rows: list[dict[str, str]] = field(default_factory=list)  # CSV rows before a resume
    energy: Any = None  # effbench.tracking.EnergyTracker: each phase's energy, next to its time
    _loggers: list | None = None
    _phase_depth: int = 0

    @property
    def resume_from(self) -> str | None:
        return self.resume["path"] if self.resume else None

    @contextmanager
    def phase(self, name: str):
        """Adds the wall time of the block to ``time_s[name]`` and its energy to
        ``energy.phases_kwh[name]`` (an inner phase's energy stays with the outer one)."""
        measure = self.energy is not None and self._phase_depth == 0
        if measure:
            self.energy.phase_start(name)
        self._phase_depth += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
            self._phase_depth -= 1
            if measure:
                self.energy.phase_stop()

    def loggers(self) -> list:
        """The run's Lightning loggers, built once from ``cfg.logger``."""
        if self._loggers is None:
            history: list[dict[str, str]] = []
            if self.resume:
                old = Path(self.resume["run_dir"])
                history = csv_history(old / "csv" / "metrics.csv", int(self.resume["epoch"]))
                self.history_rows = history
                if old.resolve() != self.run_dir.resolve():
                    _copy_events(old / "tb", self.run_dir / "tb")
            # logger=… (conf/logger/): TensorBoard + CSV in the run dir, plus any tracker.
            self._loggers = build_loggers(self.cfg.get("logger"), self.run_dir, history)
            log_config(self._loggers, self.cfg)
        return self._loggers

    @property
    def built_loggers(self) -> list:
        """The loggers built so far (none if the run failed before ``loggers()``)."""
        return list(self._loggers or [])

    def trainer_options(self) -> dict[str, Any]:
        """Every ``trainer.*`` key as Lightning's argument of the same name (plan keys resolved)."""
        opts = OmegaConf.to_container(self.cfg.trainer, resolve=True)
        assert isinstance(opts, dict)
        for key in PLAN_KEYS:
            opts.pop(key, None)
        return {**opts, **self.trainer_args}

    def make_trainer(self, callbacks: list[Callback], **overrides: Any) -> pl.Trainer:
        self.resident = ResidentData(self.datamodule,
                                     self.plan.data_on_device_share if self.plan else 0.0)
        kwargs = {**self.trainer_options(), "logger": self.loggers(),
                  "callbacks": [*callbacks, self.record, EpochSeed(int(self.cfg.seed)),
                                self.resident],
                  # Checkpoints (last.ckpt every epoch, for resume) are written by a background
                  # thread from cloned tensors, so training does not wait on serialisation and
                  # fsync; each file still appears atomically, and fit's teardown waits for all.
                  "plugins": [AsyncCheckpointIO(AtomicCheckpointIO())],
                  "default_root_dir": str(self.run_dir)}
        kwargs.update(overrides)
        return pl.Trainer(**kwargs)


def _copy_events(src: Path, dst: Path) -> None:
    """TensorBoard reads every event file of a folder: the earlier part's events join the new."""
    if not src.is_dir():
        return
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.glob("events.out.tfevents.*"):
        if not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)
