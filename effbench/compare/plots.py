"""PNG plots of a comparison (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from effbench.compare.curves import Curve, config_curve, val_column  # noqa: E402
from effbench.compare.group import (  # noqa: E402
    CO2,
    ESTIMATED,
    PARAMS,
    SIZE,
    TIME,
    Comparison,
    label,
)
from effbench.compare.output import write_atomic  # noqa: E402
from effbench.compare.table import sort_table  # noqa: E402

DPI = 120


def _rows(comp: Comparison) -> pd.DataFrame:
    table = sort_table(comp, None)  # the table's order: baseline first, numbers by value
    return table[table["n"] > 0]


def _save(fig: plt.Figure, path: Path) -> Path:
    """Atomically (the temp name has no .png suffix, hence ``format``); the figure is closed
    even when saving fails."""
    try:
        fig.tight_layout()
        return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))
    finally:
        plt.close(fig)


def _colors(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def metric_vs_time(comp: Comparison, path: Path) -> Path | str:
    """Headline metric vs training time, one point per configuration, error bars over seeds."""
    rows = _rows(comp)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for color, (_, r) in zip(_colors(len(rows)), rows.iterrows()):
        ax.errorbar(r[TIME], r[comp.metric], xerr=_nz(r.get(f"{TIME}_std")),
                    yerr=_nz(r.get(f"{comp.metric}_std")), fmt="o", capsize=4, color=color,
                    label=label(r, comp.keys))
    ax.set(xlabel="training time (s)", ylabel=comp.metric, title=f"{comp.metric} vs training time")
    ax.margins(0.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _nz(v: float | None) -> float:
    return 0.0 if v is None or pd.isna(v) else float(v)


def co2(comp: Comparison, path: Path) -> Path | str:
    """CO₂ per configuration (mean ± std over seeds)."""
    rows = _rows(comp)
    if CO2 not in rows or rows[CO2].isna().all():
        return "no run measured energy (they ran with tracking.energy=false)"
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows) + 2), 4.5))
    x = np.arange(len(rows))
    ax.bar(x, rows[CO2] * 1000, yerr=rows[f"{CO2}_std"].fillna(0) * 1000, capsize=4,
           color=_colors(len(rows)))
    ax.set_xticks(x, [label(r, comp.keys) for _, r in rows.iterrows()], rotation=30, ha="right",
                  fontsize=8)
    ax.set(ylabel="CO₂ (g)", title="CO₂ emitted per configuration (codecarbon)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def params_time_metric(comp: Comparison, path: Path) -> Path | str:
    """Trainable parameters vs training time vs metric: x = time, y = metric, colour and size =
    trainable parameters (log scale) — the studies' three-way trade-off in one picture."""
    rows = _rows(comp).dropna(subset=[TIME, comp.metric])
    if PARAMS not in rows or rows[PARAMS].isna().all():
        return "no run recorded its trainable parameters"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    logp = np.log10(rows[PARAMS].clip(lower=1))
    size = 40 + 260 * (logp - logp.min()) / max(logp.max() - logp.min(), 1e-9)
    points = ax.scatter(rows[TIME], rows[comp.metric], s=size, c=logp, cmap="viridis",
                        alpha=0.8, edgecolors="black")
    for (_, r), x, y in zip(rows.iterrows(), rows[TIME], rows[comp.metric]):
        ax.annotate(label(r, comp.keys), (x, y), textcoords="offset points", xytext=(6, 6),
                    fontsize=7)
    fig.colorbar(points, ax=ax, label="log10 trainable parameters")
    ax.margins(0.15)  # room for the labels at the edges
    ax.set(xlabel="training time (s)", ylabel=comp.metric,
           title="metric vs training time vs trainable parameters")
    ax.grid(alpha=0.3)
    return _save(fig, path)


# Pareto plots: x column, axis label, scale to the axis unit.
PARETO = {"time": (TIME, "training time (s)", 1.0), "co2": (CO2, "CO₂ (g)", 1000.0),
          "size": (SIZE, "effective model size (MB)", 1e-6)}


def pareto_front(x: np.ndarray, y: np.ndarray, higher_better: bool = True) -> np.ndarray:
    """Indices of the points no other point beats on both cost (x, lower) and metric (y), in
    order of cost."""
    order = np.lexsort((-y if higher_better else y, x))
    front, best = [], -np.inf
    for i in order:
        value = y[i] if higher_better else -y[i]
        if value > best:
            front.append(i)
            best = value
    return np.array(front, dtype=int)


def pareto(comp: Comparison, what: str, path: Path) -> Path | str:
    """The headline metric (with its 95 % interval) against a cost: one colour per technique,
    the baseline as a star, the Pareto front as a dashed step line."""
    column, xlabel, scale = PARETO[what]
    rows = _rows(comp)
    if column not in rows or rows[column].isna().all():
        return ("no run measured energy (they ran with tracking.energy=false)" if what == "co2"
                else f"no run recorded {column}")
    rows = rows.dropna(subset=[column, comp.metric])
    x, y = rows[column].to_numpy(float) * scale, rows[comp.metric].to_numpy(float)
    lo = rows["m_lo"].to_numpy(float) if "m_lo" in rows else np.full(len(rows), np.nan)
    hi = rows["m_hi"].to_numpy(float) if "m_hi" in rows else np.full(len(rows), np.nan)
    std = rows[f"{comp.metric}_std"].fillna(0).to_numpy(float)
    # The interval where the predictions give one, else ± the std over seeds.
    yerr = np.where(np.isnan(lo), [std, std], [np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)])
    technique = rows["strategy"] if "strategy" in rows else pd.Series(
        [label(r, comp.keys) for _, r in rows.iterrows()], index=rows.index)
    names = list(dict.fromkeys(technique))
    colors = dict(zip(names, _colors(len(names))))
    estimated = rows[ESTIMATED].eq(True).to_numpy() if (what == "co2" and ESTIMATED in rows) \
        else np.zeros(len(rows), dtype=bool)
    base = rows["baseline"].eq(True).to_numpy() if "baseline" in rows \
        else np.zeros(len(rows), dtype=bool)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    higher = "loss" not in comp.metric
    front = pareto_front(x, y, higher)
    ax.step(x[front], y[front], where="post", color="grey", ls="--", lw=1, label="Pareto front")
    for k, (i, tech) in enumerate(zip(range(len(rows)), technique)):
        color = colors[tech]
        first = tech not in [technique.iloc[j] for j in range(k)]
        ax.errorbar(x[i], y[i], yerr=yerr[:, i:i + 1], fmt="*" if base[i] else "o",
                    ms=14 if base[i] else 7, capsize=4, color=color,
                    mfc="none" if estimated[i] else color, mec="black" if base[i] else color,
                    label=tech if first else None)
        ax.annotate(("baseline: " if base[i] else "") + label(rows.iloc[i], comp.keys),
                    (x[i], y[i]), textcoords="offset points", xytext=(6, 6), fontsize=7)
    if estimated.any():
        xlabel += " (hollow: estimated from TDP)"
    if what != "time" and (x > 0).all() and x.max() / max(x.min(), 1e-12) >= 10:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=f"{comp.metric} (95 % interval)",
           title=f"{comp.metric} vs {xlabel.split(' (')[0]}: Pareto front")
    ax.margins(0.12)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _curves(comp: Comparison, column: str | tuple[str, str],
            best_so_far: bool = False) -> list[tuple[str, Curve]]:
    done = comp.completed
    out = []
    for _, r in _rows(comp).iterrows():
        mask = np.logical_and.reduce([done[k] == r[k] for k in comp.keys])
        curve = config_curve(list(done[mask]["run_dir"]), column, best_so_far)
        if curve is not None:
            out.append((label(r, comp.keys), curve))
    return out


def _curve_plot(curves: list[tuple[str, Curve]], ylabel: str, title: str, path: Path,
                zero_line: bool = False) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    marked = False
    for color, (name, c) in zip(_colors(len(curves)), curves):
        epochs = c.mean.index.to_numpy() + 1  # the CSV counts epochs from 0
        ax.plot(epochs, c.mean, marker=".", color=color, label=name)
        ax.fill_between(epochs, c.mean - c.std, c.mean + c.std, color=color, alpha=0.2)
        hits = [e for e in c.resampled if e in c.mean.index]
        if hits:
            ax.scatter(np.array(hits) + 1, c.mean.loc[hits], marker="v", s=60, color=color,
                       edgecolors="black", zorder=3, label=None if marked else "resampled")
            marked = True
    if zero_line:
        ax.axhline(0, color="grey", lw=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def learning_curves(comp: Comparison, path: Path, best_so_far: bool = False) -> Path | str:
    """Validation metric per epoch, mean over seeds with a ±std band; ▼ = data resampled."""
    column = val_column(comp.metric)
    curves = _curves(comp, column, best_so_far)
    if not curves:
        return f"no run's csv/metrics.csv has a {column} column"
    what = f"best-so-far {column}" if best_so_far else column
    return _curve_plot(curves, what, f"learning curves: {what} (mean ± std over seeds)", path)


def train_val_gap(comp: Comparison, path: Path) -> Path | str:
    """train/acc − val/acc per epoch: how much each configuration over-fits."""
    curves = _curves(comp, ("train/acc", "val/acc"))
    if not curves:
        return "no run's csv/metrics.csv has both train/acc and val/acc"
    return _curve_plot(curves, "train/acc − val/acc", "train–val accuracy gap per epoch", path,
                       zero_line=True)


def numeric_keys(comp: Comparison) -> list[str]:
    """Swept keys whose values are all numbers (at least two of them): worth a metric-vs-x plot."""
    out = []
    for key in comp.keys:
        values = _rows(comp)[key]
        if values.nunique() > 1 and all(_is_number(v) for v in values):
            out.append(key)
    return out


def _is_number(value: str) -> bool:
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


def metric_vs_param(comp: Comparison, key: str, path: Path) -> Path | str:
    """The metric vs a swept numeric hyper-parameter, one line per value of the other keys."""
    rows = _rows(comp).assign(_x=lambda t: t[key].astype(float)).sort_values("_x")
    others = [k for k in comp.keys if k != key]
    groups = rows.groupby(others, sort=False) if others else [((), rows)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for color, (_, grp) in zip(_colors(len(rows)), groups):
        name = label(grp.iloc[0], others) if others else comp.metric
        ax.errorbar(grp["_x"], grp[comp.metric], yerr=grp[f"{comp.metric}_std"].fillna(0),
                    marker="o", capsize=4, color=color, label=name)
    x = rows["_x"]
    if (x > 0).all() and x.max() / x.min() >= 10:  # learning rates, weight decay: log sweeps
        ax.set_xscale("log")
    ax.set(xlabel=key, ylabel=comp.metric, title=f"{comp.metric} vs {key} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_plots(comp: Comparison, out: Path, best_so_far: bool = False
                ) -> tuple[list[Path], list[str]]:
    """Every plot that the data supports; returns the files and why any were skipped
    (``out`` exists: ``output.prepare_out``)."""
    jobs: dict[str, Callable[[Path], Path | str]] = {
        "metric_vs_time": lambda p: metric_vs_time(comp, p),
        "params_time_metric": lambda p: params_time_metric(comp, p),
        "co2": lambda p: co2(comp, p),
        "learning_curves": lambda p: learning_curves(comp, p, best_so_far),
        "train_val_gap": lambda p: train_val_gap(comp, p),
        **{f"pareto_{what}": lambda p, w=what: pareto(comp, w, p) for what in PARETO},
    }
    for key in numeric_keys(comp):
        jobs[f"metric_vs_{key.replace('/', '_')}"] = lambda p, k=key: metric_vs_param(comp, k, p)
    written, skipped = [], []
    for name, job in jobs.items():
        result = job(out / f"{name}.png")
        if isinstance(result, Path):
            written.append(result)
        else:
            skipped.append(f"{name}.png skipped: {result}")
    return written, skipped
