"""Find and read ``summary.json`` files into one pandas row per run (completed and failed).

Summaries may come from anyone's run folders: only regular files of bounded size are read (a
link to ``/dev/zero`` or a named pipe is skipped, not read forever), each is parsed as JSON and
checked for the types compare relies on, and its strings are cleaned of control characters
(``compare.safe``) before any of them is printed or written. A file that fails is skipped with
one warning line naming it and why; it never stops the comparison."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import pandas as pd

from effbench.compare.cost import cache_columns
from effbench.compare.facts import effective_size, energy_estimated, energy_mode
from effbench.compare.keys import (  # noqa: F401
    CHOICE_KEYS,
    canon,
    config_of,
    train_co2,
    train_time,
)
from effbench.compare.precision import facts as setup_facts
from effbench.compare.safe import clean
from effbench.errors import EffbenchError
from effbench.received import RefusedFile, first_line, printable, read_json

GLOB_CHARS = set("*?[")
# The value of a config key that a run did not override (it ran with the config's default).
UNSET = "default"
EFFECTIVE_SIZE = "model.size_bytes_effective"  # the size that matters for the technique
# What compare reads from every summary, with the JSON type it must have.
REQUIRED: dict[str, type] = {"status": str, "choices": dict, "overrides": list}
# running: killed outright (or still going); interrupted: stopped by a signal, resumable. Both are
# listed as incomplete, never dropped.
STATUSES = ("completed", "failed", "diverged", "running", "interrupted")
INCOMPLETE = ("running", "interrupted")
# Sections compare reads as objects (null is fine: "not recorded").
SECTIONS = ("best_val", "time_s", "energy", "model", "data", "strategy")
SUMMARY_LIMIT = 16 << 20  # bytes; a summary is a few kB


def find_summaries(paths: list[str]) -> list[Path]:
    """Every ``summary.json`` below the given run dirs, sweep dirs, files or glob patterns."""
    found: dict[Path, Path] = {}
    for arg in paths:
        for path in _expand(arg):
            files = [path] if not path.is_dir() else sorted(path.rglob("summary.json"))
            for f in files:
                # One entry per file (two paths to it count once); named as found, so a link's
                # warning names the link in the run folder, not where it points.
                found.setdefault(f.resolve(), f.absolute())
    if not found:
        raise EffbenchError(f"no summary.json found under {' '.join(paths)}; pass run or sweep "
                            "directories such as outputs/multirun/<date>.")
    return list(found.values())


def _expand(arg: str) -> list[Path]:
    path = Path(arg)
    if path.exists():
        return [path]
    if GLOB_CHARS & set(arg):
        return [Path(p) for p in sorted(glob.glob(arg, recursive=True))]
    raise EffbenchError(f"path {arg} does not exist; pass a run or sweep directory such as "
                        "outputs/multirun/<date>.")


def numbers_of(summary: dict[str, Any]) -> dict[str, float]:
    """Flat numbers of a run (``metrics``, ``best_val``, ``time_s``, ``energy``, ``model``), and
    the effective size (see ``facts.EFFECTIVE_SIZE_KEYS``)."""
    out: dict[str, float] = {}
    for section in ("metrics", "best_val", "time_s", "energy", "model"):
        for key, value in (summary.get(section) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                name = key if section in ("metrics", "best_val") else f"{section}.{key}"
                out[name] = float(value)
    out.pop("epoch", None)
    out["train_s"] = train_time(summary.get("time_s") or {})
    out["train_co2_kg"] = train_co2(summary.get("energy") or {})  # the phases of train_s
    out["epochs"] = summary.get("epochs")
    out["throughput_img_s"] = summary.get("throughput_img_s")
    out[EFFECTIVE_SIZE] = effective_size(summary)[0]
    return {k: v for k, v in out.items() if v is not None}


def facts_of(summary: dict[str, Any]) -> dict[str, Any]:
    """Non-numeric facts per run: where the effective size came from, how energy was measured."""
    return {"size_source": effective_size(summary)[1],
            "energy_estimated": energy_estimated(summary), "energy_mode": energy_mode(summary),
            **setup_facts(summary)}  # precision + device: compare flags deltas that mix them


def metric_names(summary: dict[str, Any]) -> list[str]:
    """The names ``--metric`` accepts: every number in ``metrics`` and ``best_val``."""
    return [k for section in ("metrics", "best_val")
            for k, v in (summary.get(section) or {}).items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)]


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def problem_of(summary: Any) -> str | None:
    """Why a parsed file is not a run summary (None when it is one): compare needs a JSON object
    with ``status``, ``choices`` and ``overrides``, and ``metrics`` when it completed."""
    if not isinstance(summary, dict):
        return f"it is a JSON {_json_type(summary)}, not an object"
    missing = [k for k in REQUIRED if k not in summary]
    if summary.get("status") == "completed" and "metrics" not in summary:
        missing.append("metrics")
    if missing:
        return f"it has no {', '.join(missing)}"
    for key, kind in {**REQUIRED, "metrics": dict}.items():
        if key in summary and not isinstance(summary[key], kind):
            return f"its {key} is a JSON {_json_type(summary[key])}, not {_json_type(kind())}"
    if summary["status"] not in STATUSES:
        return (f"its status is {printable(repr(summary['status']), 80)}, not one of "
                f"{', '.join(STATUSES)}")
    return wrong_type(summary)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def wrong_type(summary: dict[str, Any]) -> str | None:
    """The first value whose JSON type is not what compare uses (a crafted or damaged file)."""
    for i, item in enumerate(summary["overrides"]):
        if not isinstance(item, str):
            return f"its overrides[{i}] is a JSON {_json_type(item)}, not a string"
    for key, value in summary["choices"].items():
        # choices.techniques is the stack as a list (results.new_summary): a real summary has it.
        if isinstance(value, dict) or (isinstance(value, list) and key != "techniques"):
            return f"its choices.{printable(key, 80)} is a JSON {_json_type(value)}, not a value"
    for key, value in (summary.get("metrics") or {}).items():
        if value is not None and not _number(value):
            return (f"its metrics.{printable(key, 80)} is a JSON {_json_type(value)}, not a "
                    "number")
    for section in SECTIONS:
        value = summary.get(section)
        if value is not None and not isinstance(value, dict):
            return f"its {section} is a JSON {_json_type(value)}, not an object"
    for key, value in (summary.get("time_s") or {}).items():
        if value is not None and not _number(value):
            return f"its time_s.{printable(key, 80)} is a JSON {_json_type(value)}, not a number"
    for key, kinds in (("error", (str,)), ("run_dir", (str,)), ("epochs", (int, float)),
                       ("throughput_img_s", (int, float))):
        value = summary.get(key)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            return f"its {key} is a JSON {_json_type(value)}"
    task = (summary.get("data") or {}).get("task")
    if task is not None and not isinstance(task, str):
        return f"its data.task is a JSON {_json_type(task)}, not a string"
    return None


def read_summary(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(summary, None)``, or ``(None, why)`` when the file is unreadable or not a summary."""
    try:
        summary = read_json(path, SUMMARY_LIMIT)
        if why := problem_of(summary):
            return None, why
        summary = clean(summary)  # no control character from here on
    except RefusedFile as err:  # a device, a pipe, a huge file: never read
        return None, str(err)
    except OSError as err:
        return None, f"it cannot be read ({printable(err.strerror or err)})"
    except UnicodeDecodeError:
        return None, "it is not UTF-8 text"
    except ValueError as err:
        return None, f"it is not valid JSON ({first_line(err)})"
    except RecursionError:
        return None, "it is nested too deeply to be a summary"
    summary.setdefault("run_dir", str(path.parent))
    return summary, None


def load_runs(paths: list[str]) -> pd.DataFrame:
    """One row per run: ``run_dir``, ``status``, ``error``, ``task``, config keys, then numbers.

    ``attrs``: ``config_keys`` (group choices, overrides, ``seed``), ``metric_keys`` (what
    ``--metric`` accepts) and ``skipped`` (``(path, why)`` of files that are not run summaries).
    Those are skipped (the caller warns) rather than turned into rows: their config is unknown.
    """
    rows, keys, metrics, skipped = [], {}, {}, []
    for path in find_summaries(paths):
        summary, why = read_summary(path)
        if summary is None:
            skipped.append((printable(path), why))
            continue
        config = config_of(summary)
        keys.update(dict.fromkeys(config))
        metrics.update(dict.fromkeys(metric_names(summary)))
        rows.append({"run_dir": str(path.parent), "status": summary.get("status", "failed"),
                     "error": summary.get("error") or (
                         "incomplete: killed, or still running" if summary.get("status")
                         == "running" else None),
                     "task": (summary.get("data") or {}).get("task"),
                     **config, **numbers_of(summary), **facts_of(summary),
                     **cache_columns(summary)})
    if not rows:
        path, why = skipped[0]
        raise EffbenchError(f"{path} is not a run summary ({why})"
                            + (f", nor are the other {len(skipped) - 1}" if len(skipped) > 1
                               else "")
                            + "; pass the run or sweep directories that effbench wrote.")
    runs = pd.DataFrame(rows)
    # A key that one run overrides and another leaves alone: the other ran with the default.
    config_keys = list(keys)
    runs[config_keys] = runs[config_keys].fillna(UNSET)
    runs.attrs.update(config_keys=config_keys, metric_keys=list(metrics), skipped=skipped)
    return runs
