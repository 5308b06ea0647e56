"""Group runs by the config keys that vary, aggregate over seeds, and compare to a baseline."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from effbench.compare import stats
from effbench.compare.keys import CHOICE_KEYS, canon
from effbench.compare.load import EFFECTIVE_SIZE, UNSET
from effbench.compare.precision import with_setup
from effbench.config import default_choice
from effbench.errors import EffbenchError
from effbench.task import is_multilabel

# CO₂ of the phases of TIME (train, BN adaptation, extraction); the whole job's is energy.co2_kg.
TIME, CO2 = "train_s", "train_co2_kg"
# SIZE is what Δ size uses: the size a technique states it saves (compressed, int8), else the
# dense one (facts.py).
PARAMS, SIZE, DENSE_SIZE = "model.params_trainable", EFFECTIVE_SIZE, "model.size_bytes"
ALWAYS = [TIME, "time_s.total", CO2, "energy.co2_kg", "energy.kwh", PARAMS, "model.params_total",
          SIZE, DENSE_SIZE, "epochs"]
ESTIMATED = "energy_estimated"  # per configuration: some run's energy is an estimate


@dataclass
class Comparison:
    """The aggregated table (one row per configuration) and what it was built from."""

    runs: pd.DataFrame
    table: pd.DataFrame
    keys: list[str]
    metric: str
    baseline: dict[str, str] = field(default_factory=dict)
    common: dict[str, str] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)  # keys that --by left out but vary
    margin: float = stats.DEFAULT_MARGIN_PP  # non-inferiority margin, pp
    paired: dict = field(default_factory=dict)  # table index → stats.Paired (its baseline)

    @property
    def completed(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] == "completed"]

    @property
    def failed(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] != "completed"]


def headline_metric(runs: pd.DataFrame, metric: str | None) -> str:
    """``--metric`` if given (it must exist), else accuracy — macro AUROC when all runs are
    multilabel (accuracy there rewards predicting no label at all)."""
    done = runs[runs["status"] == "completed"]
    if metric is None:
        multilabel = len(done) and is_multilabel(done["task"]).all()
        metric = "test/auroc_macro" if multilabel else "test/acc"
    if metric not in done.columns or done[metric].isna().all():
        known = sorted(k for k in runs.attrs.get("metric_keys", []) if k in done
                       and done[k].notna().any())
        close = difflib.get_close_matches(metric, known, n=3)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise EffbenchError(f"metric {metric} is in no completed run{hint}; use --metric with "
                            f"one of {', '.join(known) or '(none: no run completed)'}.")
    return metric


def varying_keys(runs: pd.DataFrame, by: list[str] | None) -> tuple[list[str], list[str]]:
    """``(keys, added)``: the config keys with more than one value (the seed excepted: seeds are
    what we average over), or the ``--by`` keys plus ``added``, every other key that varies
    within a ``--by`` group — only seeds are ever averaged, never e.g. two values of alpha."""
    config_keys = runs.attrs["config_keys"]
    if not by:
        keys = [k for k in config_keys if k != "seed" and runs[k].nunique() > 1]
        return keys or ["strategy"], []
    unknown = [k for k in by if k not in config_keys]
    if unknown:
        raise EffbenchError(f"--by {unknown[0]} is not a config key of these runs; use one "
                            f"of {', '.join(config_keys)}.")
    groups = runs.groupby(list(by), sort=False, dropna=False)
    added = [k for k in config_keys if k not in by and k != "seed"
             and groups[k].nunique(dropna=False).max() > 1]
    return [*by, *added], added


def parse_baseline(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        for item in spec.split(","):
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise EffbenchError(f"--baseline {item} is not KEY=VALUE; write e.g. "
                                    f"--baseline {default_baseline()}.")
            out[key.strip()] = canon(value)
    return out


def aggregate(runs: pd.DataFrame, keys: list[str], metric: str) -> pd.DataFrame:
    """Mean, std (``<col>_std``) and ``n`` over the distinct seeds of each configuration's
    completed runs (runs of one seed are repeats: averaged first, counted in ``repeats``, never
    as independent replicates); ``failed`` counts the failed runs (a configuration whose runs all
    failed keeps its row)."""
    done = runs[runs["status"] == "completed"]
    numeric = [c for c in done.columns if c not in runs.attrs["config_keys"]
               and pd.api.types.is_numeric_dtype(done[c])
               and not pd.api.types.is_bool_dtype(done[c])]
    columns = [metric, *[c for c in ALWAYS if c in numeric and c != metric],
               *[c for c in numeric if c not in ALWAYS and c != metric]]
    seed_keys = keys if "seed" in keys else [*keys, "seed"]
    per_seed = done.groupby(seed_keys, sort=False, dropna=False)[columns].mean().reset_index()
    grouped = per_seed.groupby(keys, sort=False, dropna=False)[columns]
    table = grouped.mean().join(grouped.std().add_suffix("_std"))
    table["n"] = grouped.size()
    table["repeats"] = done.groupby(keys, sort=False, dropna=False).size() - table["n"]
    failed = runs[runs["status"] != "completed"].groupby(keys, sort=False, dropna=False).size()
    table = table.reindex(table.index.union(failed.index, sort=False)) if len(failed) else table
    table["n"] = table["n"].fillna(0).astype(int)
    table["repeats"] = table["repeats"].fillna(0).astype(int)
    table["failed"] = failed.reindex(table.index).fillna(0).astype(int)
    facts = done.assign(**{ESTIMATED: done[ESTIMATED].eq(True)}).groupby(
        keys, sort=False, dropna=False).agg({ESTIMATED: "any", "size_source": "first"})
    table[[ESTIMATED, "size_source"]] = facts.reindex(table.index)
    table[ESTIMATED] = table[ESTIMATED].eq(True)
    return table.reset_index()


def default_baseline() -> str:
    """``strategy=<the config's default strategy>``: what every other technique is measured
    against unless ``--baseline`` says otherwise (conf/config.yaml, never a name written here)."""
    return f"strategy={default_choice('strategy')}"


def resolve_baseline(runs: pd.DataFrame, specs: list[str] | None,
                     keys: list[str]) -> dict[str, str]:
    """The explicit ``--baseline`` (it must match a completed run), else the default strategy's
    runs (``default_baseline``) when the strategy varies and such runs exist, else none."""
    explicit = bool(specs)
    baseline = parse_baseline(specs or [default_baseline()])
    done = runs[runs["status"] == "completed"]
    for key, value in baseline.items():
        if key not in runs.attrs["config_keys"]:
            if not explicit:
                return {}
            raise EffbenchError(f"--baseline key {key} is not a config key of these runs; use "
                                f"one of {', '.join(runs.attrs['config_keys'])}.")
        if not (done[key] == value).any():
            if not explicit:
                return {}
            have = ", ".join(sorted(done[key].unique())) or "(no completed run)"
            raise EffbenchError(f"--baseline {key}={value} matches no completed run; "
                                f"{key} has {have}.")
    if not explicit and not set(baseline) & set(keys):
        return {}  # every run is the baseline: comparing a configuration with itself says nothing
    return baseline


def _paired_pp_std(runs: pd.DataFrame, metric: str, row: pd.Series, base: pd.Series,
                   keys: list[str]) -> float:
    """Std over seeds of the per-seed metric difference (pp), where both sides ran that seed."""
    def per_seed(values: pd.Series) -> pd.Series:
        mask = np.logical_and.reduce([runs[k] == values[k] for k in keys])
        sel = runs[mask & (runs["status"] == "completed")]
        return sel.groupby("seed")[metric].mean()

    diff = (per_seed(row) - per_seed(base)).dropna() * 100
    return float(diff.std()) if len(diff) > 1 else float("nan")


def row_configs(runs: pd.DataFrame, table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Every config key's value per table row (the seed aside). Keys outside ``keys`` are constant
    within a row, so matching can use them too (``--by`` may have left a key out)."""
    others = [k for k in runs.attrs["config_keys"] if k not in keys and k != "seed"]
    if not others:
        return table[keys]
    values = runs.groupby(keys, sort=False, dropna=False)[others].first().reset_index()
    return table[keys].merge(values, on=keys, how="left")


def match_score(row: pd.Series, base: pd.Series, match: list[str]) -> int | None:
    """None when the two disagree on a key that both set; else how many keys agree outright
    (the tie-break when several baseline configurations qualify)."""
    both = [k for k in match if row[k] != UNSET and base[k] != UNSET]
    if any(row[k] != base[k] for k in both):
        return None
    return sum(row[k] == base[k] for k in match)


def find_baseline(row: pd.Series, bases: pd.DataFrame, match: list[str],
                  name: str) -> tuple[int | None, str]:
    """``(index of the baseline row, "")`` or ``(None, why not)``. Keys that only one side sets
    (a technique's own ``strategy.alpha`` vs a baseline without it) are ignored: the other ran
    the default."""
    scores = {i: match_score(row, b, match) for i, b in bases.iterrows()}
    scores = {i: sc for i, sc in scores.items() if sc is not None}
    if not scores:  # name the keys that ruled every candidate out, with this row's values
        clash = [k for k in match if row[k] != UNSET
                 and ((bases[k] != UNSET) & (bases[k] != row[k])).any()]
        given = ", ".join(f"{k}={row[k]}" for k in clash)
        return None, f"no {name} run" + (f" with {given}" if given else "")
    best = [i for i, sc in scores.items() if sc == max(scores.values())]
    if len(best) > 1:
        differ = [k for k in match if bases.loc[best, k].nunique() > 1]
        return None, (f"{len(best)} {name} configurations match (they differ in "
                      f"{', '.join(differ)}); pin one with --baseline")
    if bases.loc[best[0], "n"] == 0:
        return None, f"every {name} run with the same settings failed"
    return best[0], ""


def add_deltas(runs: pd.DataFrame, table: pd.DataFrame, keys: list[str], metric: str,
               baseline: dict[str, str]) -> pd.DataFrame:
    """Per configuration, its difference from the baseline configuration that agrees on every
    config key both of them set (``find_baseline``): metric in percentage points, time / CO₂ /
    trainable params / size in %, and speed-up / CO₂ reduction factors (baseline ÷ this).
    ``compared_with`` names that baseline row; ``no_baseline`` says why a row has none."""
    config = row_configs(runs, table, keys)
    match = [k for k in config.columns if k not in baseline]
    is_base = np.logical_and.reduce([table[k] == v for k, v in baseline.items()])
    table = table.assign(baseline=is_base)
    bases = config[is_base].assign(n=table["n"])
    name = label(baseline, list(baseline))
    cols: dict[str, list] = {c: [] for c in (*DELTAS, "d_metric_pp_std", "d_co2_estimated",
                                             "compared_with", "no_baseline", "base_row")}
    for i, row in table.iterrows():
        found, why = (None, "") if row["baseline"] else find_baseline(config.loc[i], bases,
                                                                      match, name)
        base = table.loc[found] if found is not None else None
        for col, value in _deltas(row, base, metric).items():
            cols[col].append(value)
        cols["d_metric_pp_std"].append(_paired_pp_std(runs, metric, row, base, keys)
                                       if base is not None else float("nan"))
        cols["d_co2_estimated"].append(base is not None and bool(row[ESTIMATED]
                                                                 or base[ESTIMATED]))
        cols["compared_with"].append(_base_label(config.loc[found], keys)
                                     if found is not None else "")
        cols["no_baseline"].append(why)
        cols["base_row"].append(found)  # precision.with_setup compares the two rows' set-ups
    return table.assign(**cols)


def _base_label(base: pd.Series, keys: list[str]) -> str:
    """The baseline row's label, without the keys it left at their default."""
    return label(base, [k for k in keys if base[k] != UNSET])


def _ratio(a: float, b: float) -> float:
    return a / b if b and not pd.isna(a) and not pd.isna(b) else float("nan")


DELTAS = ("d_metric_pp", "d_train_pct", "speedup", "d_co2_pct", "co2_factor", "d_params_pct",
          "d_size_pct")


def _deltas(row: pd.Series, base: pd.Series | None, metric: str) -> dict[str, float]:
    if base is None:
        return dict.fromkeys(DELTAS, float("nan"))
    get = lambda r, c: r.get(c, float("nan"))  # noqa: E731 - a column may be absent entirely
    return {
        "d_metric_pp": (get(row, metric) - get(base, metric)) * 100,
        "d_train_pct": (_ratio(get(row, TIME), get(base, TIME)) - 1) * 100,
        "speedup": _ratio(get(base, TIME), get(row, TIME)),
        "d_co2_pct": (_ratio(get(row, CO2), get(base, CO2)) - 1) * 100,
        "co2_factor": _ratio(get(base, CO2), get(row, CO2)),
        "d_params_pct": (_ratio(get(row, PARAMS), get(base, PARAMS)) - 1) * 100,
        "d_size_pct": (_ratio(get(row, SIZE), get(base, SIZE)) - 1) * 100,
    }


def compare(runs: pd.DataFrame, metric: str | None = None, by: list[str] | None = None,
            baseline: list[str] | None = None,
            margin: float = stats.DEFAULT_MARGIN_PP) -> Comparison:
    """The whole comparison: keys, aggregated table and (when there is a baseline) deltas with
    a paired interval, p-value and verdict against the non-inferiority ``margin`` (pp)."""
    if not (runs["status"] == "completed").any():
        first = runs.iloc[0]
        raise EffbenchError(f"none of the {len(runs)} runs completed (e.g. {first['run_dir']}: "
                            f"{first['error']}); fix that error and run them again.")
    metric = headline_metric(runs, metric)
    keys, added = varying_keys(runs, by)
    base = resolve_baseline(runs, baseline, keys)
    keys += [k for k in base if k not in keys]
    table = aggregate(runs, keys, metric)
    if base:
        table = add_deltas(runs, table, keys, metric, base)
    table = with_setup(runs, table, keys)  # precision / device per row, deltas that mix them
    table, paired = stats.add_intervals(runs, table, keys, metric, margin,
                                        lambda r: label(r, keys))
    common = {k: runs[k].iloc[0] for k in runs.attrs["config_keys"]
              if k not in keys and k != "seed" and runs[k].nunique() == 1}
    return Comparison(runs=runs, table=table, keys=keys, metric=metric, baseline=base,
                      common=common, added=added, margin=margin, paired=paired)


def label(row: pd.Series | dict, keys: list[str]) -> str:
    """``a+b, lr=0.0001``: group choices by value, overrides as short ``key=value``."""
    shorts = [k.rsplit(".", 1)[-1] for k in keys]
    parts = []
    for key, short in zip(keys, shorts):
        name = key if shorts.count(short) > 1 else short
        parts.append(str(row[key]) if key in CHOICE_KEYS else f"{name}={row[key]}")
    return ", ".join(parts)


def study_lines(comp: Comparison) -> list[str]:
    """The studies' sentence per compared value: mean (± std over configurations) of the deltas,
    e.g. ``a vs base: test/acc +0.27 pp (±3.48), time −87.8 % (±5.6), …``."""
    if not comp.baseline or "d_metric_pp" not in comp.table:
        return []
    t = comp.table[~comp.table["baseline"] & comp.table["d_metric_pp"].notna()]
    bkeys = list(comp.baseline)
    base_name = ", ".join(comp.baseline.values())
    lines = []
    for values, grp in t.groupby(bkeys, sort=False):
        name = ", ".join(values if isinstance(values, tuple) else (values,))
        co2_unit = " %*" if grp["d_co2_estimated"].any() else " %"  # * as in the table
        parts = [_mean_std(grp["d_metric_pp"], f"{comp.metric} ", " pp", signed=True),
                 _mean_std(grp["d_train_pct"], "training time ", " %", signed=True),
                 _mean_std(grp["speedup"], "speed-up ×", "", signed=False),
                 _mean_std(grp["d_co2_pct"], "CO₂ ", co2_unit, signed=True),
                 _mean_std(grp["d_params_pct"], "trainable params ", " %", signed=True)]
        n = f"{len(grp)} configuration{'s' * (len(grp) != 1)}"
        parts[0] += _interval_of(comp, grp)
        lines.append(f"{name} vs {base_name} ({n}): " + ", ".join(p for p in parts if p)
                     + _verdict_of(comp, grp))
    return lines


def _pooled(comp: Comparison, grp: pd.DataFrame) -> stats.Paired | None:
    return stats.pooled([comp.paired[i] for i in grp.index if i in comp.paired], comp.margin)


def _interval_of(comp: Comparison, grp: pd.DataFrame) -> str:
    """`` [−1.60, +0.80]``: the 95 % interval of the mean difference (pooled over the rows)."""
    pooled = _pooled(comp, grp)
    return f" [{stats.pp(pooled.lo)}, {stats.pp(pooled.hi)}]" if pooled else ""


def _verdict_of(comp: Comparison, grp: pd.DataFrame) -> str:
    """`` … non-inferior at 1 pp (McNemar exact p = 0.52; 270 samples, 1 vs 1 seeds)``, or why
    there is no interval."""
    pooled = _pooled(comp, grp)
    if pooled is None:
        whys = [comp.paired[i].why for i in grp.index if i in comp.paired]
        return f" … no interval: {whys[0]}" if whys else ""
    seeds = f"{pooled.n_seeds[0]} vs {pooled.n_seeds[1]} seeds"
    return (f" … {pooled.verdict} at {comp.margin:g} pp ({pooled.test} p = "
            f"{pooled.p_value:.2g}; {pooled.n_samples} test samples, {seeds})")


def _mean_std(values: pd.Series, prefix: str, unit: str, signed: bool) -> str:
    values = values.dropna()
    if values.empty:
        return ""
    text = f"{values.mean():+.2f}" if signed else f"{values.mean():.2f}"
    text = text.replace("-", "−")
    spread = f" (±{values.std():.2f})" if len(values) > 1 else ""
    return f"{prefix}{text}{unit}{spread}"
