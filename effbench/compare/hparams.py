"""TensorBoard HParams: each run logs its configuration and final metrics, so TensorBoard's
HParams tab lines up the same runs that ``effbench-compare`` tables."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from omegaconf import OmegaConf
from pytorch_lightning.loggers import TensorBoardLogger

from effbench.compare.keys import train_time
from effbench.config import techniques

log = logging.getLogger(__name__)
PREFIX = "final/"  # distinct tags: the per-epoch curves keep their own names and steps


# Config keys that are places on this machine or console settings, not hyper-parameters.
NOT_HPARAMS = ("cache_dir", "data_dir", "resume", "tracking", "logger", "hydra",
               "trainer.enable_progress_bar", "trainer.enable_model_summary")
PATH_LEAVES = ("root", "path", "dir", "file")


def _is_hparam(key: str) -> bool:
    parts = key.split(".")
    if any(key == k or key.startswith(k + ".") for k in NOT_HPARAMS):
        return False
    leaf = parts[-1]
    return not (any(p.startswith("_") for p in parts) or leaf in PATH_LEAVES
                or leaf.endswith(("_dir", "_path", "_file", "_root")))


def flat_config(cfg: Any) -> dict[str, Any]:
    """The job's config as ``a.b.c`` keys (resolved where possible), without ``_target_`` keys;
    lists and dicts as JSON text."""
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an unresolvable interpolation: record it as written
        tree = OmegaConf.to_container(cfg, resolve=False)
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key != "_target_":
                    walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            out[prefix] = node if isinstance(node, (int, float, str, bool)) or node is None \
                else json.dumps(node, default=str)

    walk(tree, "")
    return out


def config_hparams(cfg: Any) -> dict[str, Any]:
    """The job's own hyper-parameters as flat ``a.b`` keys, every one of them whether overridden
    or a default (lr, optimizer, batch size, weight decay, schedule, the strategy's settings…);
    no paths or console settings. Known before the run starts (trackers get them first)."""
    params = {k: v for k, v in flat_config(cfg).items() if _is_hparam(k)}
    optimizer = OmegaConf.select(cfg, "optim.optimizer._target_", default=None)
    if optimizer:  # torch.optim.Adam → Adam
        params["optim.optimizer.class"] = str(optimizer).rsplit(".", 1)[-1]
    # a+b for strategy=[a,b], as summary.choices and the run dir name it
    params["strategy"] = techniques(cfg.get("strategy"))
    return {k: ("null" if v is None else v) for k, v in params.items()}


def effective_hparams(cfg: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """``config_hparams`` + what only the run knows: the preset chosen (``experiment``) and the
    values that actually ran under ``effective.*`` (lr after hardware.lr_scaling, precision,
    devices and world size of the hardware plan, the global batch)."""
    params = config_hparams(cfg)
    if (summary.get("choices") or {}).get("experiment") is not None:
        params["experiment"] = str(summary["choices"]["experiment"])
    plan = summary.get("hardware") or {}
    world = plan.get("world_size") or 1
    lr = OmegaConf.select(cfg, "optim.optimizer.lr", default=None)
    linear = OmegaConf.select(cfg, "hardware.lr_scaling", default=None) == "linear"
    if isinstance(lr, (int, float)):
        params["effective.lr"] = float(lr) * (float(world) if linear else 1.0)
    batch = OmegaConf.select(cfg, "dataset.batch_size", default=None)
    accumulate = OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=None) or 1
    if isinstance(batch, int):
        params["effective.batch_size"] = batch * int(world) * int(accumulate)
    for key in ("accelerator", "devices", "strategy", "precision", "num_nodes", "world_size",
                "cpu_threads"):
        if plan.get(key) is not None:
            params[f"effective.{key}"] = _typed(str(plan[key]))
    return {k: ("null" if v is None else v) for k, v in params.items()}


hparams_of = effective_hparams  # TensorBoard's HParams tab and the trackers get the same set


def _typed(value: str) -> Any:
    """Numbers as numbers (TensorBoard sorts and plots them), the rest as text."""
    if value in ("true", "false"):
        return value == "true"
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def _numbers(tree: Any, prefix: str, skip: frozenset[str] = frozenset()) -> dict[str, float]:
    """Every finite number (and bool, as 0/1) under ``tree`` as ``prefix/a/b``; lists and text
    are left out (per-layer lists, paths)."""
    if isinstance(tree, bool):
        return {prefix: float(tree)}
    if isinstance(tree, (int, float)):
        return {prefix: float(tree)} if math.isfinite(tree) else {}
    if not isinstance(tree, dict):
        return {}
    out: dict[str, float] = {}
    for key, value in tree.items():
        if str(key) not in skip:
            out.update(_numbers(value, f"{prefix}/{key}"))
    return out


def final_metrics(summary: dict[str, Any], cfg: Any = None) -> dict[str, float]:
    """What a run produced, as ``final/…``: test and best-val metrics, training time (and each
    phase's), throughput, peak memory, energy and CO₂, parameters and sizes (``model/…``, incl.
    the compressed / saved sizes), and each technique's own facts (``strategy/<name>/…``, its
    settings left out: they are hyper-parameters)."""
    model = summary.get("model") or {}
    energy = summary.get("energy") or {}
    values = {**summary.get("metrics", {}),
              **{k: v for k, v in summary.get("best_val", {}).items() if k != "epoch"},
              "train_s": train_time(summary.get("time_s") or {}),
              "co2_kg": energy.get("co2_kg"), "kwh": energy.get("kwh"),
              "params_trainable": model.get("params_trainable"),
              "size_bytes": model.get("size_bytes"),
              "epochs": summary.get("epochs"),
              "best_epoch": (summary.get("best_val") or {}).get("epoch"),
              "throughput_img_s": summary.get("throughput_img_s"),
              "peak_mem_mb": summary.get("peak_mem_mb")}
    out = {PREFIX + k: float(v) for k, v in values.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    out.update(_numbers(summary.get("time_s") or {}, PREFIX + "time_s"))
    out.update(_numbers({k: v for k, v in energy.items() if k not in ("kwh", "co2_kg")},
                        PREFIX + "energy"))
    out.update(_numbers(model, PREFIX + "model"))
    settings = cfg.get("strategy") if cfg is not None and hasattr(cfg, "get") else None
    for name, facts in (summary.get("strategy") or {}).items():
        own = settings.get(name) if settings is not None else None
        skip = frozenset(str(k) for k in (own.keys() if hasattr(own, "keys") else ()))
        out.update(_numbers(facts, f"{PREFIX}strategy/{name}", skip | {"name"}))
    return out


def log_hparams(loggers: list, cfg: Any, summary: dict[str, Any]) -> None:
    """Writes the HParams summary into the run's TensorBoard logger (rank 0 only).

    A completed run must not turn into a failed one because TensorBoard could not be written,
    so a failure here is a warning.
    """
    tb = next((lg for lg in loggers if isinstance(lg, TensorBoardLogger)), None)
    if tb is None:
        return
    try:
        tb.log_hyperparams(hparams_of(cfg, summary), metrics=final_metrics(summary, cfg))
        tb.experiment.flush()
    except Exception as err:  # noqa: BLE001 - see docstring
        log.warning("could not log hyper-parameters to TensorBoard: %s", err)
