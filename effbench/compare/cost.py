"""What a cache-hit job is charged for the features it reused (a technique's feature cache).

A job that loads its BN statistics and features from a cache records 0 s of BN adaptation and
extraction; it records instead what building those entries cost and who built them, in the
``cache`` record of its technique's facts (``summary.strategy.<technique>.cache``: ``hit``,
``built_by``, ``built_s`` and ``spared_s`` per phase, ``built_kwh`` / ``built_co2_kg``), whichever
technique that is. Two honest views of its cost, both labelled:

- **per run** (default): every job pays for the features it used, as if it had built them — the
  cost of producing one result, which is what a study of reused features compares, so a warm
  re-run reports the saving of the cold run;
- **amortised** (``effbench-compare --amortize``): each build is shared equally by the jobs in the
  comparison that used its entry (the builder included when it is there) — what a sweep or an
  HPO search over one cache costs per job.

Energy: the builder's build energy is its BN-adaptation + extraction phases
(``energy.phases_kwh``), or where those were not recorded an estimate from its mean power over the
tracked part of its job (kWh × build seconds / tracked seconds); charged energy figures are marked
estimated (a share of a measurement made in another job).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

PHASES = ("bn_adapt", "extract")
ENTRY, HIT, BUILT_BY = "cache.entry", "cache.hit", "cache.built_by"
BUILT_KWH, BUILT_CO2 = "cache.built_kwh", "cache.built_co2_kg"
TIME, TOTAL, KWH, ESTIMATED = "train_s", "time_s.total", "energy.kwh", "energy_estimated"
# The whole job's CO₂ and that of the phases of train_s (effbench.compare.keys.train_co2).
CO2, CO2_COLUMNS = "energy.co2_kg", ("energy.co2_kg", "train_co2_kg")


def _built(phase: str) -> str:
    return f"cache.built_s.{phase}"


def _spared(phase: str) -> str:
    return f"cache.spared_s.{phase}"


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def tracked_energy(summary: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
    """``(kWh, kg CO₂, seconds the tracker ran)`` of a job: the tracker starts after set-up."""
    energy, times = summary.get("energy") or {}, summary.get("time_s") or {}
    total = _number(times.get("total"))
    tracked = total - (_number(times.get("setup")) or 0.0) if total is not None else None
    return _number(energy.get("kwh")), _number(energy.get("co2_kg")), tracked


def build_energy(built_by: str | None, built_s: float) -> tuple[float | None, float | None]:
    """Estimated ``(kWh, kg CO₂)`` of ``built_s`` seconds of the builder's job, from its
    ``summary.json`` (its mean power); ``(None, None)`` when that summary or its energy is
    not there (e.g. the builder still runs, or ran without tracking)."""
    if not built_by:
        return None, None
    try:
        summary = json.loads((Path(built_by) / "summary.json").read_text())
    except (OSError, ValueError):
        return None, None
    summary = summary if isinstance(summary, dict) else {}
    phases = (summary.get("energy") or {}).get("phases_kwh")
    if isinstance(phases, dict) and all(_number(phases.get(p)) is not None for p in PHASES):
        co2s = (summary.get("energy") or {}).get("phases_co2_kg") or {}
        co2 = [_number(co2s.get(p)) for p in PHASES]
        return (sum(float(phases[p]) for p in PHASES),
                None if None in co2 else sum(c for c in co2 if c is not None))
    kwh, co2, tracked = tracked_energy(summary)
    if kwh is None or not tracked:
        return None, None
    share = min(1.0, built_s / tracked)
    return kwh * share, (co2 * share if co2 is not None else None)


def reused_work(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The ``cache`` record (with ``built_s``) of whichever technique's facts hold one, so every
    technique that reuses cached work is charged the same way; None when none does."""
    for facts in (summary.get("strategy") or {}).values():
        cache = facts.get("cache") if isinstance(facts, dict) else None
        if isinstance(cache, dict) and "built_s" in cache:
            return cache
    return None


def cache_columns(summary: dict[str, Any]) -> dict[str, Any]:
    """The cache-cost columns of one run's row (empty for runs that used no feature cache)."""
    cache = reused_work(summary)
    if cache is None:
        return {}
    row: dict[str, Any] = {ENTRY: (cache.get("keys") or {}).get("train"),
                           HIT: bool(cache.get("hit")), BUILT_BY: cache.get("built_by"),
                           BUILT_KWH: _number(cache.get("built_kwh")),
                           BUILT_CO2: _number(cache.get("built_co2_kg"))}
    for phase in PHASES:
        row[_built(phase)] = _number((cache.get("built_s") or {}).get(phase)) or 0.0
        row[_spared(phase)] = _number((cache.get("spared_s") or {}).get(phase)) or 0.0
    return row


def charge(runs: pd.DataFrame, amortize: bool = False) -> pd.DataFrame:
    """``runs`` with the cache cost charged (per run, or ``amortize``d over the jobs that used
    each entry) in ``train_s``, ``time_s.total``, the phase times and energy; ``attrs["cost_view"]``
    says which view the numbers are in (the table prints it)."""
    out = runs.copy()
    out.attrs = dict(runs.attrs)
    if ENTRY not in out.columns or not out[ENTRY].notna().any():
        return out
    used = out[ENTRY].notna() & (out["status"] == "completed")
    users = out[used].groupby(ENTRY)[ENTRY].transform("size") if amortize else None
    kwh_of = _builder_energy(out)
    unknown = 0
    for i in out.index[used]:
        row = out.loc[i]
        built = {p: float(row[_built(p)]) for p in PHASES}
        spared = {p: float(row[_spared(p)]) for p in PHASES}
        whole = sum(built.values())
        if amortize:  # pay 1/N of the build instead of what this job itself built
            n = float(users[i])
            delta = {p: built[p] / n - (built[p] - spared[p]) for p in PHASES}
        else:  # pay for what it loaded as if it had built it
            delta = spared
        shift = sum(delta.values())
        if not shift:
            continue
        for p in PHASES:
            if f"time_s.{p}" in out.columns:
                out.loc[i, f"time_s.{p}"] = row.get(f"time_s.{p}", 0.0) + delta[p]
        out.loc[i, TIME] = row[TIME] + shift
        if TOTAL in out.columns:
            out.loc[i, TOTAL] = row[TOTAL] + shift
        if _number(row.get(KWH)) is None:
            continue  # this job has no energy figure to charge
        build_kwh, build_co2 = _entry_energy(row, kwh_of, whole)
        if build_kwh is None:
            unknown += 1
            continue
        out.loc[i, KWH] = row[KWH] + build_kwh * shift / whole
        for col in CO2_COLUMNS:
            if col in out.columns and build_co2 is not None and _number(row.get(col)) is not None:
                out.loc[i, col] = row[col] + build_co2 * shift / whole
        out.loc[i, ESTIMATED] = True  # the build's share is an estimate from mean power
    hits = int((out.loc[used, HIT] == True).sum())  # noqa: E712 - a pandas mask
    out.attrs["cost_view"] = _note(amortize, hits, unknown)
    return out


def _builder_energy(runs: pd.DataFrame) -> dict[str, tuple[float | None, float | None, float]]:
    """Per builder run dir in the comparison: its (kWh, kg CO₂, tracked s), a fallback for hit
    jobs whose builder had not written its summary when they ran."""
    out = {}
    for _, row in runs.iterrows():
        tracked = (_number(row.get(TOTAL)) or 0.0) - (_number(row.get("time_s.setup")) or 0.0)
        if tracked > 0:
            out[str(row["run_dir"])] = (_number(row.get(KWH)), _number(row.get(CO2)), tracked)
    return out


def _entry_energy(row: pd.Series, kwh_of: dict, whole: float) -> tuple[float | None, float | None]:
    if not whole:
        return None, None
    kwh, co2 = _number(row.get(BUILT_KWH)), _number(row.get(BUILT_CO2))
    if kwh is None and isinstance(row.get(BUILT_BY), str) and row[BUILT_BY] in kwh_of:
        b_kwh, b_co2, tracked = kwh_of[row[BUILT_BY]]
        share = min(1.0, whole / tracked)
        kwh = b_kwh * share if b_kwh is not None else None
        co2 = b_co2 * share if b_co2 is not None else None
    return kwh, co2


def _note(amortize: bool, hits: int, unknown: int) -> str:
    if amortize:
        text = ("cost view: amortised (--amortize): each feature-cache build is shared equally "
                "by the jobs here that used it")
    else:
        text = (f"cost view: per run: {hits} cache-hit job{'s' * (hits != 1)} charged the "
                "feature build they reused, as if each had built it (--amortize shares each "
                "build among the jobs that used it)")
    if unknown:
        text += (f"; the energy of {unknown} job{'s' * (unknown != 1)} is not charged: the "
                 "builder's energy is unknown")
    return text
