"""A run's config keys and training time from its summary (no pandas: every run imports this)."""

from __future__ import annotations

import math
from typing import Any

# Config groups recorded in ``summary["choices"]`` (their ``group=option`` overrides say the same).
CHOICE_KEYS = ("strategy", "backbone", "dataset", "hardware", "experiment")
# Phases that are not training: the study's "training time" leaves data loading and testing out.
# Phases that produce the trained model: training itself, and for a technique that trains on a
# backbone's cached features the BN adaptation and feature extraction (the studies count them).
# Conversion, export, int8 evaluation, latency timing, compression and testing have their own
# keys and are not training.
TRAIN_PHASES = ("train", "bn_adapt", "extract")


def canon(value: Any) -> str:
    """One spelling per value, so ``1e-3``, ``0.001`` and ``1.0e-03`` group (and match) together."""
    text = str(value).strip()
    if text.lower() in ("true", "false", "null", "none"):
        return {"none": "null"}.get(text.lower(), text.lower())
    try:
        return str(int(text))
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    return repr(number) if math.isfinite(number) else text


def config_of(summary: dict[str, Any]) -> dict[str, str]:
    """The run's config keys: the group choices, the seed and every ``key=value`` override."""
    choices = summary.get("choices", {})
    config = {k: canon(choices[k]) for k in CHOICE_KEYS if choices.get(k) is not None}
    for item in summary.get("overrides", []):
        key, sep, value = item.partition("=")
        key = key.lstrip("+~")
        if not sep or key.startswith("hydra.") or key in CHOICE_KEYS or key == "seed":
            continue
        config[key] = canon(value)
    config["seed"] = canon(choices.get("seed"))
    return config


def train_time(time_s: dict[str, float]) -> float | None:
    """Time spent producing the model: ``train`` (+ BN adaptation and feature extraction, as a
    study of cached features counts them); never conversion, latency timing or evaluation."""
    phases = [time_s[k] for k in TRAIN_PHASES if time_s.get(k) is not None]
    return sum(phases) if phases else time_s.get("total")


def train_co2(energy: dict[str, Any]) -> float | None:
    """CO₂ of the same phases as ``train_time`` (``energy.phases_co2_kg``), so that Δ CO₂ and
    Δ time measure one thing; the whole job's (``energy.co2_kg``) for summaries without phases."""
    phases = energy.get("phases_co2_kg")
    if not isinstance(phases, dict) or not phases:
        return energy.get("co2_kg")
    return sum(float(phases[k]) for k in TRAIN_PHASES if phases.get(k) is not None)
