"""The cost of a hyper-parameter search, side by side: the studies' "N× faster" figure (K
combinations tuned with the default strategy vs with a cheaper technique).

One row per value of ``key`` (e.g. ``strategy``): the K completed jobs, their summed training time
(``train`` + BN adaptation + feature extraction, as the studies count it; a cache-hit job pays
no extraction) and whole-job time, and the best job by the validation metric — a search picks its
winner on validation data, never on the test set.
"""

from __future__ import annotations

import pandas as pd

from effbench.config import default_choice
from effbench.errors import EffbenchError
from effbench.task import is_multilabel


def search_cost(runs: pd.DataFrame, key: str, metric: str | None = None) -> pd.DataFrame:
    if metric is None:  # the runs' default objective: macro AUROC on multilabel data
        done = runs[runs["status"] == "completed"]
        multilabel = len(done) and is_multilabel(done["task"]).all()
        metric = "val/auroc_macro" if multilabel else "val/acc"
    if key not in runs.columns:
        raise EffbenchError(f"--search-cost {key}: no run sets {key}; use a key that names the "
                            "searches, e.g. --search-cost strategy.")
    done = runs[runs["status"] == "completed"]
    if metric not in done.columns:
        raise EffbenchError(f"--metric {metric} is not recorded by these runs; use a validation "
                            "metric such as val/acc or val/acc_max.")
    rows = []
    for value, group in done.groupby(key, sort=True):
        best = group.loc[group[metric].idxmax()]
        rows.append({key: value, "K": len(group), "train_s": group["train_s"].sum(),
                     "total_s": group["time_s.total"].sum(), f"best {metric}": best[metric],
                     "best run": best["run_dir"]})
    return pd.DataFrame(rows)


def search_text(table: pd.DataFrame, key: str, baseline: str | None = None) -> str:
    """The table, then one "N× faster" line per search against ``baseline`` (default: the
    config's default strategy, conf/config.yaml) when the table has a row for it."""
    baseline = baseline or default_choice("strategy")
    lines = [f"search cost by {key} (sum over the K jobs of each search):",
             table.drop(columns=["best run"]).to_string(index=False, float_format=lambda v:
                                                         f"{v:.4g}")]
    base = table[table[key] == baseline]
    if not base.empty:
        b = base.iloc[0]
        for _, row in table[table[key] != baseline].iterrows():
            lines.append(f"{row[key]}: {b['train_s'] / row['train_s']:.1f}× faster than "
                         f"{baseline} in training time ({b['total_s'] / row['total_s']:.1f}× "
                         f"whole jobs), best {table.columns[4]} {row.iloc[4]:.4f} vs "
                         f"{b.iloc[4]:.4f}")
    return "\n".join(lines)
