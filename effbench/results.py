"""The summary of a run (``summary.json``), assembled from what the run and its phases returned:
the empty record a run starts from, the results filled in after the phases, the energy of the
whole run, the hardware that ran and the objective a sweeper reads. effbench/summary.py holds
its schema and how it is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from effbench.config import techniques as techniques_label
from effbench.context import RunContext, RunRecord
from effbench.summary import SCHEMA_VERSION, model_stats
from effbench.task import is_multilabel
from effbench.tracking import add_to_phase


def new_summary(cfg: DictConfig, run_dir: Path, choices: dict[str, str],
                overrides: list[str]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION, "status": "failed", "error": None,
        "run_dir": str(run_dir),
        "choices": {**{k: choices.get(k) for k in ("backbone", "dataset", "hardware", "optim")},
                    "strategy": techniques_label(cfg.get("strategy")),
                    "techniques": list(cfg.get("strategy") or []),
                    "seed": cfg.get("seed"), "experiment": choices.get("experiment")},
        "overrides": list(overrides), "metrics": {}, "per_class": {}, "best_val": {},
        "objective": {"metric": cfg.get("objective"), "value": None},
        "epochs": None, "time_s": {}, "throughput_img_s": None,
        "energy": {"kwh": None, "co2_kg": None}, "peak_mem_mb": None,
        "model": {"params_total": None, "params_trainable": None, "size_bytes": None},
        "data": {}, "hardware": {}, "env": {}, "strategy": {}, "resumed_from": None,
        "headline": None,
    }


def objective(cfg: DictConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """The value a sweeper optimises: from ``metrics`` (e.g. val/acc_max) or the best-val-loss
    epoch (``best_val``, e.g. val/acc). validate() has already refused a test metric unless the
    user asked for it."""
    metric = str(cfg.get("objective") or default_objective(summary["data"].get("task")))
    value = summary["metrics"].get(metric, summary["best_val"].get(metric))
    source = "metrics" if metric in summary["metrics"] else "best_val"
    return {"metric": metric, "value": value, "source": source if value is not None else None}


def default_objective(task: str | None) -> str:
    """The headline of the task: macro AUROC for multilabel data (accuracy there is per label at
    0.5, which the multilabel studies never report), validation accuracy otherwise."""
    return "val/auroc_macro" if is_multilabel(task) else "val/acc"


def whole_run_energy(energy: dict[str, Any], record: RunRecord) -> dict[str, Any]:
    """After a resume, the interrupted part's energy (saved in the checkpoint) is added."""
    before = record.before.get("kwh") or 0.0
    if before and energy.get("kwh") is not None:
        share = energy["co2_kg"] / energy["kwh"] if energy["kwh"] else 0.0
        energy = {**add_to_phase(energy, "train", before, before * share),
                  "kwh": energy["kwh"] + before,
                  "co2_kg": energy["co2_kg"] + before * share, "kwh_before_resume": before}
    return energy


def with_batched_share(energy: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    """A head trained batched with its sweep group (hydra/launcher=batched_heads) was trained
    outside this job's tracker: its share of the group's measured energy joins the job's own."""
    group = next((f["batched"] for f in facts.values() if isinstance(f, dict)
                  and isinstance(f.get("batched"), dict)), None)
    if not group or group.get("energy_kwh_share") is None or energy.get("kwh") is None:
        return energy
    energy = add_to_phase(energy, "train", group["energy_kwh_share"],
                          group.get("co2_kg_share") or 0.0)
    return {**energy, "kwh": energy["kwh"] + group["energy_kwh_share"],
            "co2_kg": (energy.get("co2_kg") or 0.0) + (group.get("co2_kg_share") or 0.0),
            "kwh_batched_share": group["energy_kwh_share"]}


def hardware(cfg: DictConfig, ctx: RunContext | None, accelerator: str) -> dict[str, Any]:
    """What ran: the resolved plan (precision a strategy required included), not the request."""
    hw, t = cfg.hardware, cfg.trainer
    plan = ctx.trainer_args if ctx else {}
    return {"preset": hw.name, "accelerator": accelerator,
            "devices": str(plan.get("devices", t.devices)),
            "strategy": str(plan.get("strategy", t.strategy)),
            "precision": str(plan.get("precision", t.precision)),
            "num_nodes": int(t.get("num_nodes") or 1),
            "world_size": ctx.world_size if ctx else 1,
            "cpu_threads": torch.get_num_threads(),
            # hardware.compile as it ran: false, or the torch.compile mode
            "compile": (ctx.plan.compile_mode or False) if ctx else False,
            "specs": OmegaConf.to_container(hw.specs, resolve=True)}


def fill_results(summary: dict[str, Any], ctx: RunContext, model_facts: dict[str, Any]) -> None:
    sys_ = ctx.system
    summary["metrics"] = {**sys_.test_results.get("scalars", {}),
                          **val_max([*numeric(ctx.history_rows), *sys_.val_history])}
    summary["per_class"] = dict(sys_.test_results.get("per_class", {}))
    summary["best_val"] = best_val(sys_.best_val, numeric(ctx.history_rows))
    summary["epochs"] = ctx.epochs
    summary["data"] = {**ctx.datamodule.describe(),
                       "on_device": ctx.resident.facts if ctx.resident else {"on_device": False},
                       "preprocessing": ctx.datamodule.preprocessing.describe()}
    summary["model"] = {**model_stats(sys_), **model_facts}
    if ctx.record.before["train_s"] and "train" in ctx.times:
        ctx.times["train"] += ctx.record.before["train_s"]  # the whole run, both parts
    if ctx.resume:
        summary["resumed_at_epoch"] = ctx.resume["epoch"]
    train_time = ctx.times.get("train")
    images = ctx.record.total_images()
    summary["throughput_img_s"] = images / train_time if images and train_time else None


def best_val(best: dict[str, float], before: list[dict[str, float]]) -> dict[str, float]:
    """The lowest-val-loss epoch of the whole run: a resumed run also weighs the epochs before
    the interruption (from the CSV history)."""
    rows = [{k: v for k, v in r.items() if k.startswith("val/") or k == "epoch"}
            for r in before if "val/loss" in r]
    candidates = [*rows, *([dict(best)] if best else [])]
    if not candidates:
        return {}
    chosen = min(candidates, key=lambda r: r["val/loss"])
    return {**chosen, "epoch": int(chosen["epoch"])} if "epoch" in chosen else chosen


def numeric(rows: list[dict[str, str]]) -> list[dict[str, float]]:
    """CSV rows of the part before a resume, as numbers (empty cells dropped)."""
    out = []
    for row in rows:
        try:
            out.append({k: float(v) for k, v in row.items() if v not in ("", None)})
        except ValueError:
            continue
    return out


def val_max(history: list[dict[str, float]]) -> dict[str, float]:
    """The best validation accuracy (and macro AUROC) over epochs — the data-subsampling study's
    figure — next to the test metrics of the best-val-loss checkpoint."""
    out = {}
    for key in ("val/acc", "val/auroc_macro"):
        values = [row[key] for row in history if row.get(key) is not None]
        if values:
            out[f"{key}_max"] = max(values)
    return out


