"""The comparison as text: a terminal table, a Markdown report and CSV files."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from effbench.compare.group import (
    CO2,
    DENSE_SIZE,
    ESTIMATED,
    PARAMS,
    SIZE,
    TIME,
    Comparison,
    label,
    study_lines,
)
from effbench.compare.load import INCOMPLETE
from effbench.compare.output import write_atomic, write_text_atomic
from effbench.compare.precision import PRECISION
from effbench.compare.precision import mark as setup_mark
from effbench.compare.precision import warning as setup_warning
from effbench.compare.stats import CONFIDENCE, RESAMPLES, SEED

MARK = "*"  # after an energy / CO₂ figure that is (partly) an estimate, not a reading

# --sort names for the usual columns; anything else is a column or config key of the table.
SORT_ALIASES = {"metric": None, "time": TIME, "co2": CO2, "params": PARAMS, "size": SIZE,
                "dense-size": DENSE_SIZE}


def sort_table(comp: Comparison, sort: str | None) -> pd.DataFrame:
    """Best first for the headline metric (lowest for a loss); smallest first for the rest."""
    from effbench.errors import EffbenchError

    table = comp.table
    if sort is None:
        return table.iloc[sorted(range(len(table)), key=lambda i: _natural(comp, table.iloc[i]))
                          ].reset_index(drop=True)
    column = SORT_ALIASES.get(sort, sort) or comp.metric
    if column not in table.columns:
        choices = [*SORT_ALIASES, *comp.keys]
        raise EffbenchError(f"--sort {sort} is not a column of the table; use one of "
                            f"{', '.join(choices)}.")
    descending = column == comp.metric and "loss" not in column
    return table.sort_values(column, ascending=not descending, kind="stable",
                             na_position="last").reset_index(drop=True)


def _natural(comp: Comparison, row: pd.Series) -> tuple:
    """Default order: the baseline first, then by each key, numbers by value (1e-4 < 1e-3)."""
    out: list = []
    for key in comp.keys:
        value = str(row[key])
        try:
            number, text = float(value), ""
        except ValueError:
            number, text = float("inf"), value
        out += [key in comp.baseline and value != comp.baseline[key], number, text]
    return tuple(out)


def _num(v: float, spec: str) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _pm(row: pd.Series, col: str, spec: str, scale: float = 1.0) -> str:
    mean, std = row.get(col), row.get(f"{col}_std")
    if mean is None or pd.isna(mean):
        return "–"
    text = format(mean * scale, spec)
    return text if pd.isna(std) else f"{text} ± {format(std * scale, spec)}"


def _signed(v: float, unit: str, spec: str = "+.1f") -> str:
    return "" if pd.isna(v) else f"{format(v, spec)}{unit}".replace("-", "−")


def display_table(comp: Comparison, sort: str | None = None) -> pd.DataFrame:
    """The human table: configuration keys, mean ± std (n), costs, and deltas to the baseline."""
    rows = []
    has_deltas = "d_metric_pp" in comp.table
    short = comp.metric.split("/", 1)[-1]
    for _, r in sort_table(comp, sort).iterrows():
        out = {k: r[k] for k in comp.keys}
        out["n"] = f"{r['n']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
        if r.get("repeats", 0) > 0:  # runs of a seed already counted: not replicates
            out["n"] += f" (+{r['repeats']} repeat{'s' * (r['repeats'] > 1)})"
        out["precision"] = r.get(PRECISION) or ""
        out[comp.metric] = _pm(r, comp.metric, ".4f")
        out["train s"] = _pm(r, TIME, ".1f")
        out["CO₂ g"] = _marked(_pm(r, CO2, ".3g", 1000.0), r.get(ESTIMATED))
        out["trainable"] = _num(r.get(PARAMS), ",.0f")
        out["size MB"] = _num(r.get(DENSE_SIZE, float("nan")) / 1e6, ".2f")
        out["eff. size MB"] = _num(r.get(SIZE, float("nan")) / 1e6, ".2f")
        if has_deltas:
            out.update(_delta_cells(r, short))
        rows.append(out)
    return pd.DataFrame(rows)


def _marked(text: str, estimated: object) -> str:
    return f"{text}{MARK}" if estimated is True and text not in ("", "–") else text


def _delta_cells(r: pd.Series, short: str) -> dict[str, str]:
    if r["baseline"]:
        return {f"Δ {short} pp": "baseline", "verdict": "", "Δ time": "", "speed-up": "",
                "Δ CO₂": "",
                "Δ trainable": "", "Δ size": "", "compared with": ""}
    pp = _signed(r["d_metric_pp"], "", "+.2f")
    if pp and not pd.isna(r["d_metric_pp_std"]):
        pp += f" ± {r['d_metric_pp_std']:.2f}"
    if pp and not pd.isna(r.get("d_lo", float("nan"))):  # the paired 95 % interval
        pp += f" [{_signed(r['d_lo'], '', '+.2f')}, {_signed(r['d_hi'], '', '+.2f')}]"
    return {f"Δ {short} pp": pp, "verdict": _verdict_cell(r),
            "Δ time": setup_mark(_signed(r["d_train_pct"], " %"), r),
            "speed-up": _num(r["speedup"], ".2f") and f"×{r['speedup']:.2f}",
            "Δ CO₂": _marked(_signed(r["d_co2_pct"], " %"), bool(r["d_co2_estimated"])),
            "Δ trainable": _signed(r["d_params_pct"], " %"),
            "Δ size": _signed(r["d_size_pct"], " %"),
            "compared with": r["compared_with"] or f"none: {r['no_baseline']}"}


def _verdict_cell(r: pd.Series) -> str:
    """``non-inferior (p 0.52)``; ``–`` where there is no interval (said under the table)."""
    if not r.get("verdict"):
        return "–" if r.get("no_interval") else ""
    return f"{r['verdict']} (p {r['p_value']:.2g})"


def interval_lines(comp: Comparison) -> list[str]:
    """How the intervals were made, then per row why it has none, and repeats / seeds that
    change nothing."""
    table = comp.table
    if "verdict" not in table or not comp.baseline:
        return []
    lines = [f"Δ [lo, hi]: {CONFIDENCE:.0%} interval of the paired difference, bootstrap over the "
             f"same test samples (and over seeds where several), {RESAMPLES} resamples, seed "
             f"{SEED}; verdict against a non-inferiority margin of {comp.margin:g} pp: "
             "superior (interval above 0), non-inferior (above −margin), inferior (below "
             "−margin), inconclusive (across −margin); p: McNemar exact for one model per "
             "side, else bootstrap"]
    whys = {label(r, comp.keys): r["no_interval"] for _, r in table.iterrows()
            if r.get("no_interval")}
    if len(whys) > 1 and len(set(whys.values())) == 1:  # e.g. a metric without predictions
        lines.append(f"no interval for any row: {next(iter(whys.values()))}")
    else:
        lines += [f"{name}: no interval: {why}" for name, why in whys.items()]
    for _, r in table.iterrows():
        for note in str(r.get("seed_notes") or "").split("; "):
            if note and note not in lines:
                lines.append(note)
    return lines


def failed_lines(comp: Comparison) -> list[str]:
    keys = [*comp.keys, "seed"] if "seed" not in comp.keys else comp.keys
    return [f"{label(r, keys)}: {r['error']} ({r['run_dir']})"
            for _, r in comp.failed.iterrows()]


def header_lines(comp: Comparison) -> list[str]:
    done, total = len(comp.completed), len(comp.runs)
    unfinished = int(comp.runs["status"].isin(INCOMPLETE).sum())
    incomplete = f", {unfinished} incomplete" if unfinished else ""  # killed or stopped
    lines = [f"{total} runs ({done} completed, {total - done - unfinished} failed{incomplete}); "
             f"metric {comp.metric}; "
             f"grouped by {', '.join(comp.keys)}; mean ± std over seeds; train s excludes "
             "set-up and test, CO₂ g covers the same phases (whole job: energy.co2_kg in "
             "compare.csv)"]
    if comp.common:
        lines.append("common: " + ", ".join(f"{k}={v}" for k, v in comp.common.items()))
    if comp.added:
        lines.append(f"also grouped by {', '.join(comp.added)}: it varies within the --by groups "
                     "and only seeds are averaged")
    if comp.baseline:
        lines.append("baseline: " + ", ".join(f"{k}={v}" for k, v in comp.baseline.items())
                     + " (matched on the config keys both runs set)")
    if view := comp.runs.attrs.get("cost_view"):  # cache-hit jobs: per run or amortised
        lines.append(view)
    sources = sorted({s for s in comp.completed["size_source"].dropna()
                      if s != f"{DENSE_SIZE}"})
    if sources:
        lines.append(f"eff. size: {', '.join(sources)} where recorded, else the dense size")
    return lines


def footnotes(comp: Comparison) -> list[str]:
    """The marker's meaning, with the measurement modes of the estimated runs."""
    table, done = comp.table, comp.completed
    mixed = setup_warning(table, lambda r: label(r, comp.keys))  # † on Δ time: one precision?
    if CO2 not in table or not (table[ESTIMATED] & table[CO2].notna()).any():
        return [mixed] if mixed else []  # no estimated cell: nothing more to explain
    estimated = done[done[ESTIMATED].eq(True)]
    modes = sorted(set(estimated["energy_mode"].dropna()))
    how = f" (energy.mode {'; '.join(modes)})" if modes else ""
    return [*([mixed] if mixed else []), f"{MARK} estimated from TDP, not measured{how}"]


def skipped_lines(comp: Comparison) -> list[str]:
    return [f"{path}: {why}" for path, why in comp.runs.attrs.get("skipped", [])]


def terminal_text(comp: Comparison, sort: str | None = None) -> str:
    table = display_table(comp, sort).to_markdown(index=False, tablefmt="simple",
                                                  disable_numparse=True)
    parts = ["\n".join(header_lines(comp)), table]
    if notes := footnotes(comp):
        parts.append("\n".join(notes))
    if intervals := interval_lines(comp):
        parts.append("\n".join(intervals))
    if study := study_lines(comp):
        parts.append("\n".join(study))
    if failed := failed_lines(comp):
        parts.append("failed runs:\n" + "\n".join(f"  {line}" for line in failed))
    if skipped := skipped_lines(comp):
        parts.append("skipped (not run summaries):\n" + "\n".join(f"  {s}" for s in skipped))
    return "\n\n".join(parts)


def markdown_text(comp: Comparison, sort: str | None = None, images: list[Path] = ()) -> str:
    table = display_table(comp, sort).to_markdown(index=False, disable_numparse=True)
    parts = ["# effbench-compare", "\n".join(f"- {line}" for line in header_lines(comp)), table]
    if notes := footnotes(comp):
        parts.append("\n".join(f"\\{line}" for line in notes))  # a bare * starts a list
    if intervals := interval_lines(comp):
        parts.append("\n".join(f"- {line}" for line in intervals))
    if study := study_lines(comp):
        parts.append("\n".join(f"- {line}" for line in study))
    if failed := failed_lines(comp):
        parts.append("## Failed runs\n\n" + "\n".join(f"- {line}" for line in failed))
    if skipped := skipped_lines(comp):
        parts.append("## Skipped files (not run summaries)\n\n"
                     + "\n".join(f"- {line}" for line in skipped))
    if images:
        parts.append("## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in images))
    return "\n\n".join(parts) + "\n"


def write_tables(comp: Comparison, out: Path, sort: str | None,
                 images: list[Path] = ()) -> list[Path]:
    """``compare.md``, ``compare.csv`` (all aggregated numbers and deltas) and ``runs.csv``,
    each written atomically (``out`` exists: ``output.prepare_out``)."""
    from effbench.compare.safe import csv_safe, text  # no formulas, no escape sequences

    table = sort_table(comp, sort)
    return [write_text_atomic(out / "compare.md", text(markdown_text(comp, sort, images))),
            write_atomic(out / "compare.csv",
                         lambda tmp: csv_safe(table).to_csv(tmp, index=False)),
            write_atomic(out / "runs.csv",
                         lambda tmp: csv_safe(comp.runs).to_csv(tmp, index=False))]
