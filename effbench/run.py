"""One run: validate → own the run dir → seed → datamodule + model → ``strategy`` → test →
``summary.json``."""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from effbench import pipeline, predictions, results
from effbench.compare.hparams import log_hparams
from effbench.context import RunContext, RunRecord
from effbench.data.base import ImageDataModule
from effbench.errors import EffbenchError, user_message
from effbench.hardware import device_name, resolve_plan
from effbench.lifecycle import (
    Interrupted,
    StopSignals,
    interrupted_checkpoint,
    interrupted_message,
    requeue,
    slurm_job_id,
)
from effbench.loggers import finish_loggers, quiet_third_party
from effbench.losses import build_loss
from effbench.ranks import is_rank_zero
from effbench.recipe import Recipe, unfused_for_clipping
from effbench.rundir import (
    RunDirLock,
    check_resume,
    check_resume_matches,
    write_failure,
    write_text_atomic,
)
from effbench.stack import build_techniques, check_compatible, requirement
from effbench.summary import (
    environment,
    peak_memory_mb,
    write_json_atomic,
)
from effbench.system import ClassifierSystem, Diverged
from effbench.technique import Technique
from effbench.tracking import EnergyTracker, check_country
from effbench.validate import check_data, check_strategy_trainer_keys, validate

log = logging.getLogger(__name__)

# Lightning's advice for big datasets is noise for in-memory tensors (workers would only add cost).
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


def build_context(cfg: DictConfig, run_dir: Path, techniques: list[Technique], recipe: Recipe,
                  overrides: list[str]) -> RunContext:
    """Data, backbone, head, loss and the Lightning system, ready for the techniques."""
    needed = requirement(techniques, "requires_precision")
    who = next((f"strategy={t.name}" for t in techniques if t.requires_precision), "")
    plan = resolve_plan(cfg.hardware, cfg.trainer, needed,
                        explicit_precision=_set_by_user("trainer.precision", overrides), who=who)
    recipe = unfused_for_clipping(recipe, cfg.optim, plan.precision,
                                  cfg.trainer.get("gradient_clip_val"),
                                  _set_by_user("optim.optimizer.fused", overrides))
    cached = _cached_parts(cfg, techniques)
    if cached is not None:
        backbone, dm = cached
    else:
        backbone = instantiate(cfg.backbone, image_size=cfg.dataset.image_size)
        dm = instantiate(cfg.dataset, _convert_="all")
        dm.shuffle_seed = int(cfg.seed)
        dm.configure(backbone.preprocessing.with_size(cfg.dataset.image_size))
        dm.setup()
        check_data(dm.num_classes, dm.task, len(dm.labels["train"]))
    head = backbone.build_head(dm.num_classes)  # backbone.head: linear | mlp (the study's)
    counts = dm.class_counts("train")
    loss = build_loss(dm.task, counts, len(dm.labels["train"]), recipe.class_weights)
    optim = {"factory": recipe.optimizer, "lr": recipe.lr, "lr_scale": plan.lr_scale}
    system = ClassifierSystem(backbone, head, loss, dm.task, dm.class_names, optim,
                              recipe.scheduler, recipe.monitor)
    if plan.channels_last:
        system = system.to(memory_format=torch.channels_last)
    if plan.compile_mode:  # in place: the modules (and their state_dict keys) stay as they are
        for part in (system.backbone, system.head):
            part.compile(mode=plan.compile_mode)
    return RunContext(cfg=cfg, run_dir=run_dir, datamodule=dm, system=system,
                      trainer_args=plan.trainer_args(), recipe=recipe, plan=plan,
                      world_size=plan.world_size)


def _cached_parts(cfg: DictConfig, techniques: list[Technique],
                  ) -> tuple[torch.nn.Module, ImageDataModule] | None:
    """The first technique that can serve the job from a cache (``Technique.cached_parts``)."""
    return next((parts for t in techniques if (parts := t.cached_parts(cfg)) is not None), None)


def build_run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> RunContext:
    """The techniques, the recipe and the context of a run, checked, nothing trained yet
    (benchmarks and tests drive the hooks themselves)."""
    techniques = build_techniques(cfg.strategy)
    check_compatible(techniques)
    recipe = Recipe.from_config(cfg.optim)
    ctx = build_context(cfg, Path(run_dir), techniques, recipe, list(overrides or []))
    ctx.techniques = techniques
    return ctx


def _set_by_user(key: str, overrides: list[str]) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in overrides)


_startup_taken = False
_heap_frozen = False


def _freeze_import_heap() -> None:
    """Once per process, before its first job: the ~0.5 million objects the imports made (torch,
    Lightning, torchmetrics, Hydra) move to the collector's permanent generation
    (``gc.freeze``, the stdlib's answer to exactly this). They live as long as the process, yet
    every full collection walked them all: one such pass cost 0.25–0.56 s inside the first job
    of a run (seen as a 0.6-s ``isinstance`` while a ``Metric`` was built), more than the whole
    set-up of a cached-feature job. Objects made later are collected as before; what is frozen
    here is never freed (the imports, and the config composed for the first job)."""
    global _heap_frozen
    if not _heap_frozen:
        _heap_frozen = True
        gc.freeze()


def _take_startup_s() -> float | None:
    """Seconds from the interpreter's start to now (imports, Hydra's composition: the part of a
    whole command that no phase covers), for the first run of this process only; None for a
    later one (a sweep's second job paid no start-up)."""
    global _startup_taken
    if _startup_taken:
        return None
    _startup_taken = True
    import psutil  # comes with codecarbon

    return max(0.0, time.time() - psutil.Process().create_time())


def run(cfg: DictConfig, run_dir: Path, choices: dict[str, str], overrides: list[str],
        original_cwd: str | Path = ".") -> dict[str, Any]:
    """Runs one job and returns (and, on rank 0, writes) its summary. Never raises.

    The run dir is claimed first: a dir that holds another completed run (unless resuming it) or
    that another live job holds is refused, and nothing is written into it.
    """
    run_dir = Path(run_dir)
    _freeze_import_heap()
    summary = results.new_summary(cfg, run_dir, choices, overrides)
    start = time.perf_counter()
    startup = _take_startup_s()
    load_at_start = os.getloadavg()
    quiet_third_party()
    rank0 = is_rank_zero(cfg)
    try:
        requeued_job = _requeue_job(cfg)
    except EffbenchError as err:
        summary["error"] = str(err)  # refused before the folder is touched
        return summary
    if requeued_job and cfg.get("resume") in (None, ""):
        # A requeued SLURM job runs the same command again: it continues the interrupted run.
        cfg.resume = interrupted_checkpoint(run_dir)
    lock = RunDirLock(run_dir, cfg.get("resume"))
    # SIGINT / SIGTERM end the run with an `interrupted` summary (effbench/lifecycle.py).
    with StopSignals() as stop:
        try:
            try:
                if rank0:
                    lock.acquire()
            except EffbenchError as err:
                summary["error"] = str(err)  # not ours to write into: leave the dir untouched
                return summary
            try:
                return _run_owned(cfg, run_dir, summary, overrides, start, load_at_start,
                                  original_cwd, stop, startup)
            finally:
                lock.release()
        except (Interrupted, KeyboardInterrupt) as err:  # claiming or letting go of the folder
            if summary["status"] not in ("completed", "interrupted"):
                _record_interrupted(summary, stop.received(err) or signal.SIGINT, run_dir,
                                    overrides, cfg)
            return summary


def _run_owned(cfg: DictConfig, run_dir: Path, summary: dict[str, Any], overrides: list[str],
               start: float, load_at_start: tuple[float, ...],
               original_cwd: str | Path, stop: StopSignals,
               startup: float | None) -> dict[str, Any]:
    rank0 = is_rank_zero(cfg)
    times: dict[str, float] = {}
    tracker = EnergyTracker(bool(cfg.tracking.energy) and rank0, cfg.tracking.country, run_dir)
    accelerator, ctx = "cpu", None
    # A folder that already holds a run (resuming in place) is not touched until every check has
    # passed: a refused command leaves it byte for byte. A new folder gets a `running` summary
    # at once, so a run killed outright still shows (effbench-compare: incomplete).
    touched = not (run_dir / "summary.json").exists()
    try:
        # Inside the try: a signal the moment the running summary appears (what a watcher of
        # summary.json waits for) still ends in an `interrupted` summary, not a `running` one.
        if touched and rank0:
            _write_running(run_dir, summary)
        validate(cfg, overrides)
        if cfg.tracking.energy:
            check_country(cfg.tracking.country)
        resume = check_resume(cfg.get("resume"))
        summary["resumed_from"] = resume["path"] if resume else None
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
        techniques = build_techniques(cfg.strategy)
        check_compatible(techniques)
        for t in techniques:
            check_strategy_trainer_keys(t, cfg)
        recipe = Recipe.from_config(cfg.optim)
        ctx = build_context(cfg, run_dir, techniques, recipe, overrides)
        ctx.resume = resume
        ctx.techniques = techniques
        ctx.record = RunRecord(tracker.kwh_so_far)
        ctx.energy = tracker  # each phase's energy, next to its time
        accelerator = ctx.trainer_args["accelerator"]
        for t in techniques:
            t.check(ctx)
        for t in techniques:
            t.configure_model(ctx)
        check_resume_matches(resume, ctx.system)
        if rank0 and not touched:
            touched = _write_running(run_dir, summary)
        ctx.times["setup"] = time.perf_counter() - start
        times = ctx.times
        started = time.perf_counter()
        tracker.start()
        times["energy_tracker"] = time.perf_counter() - started
        summary["strategy"], model_facts = pipeline.run(ctx, techniques, ctx.recipe)
        started = time.perf_counter()
        energy = results.whole_run_energy(tracker.stop(), ctx.record)
        times["energy_tracker"] += time.perf_counter() - started
        summary["energy"] = results.with_batched_share(energy, summary["strategy"])
        results.fill_results(summary, ctx, model_facts)
        if rank0:  # <run>/predictions.npz: per test sample, for paired comparisons
            summary["predictions"] = predictions.write(run_dir, ctx.system, ctx.datamodule)
        summary["objective"] = results.objective(cfg, summary)
        summary["headline"] = pipeline.headline(techniques, summary)
        if rank0:  # TensorBoard's HParams tab: config + final metrics
            log_hparams(ctx.loggers(), cfg, {**summary, "time_s": dict(ctx.times)})
        summary["status"] = "completed"
    except (Interrupted, KeyboardInterrupt, SystemExit) as err:
        signum = stop.received(err)
        if signum is None:  # a library's sys.exit: a failure like any other
            summary["error"] = f"the run stopped early ({type(err).__name__}: {err})"
        else:
            _record_interrupted(summary, signum, run_dir, overrides, cfg)
            if signum == signal.SIGTERM and (job := _requeue_job(cfg)):
                summary["requeued"] = requeue(job)
                summary["error"] += f"; {summary['requeued']}."
    except Exception as err:  # noqa: BLE001 - a failed job is recorded, the sweep goes on
        message = user_message(err) or write_failure(err)
        if isinstance(err, Diverged):  # not a crash, and not a result either
            summary["status"], summary["epochs"] = "diverged", err.epoch
            summary["diverged"] = {"epoch": err.epoch, "metric": err.metric}
        if message is not None:
            summary["error"] = message
        else:
            summary["error"] = f"{type(err).__name__}: {err}"
            if rank0 and touched:
                _write_error_log(run_dir, traceback.format_exc())
            log.exception("run failed")
    finally:
        if summary["status"] != "completed" and tracker._tracker is not None:
            summary["energy"] = tracker.stop()
    summary["time_s"] = {**times, "total": time.perf_counter() - start}
    if startup is not None:
        summary["time_s"]["startup"] = startup
    if ctx is not None and ctx.record.before["train_s"]:
        summary["time_s"]["train_before_resume"] = ctx.record.before["train_s"]
    summary["peak_mem_mb"] = peak_memory_mb(accelerator)
    summary["env"] = environment(device_name(accelerator), original_cwd, load_at_start)
    summary["hardware"] = results.hardware(cfg, ctx, accelerator)
    if rank0 and touched:
        _write_records(cfg, run_dir, summary)
        # Trackers (MLflow, W&B) get summary.json as an artifact and close their run.
        finish_loggers(ctx.built_loggers if ctx is not None else None, run_dir / "summary.json",
                       cfg)
    return summary


def _record_interrupted(summary: dict[str, Any], signum: int, run_dir: Path,
                        overrides: list[str], cfg: DictConfig) -> None:
    """The summary of a run stopped by ``signum``: its sentence, checkpoint, resume command."""
    summary["status"], summary["signal"] = "interrupted", signal.Signals(signum).name
    summary["error"], ckpt, summary["resume_command"] = interrupted_message(
        signum, run_dir, overrides, cfg.trainer.get("max_epochs"))
    summary["checkpoint"] = ckpt["path"] if ckpt else None


def _write_error_log(run_dir: Path, text: str) -> None:
    try:
        write_text_atomic(run_dir / "error.log", text)
    except OSError as err:
        log.warning("could not write error.log: %s", err)


def _requeue_job(cfg: DictConfig) -> str | None:
    """The SLURM job to requeue on SIGTERM when ``hardware.requeue=true`` asks for it."""
    asked = cfg.hardware.get("requeue", False)
    if not isinstance(asked, bool):
        raise EffbenchError(f"hardware.requeue={asked} is not true or false; use "
                            "hardware.requeue=true to requeue a SLURM job stopped by SIGTERM.")
    return slurm_job_id() if asked else None


def _write_running(run_dir: Path, summary: dict[str, Any]) -> bool:
    """The `running` summary (atomic): replaced when the run ends, left if it is killed."""
    try:
        write_json_atomic(run_dir / "summary.json", {**summary, "status": "running"})
        return True
    except OSError as err:
        log.warning("could not write the running summary: %s", err.strerror or err)
        return False


def _write_records(cfg: DictConfig, run_dir: Path, summary: dict[str, Any]) -> None:
    try:
        write_json_atomic(run_dir / "summary.json", summary)
        if _resolvable(cfg):
            write_text_atomic(run_dir / "resolved_config.yaml",
                              OmegaConf.to_yaml(cfg, resolve=True))
    except OSError as err:
        summary["status"], summary["error"] = "failed", (
            f"cannot write the run's records in {run_dir} ({err.strerror or err}); choose a "
            "writable folder with hydra.run.dir=… (or hydra.sweep.dir=…).")


def _resolvable(cfg: DictConfig) -> bool:
    try:
        OmegaConf.to_container(cfg, resolve=True)
        return True
    except Exception:  # noqa: BLE001
        return False


def run_overrides(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """One job from command-line style overrides, composed as the CLI would, in this process
    (benchmarks, notebooks, tests)."""
    from hydra import compose, initialize_config_dir

    from effbench.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    return run(cfg, run_dir, choices, list(overrides))
