"""One run: validate → seed → datamodule + model → ``strategy`` → test → ``summary.json``."""

from __future__ import annotations

import logging
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from torch import nn

from effbench.compare.hparams import log_hparams
from effbench.data.base import ImageDataModule
from effbench.errors import EffbenchError
from effbench.hardware import device_name, trainer_kwargs
from effbench.losses import build_loss
from effbench.strategies.base import Strategy
from effbench.summary import (
    SCHEMA_VERSION,
    environment,
    model_stats,
    peak_memory_mb,
    write_json_atomic,
)
from effbench.system import ClassifierSystem
from effbench.tracking import EnergyTracker
from effbench.validate import validate

log = logging.getLogger(__name__)

# Lightning's advice for big datasets is noise for in-memory tensors (workers would only add cost).
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


class SampleCounter(Callback):
    """Counts training images actually processed (all ranks), for the throughput figure."""

    def __init__(self) -> None:
        self.images = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.images += len(batch[1]) * trainer.world_size


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
    counter: SampleCounter = field(default_factory=SampleCounter)
    world_size: int = 1
    _loggers: list | None = None

    @property
    def resume_from(self) -> str | None:
        return self.cfg.get("resume") or None

    @contextmanager
    def phase(self, name: str):
        """Adds the wall time of the block to ``time_s[name]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start

    def loggers(self) -> list:
        if self._loggers is None:
            self._loggers = [TensorBoardLogger(self.run_dir, name="tb", version="",
                                               default_hp_metric=False),
                             CSVLogger(self.run_dir, name="csv", version="")]
        return self._loggers

    def make_trainer(self, callbacks: list[Callback], **overrides: Any) -> pl.Trainer:
        t = self.cfg.trainer
        kwargs = dict(self.trainer_args, max_epochs=int(t.max_epochs),
                      deterministic=t.deterministic, logger=self.loggers(),
                      callbacks=[*callbacks, self.counter], default_root_dir=str(self.run_dir),
                      enable_progress_bar=bool(t.progress_bar),
                      enable_model_summary=bool(t.model_summary),
                      log_every_n_steps=int(t.log_every_n_steps),
                      num_sanity_val_steps=0, limit_train_batches=t.limit_train_batches,
                      limit_val_batches=t.limit_val_batches,
                      limit_test_batches=t.limit_test_batches,
                      gradient_clip_val=t.gradient_clip_val)
        kwargs.update(overrides)
        trainer = pl.Trainer(**kwargs)
        self.world_size = trainer.world_size
        return trainer


def build_context(cfg: DictConfig, run_dir: Path, strategy: Strategy) -> RunContext:
    """Data, backbone, head, loss and the Lightning system, ready for the strategy."""
    targs = trainer_kwargs(cfg.hardware, cfg.trainer)
    backbone = instantiate(cfg.backbone, image_size=cfg.dataset.image_size)
    dm: ImageDataModule = instantiate(cfg.dataset, _convert_="all")
    dm.configure(backbone.preprocessing.with_size(cfg.dataset.image_size))
    dm.setup()
    head = nn.Linear(backbone.feature_dim, dm.num_classes)
    counts = dm.class_counts("train")
    loss = build_loss(dm.task, counts, len(dm.labels["train"]), strategy.class_weights)
    optim = {**strategy.optim_config(), "lr_scaling": cfg.hardware.lr_scaling}
    system = ClassifierSystem(backbone, head, loss, dm.task, dm.class_names, optim,
                              strategy.scheduler, strategy.monitor)
    if cfg.hardware.channels_last:
        system = system.to(memory_format=torch.channels_last)
    return RunContext(cfg=cfg, run_dir=run_dir, datamodule=dm, system=system, trainer_args=targs)


def new_summary(cfg: DictConfig, run_dir: Path, choices: dict[str, str],
                overrides: list[str]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION, "status": "failed", "error": None,
        "run_dir": str(run_dir),
        "choices": {**{k: choices.get(k) for k in ("strategy", "backbone", "dataset", "hardware")},
                    "seed": cfg.get("seed"), "experiment": choices.get("experiment")},
        "overrides": list(overrides), "metrics": {}, "per_class": {}, "best_val": {},
        "epochs": None, "time_s": {}, "throughput_img_s": None,
        "energy": {"kwh": None, "co2_kg": None}, "peak_mem_mb": None,
        "model": {"params_total": None, "params_trainable": None, "size_bytes": None},
        "data": {}, "hardware": {}, "env": {}, "strategy": {},
    }


def run(cfg: DictConfig, run_dir: Path, choices: dict[str, str], overrides: list[str],
        original_cwd: str | Path = ".") -> dict[str, Any]:
    """Runs one job and returns (and, on rank 0, writes) its summary. Never raises."""
    run_dir = Path(run_dir)
    summary = new_summary(cfg, run_dir, choices, overrides)
    start = time.perf_counter()
    times: dict[str, float] = {}
    tracker = EnergyTracker(bool(cfg.tracking.energy) and rank_zero_only.rank == 0,
                            cfg.tracking.country, run_dir)
    accelerator, ctx = "cpu", None
    try:
        validate(cfg)
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
        strategy: Strategy = instantiate(cfg.strategy, _convert_="all")
        ctx = build_context(cfg, run_dir, strategy)
        accelerator = ctx.trainer_args["accelerator"]
        strategy.configure_model(ctx)
        ctx.times["setup"] = time.perf_counter() - start
        times = ctx.times
        tracker.start()
        strategy.fit(ctx)
        summary["strategy"] = {**strategy.describe(), **ctx.extra, **strategy.finalize(ctx)}
        summary["energy"] = tracker.stop()
        _fill_results(summary, ctx)
        if rank_zero_only.rank == 0:
            log_hparams(ctx, summary)  # TensorBoard's HParams tab: config + final metrics
        summary["status"] = "completed"
    except EffbenchError as err:
        summary["error"] = str(err)
    except Exception as err:  # noqa: BLE001 - a failed job is recorded, the sweep goes on
        summary["error"] = f"{type(err).__name__}: {err}"
        if rank_zero_only.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.log").write_text(traceback.format_exc())
        log.exception("run failed")
    finally:
        if summary["status"] != "completed" and tracker._tracker is not None:
            summary["energy"] = tracker.stop()
    summary["time_s"] = {**times, "total": time.perf_counter() - start}
    summary["peak_mem_mb"] = peak_memory_mb(accelerator)
    summary["env"] = environment(device_name(accelerator), original_cwd)
    summary["hardware"] = _hardware(cfg, accelerator, ctx.world_size if ctx else 1)
    if rank_zero_only.rank == 0:
        write_json_atomic(run_dir / "summary.json", summary)
        if _resolvable(cfg):
            OmegaConf.save(cfg, run_dir / "resolved_config.yaml", resolve=True)
    return summary


def _resolvable(cfg: DictConfig) -> bool:
    try:
        OmegaConf.to_container(cfg, resolve=True)
        return True
    except Exception:  # noqa: BLE001
        return False


def _hardware(cfg: DictConfig, accelerator: str, world_size: int) -> dict[str, Any]:
    hw = cfg.hardware
    return {"preset": hw.name, "accelerator": accelerator, "devices": str(cfg.trainer.devices),
            "strategy": str(cfg.trainer.strategy), "precision": str(cfg.trainer.precision),
            "world_size": world_size,
            "specs": OmegaConf.to_container(hw.specs, resolve=True)}


def _fill_results(summary: dict[str, Any], ctx: RunContext) -> None:
    sys_ = ctx.system
    summary["metrics"] = dict(sys_.test_results.get("scalars", {}))
    summary["per_class"] = dict(sys_.test_results.get("per_class", {}))
    summary["best_val"] = dict(sys_.best_val)
    summary["epochs"] = ctx.epochs
    summary["data"] = ctx.datamodule.describe()
    summary["model"] = {**model_stats(sys_), **summary["strategy"].pop("model", {})}
    train_time = ctx.times.get("train")
    images = ctx.counter.images or ctx.extra.get("train_images")
    summary["throughput_img_s"] = images / train_time if images and train_time else None


def run_overrides(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """One job from command-line style overrides, composed as the CLI would, in this process
    (benchmarks, notebooks, tests)."""
    from hydra import compose, initialize_config_dir

    from effbench.cli import CONF_DIR  # also registers the config resolvers

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    return run(cfg, run_dir, choices, list(overrides))
