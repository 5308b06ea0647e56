"""Per-epoch curves from each run's ``csv/metrics.csv``, averaged over the seeds of a configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

# A technique that trains on a changing subset logs ``<technique>/resampled`` (1 on the epochs
# where it drew a new one): read from whichever technique logs it.
RESAMPLED = "resampled"


@dataclass
class Curve:
    """Mean and std over seeds per epoch, and the epochs where any seed resampled its data."""

    mean: pd.Series
    std: pd.Series
    resampled: list[int]


def read_epochs(run_dir: str | Path) -> pd.DataFrame | None:
    """One row per epoch: Lightning's CSV logger writes train and val values on separate rows."""
    path = Path(run_dir) / "csv" / "metrics.csv"
    if not path.is_file():
        return None
    frame = pd.read_csv(path)
    if "epoch" not in frame or frame.empty:
        return None
    return frame.groupby("epoch").last()


def val_column(metric: str) -> str:
    """The per-epoch counterpart of a metric: ``test/acc`` → ``val/acc``, and a run-level best
    such as ``val/acc_max`` (best over epochs) → ``val/acc``, the column that the CSV has."""
    if metric.startswith("test/"):
        return "val/" + metric.split("/", 1)[1]
    if metric.startswith("val/"):
        return metric.removesuffix("_max").removesuffix("_min")
    return metric


def series_of(epochs: pd.DataFrame, column: str | tuple[str, str],
              best_so_far: bool = False) -> pd.Series | None:
    """A column (or the difference of two: ``(a, b)`` → a − b), optionally as its running best."""
    names = column if isinstance(column, tuple) else (column,)
    if any(name not in epochs for name in names):
        return None
    values = epochs[names[0]] - epochs[names[1]] if len(names) == 2 else epochs[names[0]]
    values = values.dropna()
    if best_so_far:  # elitism: keep the best model seen so far, as a study may report it
        values = values.cummin() if "loss" in names[0] else values.cummax()
    return values if len(values) else None


def is_resampled_column(name: str) -> bool:
    """``<technique>/resampled``: one technique's own marker (not ``val/x/resampled``)."""
    technique, _, leaf = name.rpartition("/")
    return leaf == RESAMPLED and bool(technique) and "/" not in technique


def resampled_epochs(epochs: pd.DataFrame) -> set[int]:
    """The epochs that any technique's ``<technique>/resampled`` column marks (value > 0)."""
    marked: set[int] = set()
    for column in epochs.columns:
        if is_resampled_column(str(column)):
            marked |= {int(e) for e in epochs.index[epochs[column].fillna(0) > 0]}
    return marked


def config_curve(run_dirs: list[str], column: str | tuple[str, str],
                 best_so_far: bool = False) -> Curve | None:
    per_run, resampled = [], set()
    for run_dir in run_dirs:
        epochs = read_epochs(run_dir)
        if epochs is None:
            continue
        values = series_of(epochs, column, best_so_far)
        if values is not None:
            per_run.append(values)
        resampled |= resampled_epochs(epochs)
    if not per_run:
        return None
    table = pd.concat(per_run, axis=1)
    return Curve(table.mean(axis=1), table.std(axis=1).fillna(0.0), sorted(resampled))
