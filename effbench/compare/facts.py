"""Technique facts read from one summary: the model size that matters for the technique, and
whether the energy figures were measured or estimated (no pandas: plain dicts in, values out)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

DENSE_SIZE = "size_bytes"
# The size that matters, in order of preference; the first key found wins, else the dense size.
# A technique that combines others (sparse and quantized, …) should write size_bytes_effective.
EFFECTIVE_SIZE_KEYS = (
    "size_bytes_effective",   # a technique's own statement of its deployable size
    "size_bytes_int8",        # a technique that quantizes: the converted int8 model
    "size_bytes_compressed",  # one that zeroes weights: zeros only save space once compressed
)
# energy.mode values that are estimates rather than readings (when energy.estimated is absent).
ESTIMATED_MODES = ("tdp_estimate", "model", "constant")


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def fact_sections(summary: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Where techniques put their facts: ``model`` (run.py moves a strategy's ``model`` there),
    ``strategy`` (flat), and ``strategy.<technique>`` (one dict per technique, maybe with its own
    ``model``), so both the flat and the nested layout are read."""
    candidates: list[tuple[str, Any]] = [("model", summary.get("model"))]
    strategy = summary.get("strategy")
    if isinstance(strategy, dict):
        candidates += [("strategy", strategy), ("strategy.model", strategy.get("model"))]
        for name, value in strategy.items():
            if name != "model" and isinstance(value, dict):
                candidates += [(f"strategy.{name}", value),
                               (f"strategy.{name}.model", value.get("model"))]
    for where, section in candidates:
        if isinstance(section, dict):
            yield where, section


def effective_size(summary: dict[str, Any]) -> tuple[float | None, str]:
    """``(bytes, source)``: the first of ``EFFECTIVE_SIZE_KEYS`` that the summary records, else
    the dense ``model.size_bytes``; ``source`` is where it came from (``model.size_bytes_int8``)."""
    sections = list(fact_sections(summary))
    for key in EFFECTIVE_SIZE_KEYS:
        for where, section in sections:
            if (value := _number(section.get(key))) is not None:
                return value, f"{where}.{key}"
    return _number((summary.get("model") or {}).get(DENSE_SIZE)), f"model.{DENSE_SIZE}"


def energy_mode(summary: dict[str, Any]) -> str | None:
    """``cpu=tdp_estimate, gpu=nvml, ram=model`` from ``energy.mode``; None for older summaries."""
    mode = (summary.get("energy") or {}).get("mode")
    if not isinstance(mode, dict):
        return None
    return ", ".join(f"{k}={v}" for k, v in mode.items() if v is not None) or None


def energy_estimated(summary: dict[str, Any]) -> bool | None:
    """``energy.estimated``, else derived from ``energy.mode``; None when neither is recorded
    (older summaries: no marker rather than a guess)."""
    energy = summary.get("energy") or {}
    if isinstance(energy.get("estimated"), bool):
        return energy["estimated"]
    mode = energy.get("mode")
    if isinstance(mode, dict):
        return any(str(v).endswith("estimate") or v in ESTIMATED_MODES for v in mode.values()
                   if v is not None)
    return None
