"""TensorBoard HParams: each run logs its configuration and final metrics, so TensorBoard's
HParams tab lines up the same runs that ``effbench-compare`` tables."""

from __future__ import annotations

import logging
import math
from typing import Any

from omegaconf import OmegaConf
from pytorch_lightning.loggers import TensorBoardLogger

from effbench.compare.keys import config_of, train_time

log = logging.getLogger(__name__)
PREFIX = "final/"  # distinct tags: the per-epoch curves keep their own names and steps


def hparams_of(cfg: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """Group choices, seed, overrides and the strategy's own settings, as flat ``a.b`` keys."""
    params: dict[str, Any] = {k: _typed(v) for k, v in config_of(summary).items()}
    strategy = OmegaConf.to_container(cfg.strategy, resolve=True) if "strategy" in cfg else {}
    params.update({k: v for k, v in _flatten(strategy, "strategy").items()
                   if not k.endswith("_target_")})
    params["trainer.max_epochs"] = cfg.trainer.max_epochs if "trainer" in cfg else None
    return {k: ("null" if v is None else v) for k, v in params.items()}


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


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree if isinstance(tree, (int, float, str, bool)) or tree is None
                else str(tree)}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}"))
    return out


def final_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Test and best-val metrics, training time, CO₂, trainable parameters and size."""
    values = {**summary.get("metrics", {}),
              **{k: v for k, v in summary.get("best_val", {}).items() if k != "epoch"},
              "train_s": train_time(summary.get("time_s") or {}),
              "co2_kg": (summary.get("energy") or {}).get("co2_kg"),
              "params_trainable": (summary.get("model") or {}).get("params_trainable"),
              "size_bytes": (summary.get("model") or {}).get("size_bytes"),
              "epochs": summary.get("epochs")}
    return {PREFIX + k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and math.isfinite(v)}


def log_hparams(loggers: list, cfg: Any, summary: dict[str, Any]) -> None:
    """Writes the HParams summary into the run's TensorBoard logger (rank 0 only).

    A completed run must not turn into a failed one because TensorBoard could not be written,
    so a failure here is a warning.
    """
    tb = next((lg for lg in loggers if isinstance(lg, TensorBoardLogger)), None)
    if tb is None:
        return
    try:
        tb.log_hyperparams(hparams_of(cfg, summary), metrics=final_metrics(summary))
        tb.experiment.flush()
    except Exception as err:  # noqa: BLE001 - see docstring
        log.warning("could not log hyper-parameters to TensorBoard: %s", err)
