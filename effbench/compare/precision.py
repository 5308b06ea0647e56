"""The precision and hardware each compared row ran on, and the deltas that mix them.

A time or CO₂ delta between a 16-mixed run on four GPUs and an fp32 run on one measures the
precision and the hardware as much as the technique. Each row of the table shows its precision;
a delta whose two rows differ in precision, or ran on different hardware, is marked (``MARK``)
and named in one warning line — unless the keys that tell the two rows apart are that very
precision or hardware (``hardware=p100x4_ddp`` vs ``hardware=auto`` is a hardware comparison,
but if the two presets also train in different precisions, that is flagged).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

PRECISION, DEVICE, MIXED = "precision", "device", "mixed_setup"
MARK = "†"
# Lightning's spellings of one precision (trainer.precision accepts all of them).
ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true",
           "16-true": "16-true", "bf16-true": "bf16-true"}
# Config keys whose difference makes a precision / hardware difference the point of the delta.
PRECISION_KEYS = ("hardware.precision", "trainer.precision")
HARDWARE_KEYS = ("hardware", "trainer.devices", "trainer.num_nodes", "hardware.devices")


def facts(summary: dict[str, Any]) -> dict[str, str | None]:
    """``precision`` that ran (a technique's requirement applied) and ``device``: world size ×
    device name, e.g. ``4× Tesla P100-SXM2-16GB``."""
    hw, env = summary.get("hardware"), summary.get("env")
    hw, env = (hw if isinstance(hw, dict) else {}), (env if isinstance(env, dict) else {})
    precision = hw.get("precision")
    device = env.get("device") or hw.get("accelerator")
    return {PRECISION: ALIASES.get(str(precision), str(precision)) if precision else None,
            DEVICE: f"{hw.get('world_size') or 1}× {device}" if device else None}


def _joined(values: pd.Series) -> str:
    """One value, or every value of the row's runs (seeds that ran on different set-ups)."""
    return " / ".join(sorted({str(v) for v in values.dropna()})) or "?"


def with_setup(runs: pd.DataFrame, table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Adds ``precision`` and ``device`` per row and, where the table has deltas (``base_row``:
    the index of the row each one is compared with), ``mixed_setup``: what differs, or ''."""
    done = runs[runs["status"] == "completed"]
    cols: dict[str, list[str]] = {PRECISION: [], DEVICE: []}
    for _, row in table.iterrows():
        mine = done[(done[keys] == row[keys]).all(axis=1)] if keys else done
        for col in cols:
            cols[col].append(_joined(mine[col]) if col in mine else "?")
    table = table.assign(**cols)
    if "base_row" not in table:
        return table
    mixed = []
    for _, row in table.iterrows():
        base = row["base_row"]
        mixed.append("" if base is None or pd.isna(base)
                     else _difference(row, table.loc[base], keys))
    return table.assign(**{MIXED: mixed})


def _difference(row: pd.Series, base: pd.Series, keys: list[str]) -> str:
    """``precision 16-mixed vs 32-true`` / ``hardware …``, unless a key that tells them apart is
    that precision or hardware (then the difference is what is being compared)."""
    differing = [k for k in keys if str(row[k]) != str(base[k])]
    out = []
    if row[PRECISION] != base[PRECISION] and not set(differing) & set(PRECISION_KEYS):
        out.append(f"precision {row[PRECISION]} vs {base[PRECISION]}")
    if row[DEVICE] != base[DEVICE] and not set(differing) & set(HARDWARE_KEYS):
        out.append(f"hardware {row[DEVICE]} vs {base[DEVICE]}")
    return ", ".join(out)


def mark(text: str, row: pd.Series) -> str:
    """A delta cell with the marker when its two rows ran on different set-ups."""
    return f"{text}{MARK}" if text and row.get(MIXED) else text


def warning(table: pd.DataFrame, name: Any) -> str | None:
    """One line naming the deltas whose rows differ in precision or hardware (None if none).
    ``name(row)`` labels a row."""
    if MIXED not in table:
        return None
    bad = table[table[MIXED].astype(bool)]
    if bad.empty:
        return None
    first = bad.iloc[0]
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    verb = "deltas compare" if len(bad) > 1 else "delta compares"
    return (f"{MARK} {len(bad)} {verb} rows that ran in a different precision or on different "
            f"hardware, e.g. {name(first)} vs "
            f"{first['compared_with']}: {first[MIXED]}{more}; its time and CO₂ measure that too "
            "— run both sides with one hardware.precision=… on one machine.")
