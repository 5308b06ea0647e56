"""Find and read ``summary.json`` files into one pandas row per run (completed and failed)."""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

import pandas as pd

from effbench.compare.keys import CHOICE_KEYS, canon, config_of, train_time  # noqa: F401
from effbench.errors import EffbenchError

GLOB_CHARS = set("*?[")


def find_summaries(paths: list[str]) -> list[Path]:
    """Every ``summary.json`` below the given run dirs, sweep dirs, files or glob patterns."""
    found: dict[Path, None] = {}
    for arg in paths:
        for path in _expand(arg):
            files = [path] if path.is_file() else sorted(path.rglob("summary.json"))
            for f in files:
                found.setdefault(f.resolve(), None)
    if not found:
        raise EffbenchError(f"no summary.json found under {' '.join(paths)}; pass run or sweep "
                            "directories such as outputs/multirun/<date>.")
    return list(found)


def _expand(arg: str) -> list[Path]:
    path = Path(arg)
    if path.exists():
        return [path]
    if GLOB_CHARS & set(arg):
        return [Path(p) for p in sorted(glob.glob(arg, recursive=True))]
    raise EffbenchError(f"path {arg} does not exist; pass a run or sweep directory such as "
                        "outputs/multirun/<date>.")


def numbers_of(summary: dict[str, Any]) -> dict[str, float]:
    """Flat numbers of a run (``metrics``, ``best_val``, ``time_s``, ``energy``, ``model``)."""
    out: dict[str, float] = {}
    for section in ("metrics", "best_val", "time_s", "energy", "model"):
        for key, value in (summary.get(section) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                name = key if section in ("metrics", "best_val") else f"{section}.{key}"
                out[name] = float(value)
    out.pop("epoch", None)
    out["train_s"] = train_time(summary.get("time_s") or {})
    out["epochs"] = summary.get("epochs")
    out["throughput_img_s"] = summary.get("throughput_img_s")
    return {k: v for k, v in out.items() if v is not None}


def read_summary(path: Path) -> dict[str, Any]:
    """A summary, or a failed stand-in when the file cannot be read (never silently dropped)."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {"status": "failed", "error": f"unreadable summary.json: {err}",
                "run_dir": str(path.parent), "choices": {}, "overrides": []}
    summary.setdefault("run_dir", str(path.parent))
    return summary


def load_runs(paths: list[str]) -> pd.DataFrame:
    """One row per run: ``run_dir``, ``status``, ``error``, ``task``, config keys, then numbers.

    ``attrs["config_keys"]`` lists the config columns (group choices, overrides, ``seed``).
    """
    rows, keys = [], {}
    for path in find_summaries(paths):
        summary = read_summary(path)
        config = config_of(summary)
        keys.update(dict.fromkeys(config))
        rows.append({"run_dir": str(path.parent), "status": summary.get("status", "failed"),
                     "error": summary.get("error"),
                     "task": (summary.get("data") or {}).get("task"),
                     **config, **numbers_of(summary)})
    runs = pd.DataFrame(rows)
    # A key that one run overrides and another leaves alone: the other ran with the default.
    config_keys = list(keys)
    runs[config_keys] = runs[config_keys].fillna("default")
    runs.attrs["config_keys"] = config_keys
    return runs
