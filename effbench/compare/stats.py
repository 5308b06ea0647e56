"""Paired comparison of two configurations on the same test samples: the difference in a test
metric with a 95 % bootstrap interval, a p-value and a verdict against a non-inferiority margin.

Each run's ``predictions.npz`` (``effbench.predictions``) gives, per test sample, the labels and
the probabilities; the metric is recomputed from them under bootstrap weights.

- **Pairing.** Both sides are evaluated on the *same* resampled test sets (one draw of sample
  weights serves every run of both sides), so what the samples share — easy and hard images —
  cancels out of the difference. Runs tested on other images (a different
  ``test_ids_sha256``) are never paired: no interval, and a sentence says why.
- **Two levels.** With several seeds on a side, each resample also redraws that side's seeds
  with replacement (rliable's hierarchical bootstrap): the interval covers seed-to-seed variation
  as well as the finite test set. Runs of one seed are repeats (averaged, counted once); seeds
  whose predictions are identical are one model (counted once, and said).
- **Test.** Accuracy with one model per side: McNemar's exact test (a binomial test on the
  discordant pairs, ``scipy.stats.binomtest``). Otherwise (AUROC, macro F1, several seeds) the
  bootstrap p-value of a zero difference.
- **Verdict** of ``Δ = technique − baseline`` against the margin ``m`` (pp): ``superior`` when the
  whole interval is above 0, ``non-inferior`` when it is above −m, ``inferior`` when it is below
  −m, ``inconclusive`` when it straddles −m.

``scipy.stats.bootstrap`` resamples the observations of one data set; here one draw must reweight
the same test samples for every run of both sides and redraw seeds per side, so the resampling is
written here (vectorised: the metrics are computed from weighted counts, every resample at once).
The resample count and the seed are fixed (:data:`RESAMPLES`, :data:`SEED`), so the same runs
always give the same interval.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from effbench.predictions import Predictions, PredictionsError, read
from effbench.task import is_multilabel

DEFAULT_MARGIN_PP = 1.0
RESAMPLES = 2000
SEED = 20240521
CONFIDENCE = 0.95
CHUNK = 250  # resamples per weight matrix (memory: CHUNK × test samples)
# Test metrics computed from predictions: ``test/<name>`` (``int8/test/<name>``: a converted int8
# model's).
METRICS = ("acc", "f1_macro", "auroc_macro")
VERDICTS = ("superior", "non-inferior", "inconclusive", "inferior")


@dataclass
class Paired:
    """One comparison: ``delta``, ``lo``, ``hi`` in percentage points (technique − baseline)."""

    metric: str
    margin_pp: float
    delta: float = float("nan")
    lo: float = float("nan")
    hi: float = float("nan")
    p_value: float = float("nan")
    test: str = ""
    verdict: str = ""
    n_samples: int = 0
    n_seeds: tuple[int, int] = (0, 0)
    why: str = ""  # why there is no interval ("" when there is one)
    notes: list[str] = field(default_factory=list)  # repeats, seeds that change nothing
    replicates: np.ndarray | None = None  # the bootstrap differences (pp), for pooling
    resamples: int = RESAMPLES
    seed: int = SEED

    @property
    def has_interval(self) -> bool:
        return not self.why

    def sentence(self) -> str:
        """``test/acc −0.40 pp [−1.60, +0.80], McNemar p = 0.52: non-inferior at 1 pp (270
        samples, 1 vs 1 seeds)`` or ``no interval: why``."""
        if self.why:
            return f"no interval: {self.why}"
        return (f"{self.metric} {pp(self.delta)} pp [{pp(self.lo)}, {pp(self.hi)}], "
                f"{self.test} p = {self.p_value:.2g}: {self.verdict} at {self.margin_pp:g} pp "
                f"({self.n_samples} samples, {self.n_seeds[0]} vs {self.n_seeds[1]} "
                f"seed{'s' * (self.n_seeds != (1, 1))})")


def pp(value: float) -> str:
    """``+0.80`` / ``−1.60`` (a true minus sign, as the tables print it)."""
    return f"{value:+.2f}".replace("-", "−")


def verdict(lo: float, hi: float, margin_pp: float) -> str:
    if lo > 0:
        return "superior"
    if lo > -margin_pp:
        return "non-inferior"
    if hi < -margin_pp:
        return "inferior"
    return "inconclusive"


def metric_source(metric: str) -> tuple[str, str] | None:
    """``(array, metric)`` for a metric computable from predictions, else None."""
    for prefix, array in (("test/", "probs"), ("int8/test/", "int8_probs")):
        name = metric[len(prefix):] if metric.startswith(prefix) else None
        if name in METRICS:
            return array, name
    return None


# -- metrics of weighted samples: ``w`` is (B, N), one row of sample weights per resample -------
def weighted_metric(name: str, probs: np.ndarray, labels: np.ndarray, task: str,
                    w: np.ndarray) -> np.ndarray:
    """The metric under each row of weights (all ones: the metric itself, as torchmetrics gives
    it: micro accuracy, macro F1 over the classes that occur, macro one-vs-rest AUROC)."""
    if name == "auroc_macro":
        return _auroc_macro(probs, labels, task, w)
    if is_multilabel(task):
        pred, truth = probs > 0.5, labels.astype(bool)
    else:
        n_classes = probs.shape[1]
        pred = np.eye(n_classes, dtype=bool)[probs.argmax(1)]
        truth = np.eye(n_classes, dtype=bool)[labels]
    if name == "acc":
        per_sample = (pred == truth).mean(1) if is_multilabel(task) else (pred & truth).any(1)
        return (w @ per_sample.astype(w.dtype)) / w.sum(1)
    tp = w @ (pred & truth).astype(w.dtype)
    denom = w @ pred.astype(w.dtype) + w @ truth.astype(w.dtype)
    present = denom > 0  # a class neither predicted nor present counts for nothing
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=present)
    return f1.sum(1) / np.maximum(present.sum(1), 1)


def _auroc_macro(probs: np.ndarray, labels: np.ndarray, task: str, w: np.ndarray) -> np.ndarray:
    """Mean over classes of the weighted Mann–Whitney AUROC (ties count one half)."""
    truth = labels.astype(bool) if is_multilabel(task) else \
        np.eye(probs.shape[1], dtype=bool)[labels]
    out = []
    for c in range(probs.shape[1]):
        order = np.argsort(probs[:, c], kind="stable")
        scores, pos = probs[order, c], truth[order, c]
        starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])  # groups of ties
        ws = w[:, order]
        pos_g = np.add.reduceat(ws * pos, starts, axis=1)
        neg_g = np.add.reduceat(ws * ~pos, starts, axis=1)
        below = np.cumsum(neg_g, axis=1) - neg_g
        num = (pos_g * (below + 0.5 * neg_g)).sum(1)
        den = pos_g.sum(1) * neg_g.sum(1)
        out.append(np.where(den > 0, num / np.where(den > 0, den, 1), np.nan))
    return np.nanmean(np.stack(out), axis=0) if out else np.full(len(w), np.nan)


def sample_weights(rng: np.random.Generator, b: int, n: int) -> np.ndarray:
    """(b, n) counts of each sample in b resamples of n with replacement."""
    idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


# -- one side: its seeds, each a list of repeats ------------------------------------------------
@dataclass
class Side:
    """A configuration's runs by seed (runs of one seed are repeats)."""

    seeds: list[list[Predictions]]
    notes: list[str] = field(default_factory=list)


def side_of(preds_by_seed: dict[str, list[Predictions]], name: str) -> Side:
    """Repeats flagged, and seeds whose predictions are identical merged into one."""
    notes, groups, kept_names = [], {}, {}
    for seed, runs in preds_by_seed.items():
        if len(runs) > 1:
            notes.append(f"{name}: {len(runs)} runs of seed {seed} are repeats, counted as one "
                         "seed")
        key = tuple(sorted({hashlib.sha256(p.probs.tobytes()).hexdigest() for p in runs}))
        groups.setdefault(key, runs)
        kept_names.setdefault(key, []).append(seed)
    same = [seeds for seeds in kept_names.values() if len(seeds) > 1]
    for seeds in same:
        notes.append(f"{name}: seeds {', '.join(seeds)} gave identical predictions — the seed "
                     "changes nothing these runs depend on — counted as one seed")
    return Side(list(groups.values()), notes)


def _side_metric(side: Side, array: str, name: str, w: np.ndarray) -> np.ndarray:
    """(seeds, B): per seed the mean over its repeats."""
    return np.stack([np.mean([weighted_metric(name, getattr(p, array), p.labels, p.task, w)
                              for p in runs], axis=0) for runs in side.seeds])


def _seed_mean(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mean over seeds redrawn with replacement per resample (one seed: itself)."""
    k, b = values.shape
    if k == 1:
        return values[0]
    counts = sample_weights(rng, b, k)
    return (counts * values.T).sum(1) / k


def bootstrap(a: Side, b: Side | None, array: str, name: str, n: int,
              resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, np.ndarray]:
    """``(estimate, replicates)`` of mean(a) − mean(b) (or mean(a) without ``b``), pp."""
    ones = np.ones((1, n))
    est = _side_metric(a, array, name, ones).mean()
    if b is not None:
        est -= _side_metric(b, "probs", name, ones).mean()
    # Two generators: the sample weights depend on the seed and n only, so every comparison on
    # the same test set sees the same resampled test sets (pooling rows keeps the pairing).
    rng_samples, rng_seeds = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    reps = []
    for start in range(0, resamples, CHUNK):
        w = sample_weights(rng_samples, min(CHUNK, resamples - start), n)
        rep = _seed_mean(_side_metric(a, array, name, w), rng_seeds)
        if b is not None:
            rep = rep - _seed_mean(_side_metric(b, "probs", name, w), rng_seeds)
        reps.append(rep)
    return float(est) * 100, np.concatenate(reps) * 100


def interval(replicates: np.ndarray) -> tuple[float, float]:
    tail = (1 - CONFIDENCE) / 2 * 100
    lo, hi = np.nanpercentile(replicates, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_p(estimate: float, replicates: np.ndarray) -> float:
    """Two-sided p of a zero difference: how often the centred replicates reach |estimate|."""
    reps = replicates[~np.isnan(replicates)]
    extreme = np.sum(np.abs(reps - estimate) >= abs(estimate) - 1e-12)
    return float((1 + extreme) / (1 + len(reps)))


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """McNemar's exact test: the discordant pairs are binomial(b + c, ½) under no difference."""
    b = int(np.sum(correct_a & ~correct_b))
    c = int(np.sum(~correct_a & correct_b))
    return 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)


def compare_sides(a: dict[str, list[Predictions]], b: dict[str, list[Predictions]],
                  metric: str, margin_pp: float = DEFAULT_MARGIN_PP,
                  names: tuple[str, str] = ("technique", "baseline")) -> Paired:
    """The paired comparison of side ``a`` against side ``b`` (``{seed: [predictions]}``)."""
    out = Paired(metric=metric, margin_pp=margin_pp)
    source = metric_source(metric)
    if source is None:
        out.why = (f"{metric} is not computed from the predictions; the intervals are for "
                   f"{', '.join(f'test/{m}' for m in METRICS)}")
        return out
    array, name = source
    runs = [p for side in (a, b) for ps in side.values() for p in ps]
    if array == "int8_probs" and any(p.int8_probs is None for ps in a.values() for p in ps):
        out.why = f"{names[0]} has no int8 predictions ({metric} is a converted int8 model's)"
        return out
    if len({p.ids_sha256 for p in runs}) > 1:
        out.why = (f"{names[0]} and {names[1]} were not tested on the same images in the same "
                   "order (their test_ids_sha256 differ: another dataset, split or sample cap)")
        return out
    side_a, side_b = side_of(a, names[0]), side_of(b, names[1])
    out.notes = side_a.notes + side_b.notes
    n = len(runs[0].labels)
    out.delta, reps = bootstrap(side_a, side_b, array, name, n)
    out.lo, out.hi = interval(reps)
    out.replicates, out.n_samples = reps, n
    out.n_seeds = (len(side_a.seeds), len(side_b.seeds))
    single = out.n_seeds == (1, 1) and len(side_a.seeds[0]) == len(side_b.seeds[0]) == 1
    if name == "acc" and not is_multilabel(runs[0].task) and single:
        pa, pb = side_a.seeds[0][0], side_b.seeds[0][0]
        out.p_value = mcnemar_exact(getattr(pa, array).argmax(1) == pa.labels,
                                    pb.probs.argmax(1) == pb.labels)
        out.test = "McNemar exact"
    else:
        out.p_value, out.test = bootstrap_p(out.delta, reps), "bootstrap"
    out.verdict = verdict(out.lo, out.hi, margin_pp)
    return out


def metric_interval(a: dict[str, list[Predictions]], metric: str) -> tuple[float, float]:
    """95 % interval of one configuration's metric itself (fraction), for the Pareto plots."""
    source = metric_source(metric)
    runs = [p for ps in a.values() for p in ps]
    if source is None or not runs or len({p.ids_sha256 for p in runs}) > 1:
        return float("nan"), float("nan")
    if source[0] == "int8_probs" and any(p.int8_probs is None for p in runs):
        return float("nan"), float("nan")
    _, reps = bootstrap(side_of(a, ""), None, *source, len(runs[0].labels))
    lo, hi = interval(reps)
    return lo / 100, hi / 100


def pooled(results: Iterable[Paired], margin_pp: float) -> Paired | None:
    """Several configurations of one technique: the mean difference, its interval from the mean
    of their replicates (a stratified bootstrap: each configuration resampled on its own test
    set, the same draws where they share one), and the verdict of that interval."""
    with_interval = [r for r in results if r.has_interval and r.replicates is not None]
    if not with_interval:
        return None
    reps = np.mean([r.replicates for r in with_interval], axis=0)
    first = with_interval[0]
    out = Paired(metric=first.metric, margin_pp=margin_pp, test="bootstrap")
    out.delta = float(np.mean([r.delta for r in with_interval]))
    out.lo, out.hi = interval(reps)
    out.replicates = reps
    out.p_value = (first.p_value if len(with_interval) == 1 else bootstrap_p(out.delta, reps))
    out.test = first.test if len(with_interval) == 1 else "bootstrap"
    out.n_samples = sum(r.n_samples for r in with_interval)
    out.n_seeds = (sum(r.n_seeds[0] for r in with_interval),
                   sum(r.n_seeds[1] for r in with_interval))
    out.verdict = verdict(out.lo, out.hi, margin_pp)
    return out


# -- run dirs -----------------------------------------------------------------------------------
def load_predictions(run_dir: str | os.PathLike) -> Predictions:
    """A run's predictions, checked against the sha256 its summary recorded."""
    record = {}
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
        record = summary.get("predictions") or {} if isinstance(summary, dict) else {}
    except (OSError, ValueError):
        pass
    if isinstance(record, dict) and record.get("error"):
        raise PredictionsError(f"{Path(run_dir).name} kept no predictions ({record['error']})")
    return read(run_dir, record.get("sha256") if isinstance(record, dict) else None)


def seed_of(run_dir: str | os.PathLike) -> str:
    try:
        return str(json.loads((Path(run_dir) / "summary.json").read_text())["choices"]["seed"])
    except (OSError, ValueError, KeyError, TypeError):
        return str(run_dir)


def paired_comparison(run_dir_a: str | os.PathLike | list, run_dir_b: str | os.PathLike | list,
                      metric: str = "test/acc",
                      margin: float = DEFAULT_MARGIN_PP) -> Paired:
    """For notebooks: technique (``run_dir_a``: one run dir or a list, e.g. its seeds) against
    baseline (``run_dir_b``) on ``metric``, with the non-inferiority ``margin`` in percentage
    points. ``result.sentence()`` says it in one line; ``result.why`` says why there is no
    interval (missing predictions, different test images)."""
    sides = []
    for dirs in (run_dir_a, run_dir_b):
        dirs = [dirs] if isinstance(dirs, (str, os.PathLike)) else list(dirs)
        by_seed: dict[str, list[Predictions]] = {}
        for d in dirs:
            try:
                by_seed.setdefault(seed_of(d), []).append(load_predictions(d))
            except PredictionsError as err:
                return Paired(metric=metric, margin_pp=margin, why=str(err))
        sides.append(by_seed)
    return compare_sides(sides[0], sides[1], metric, margin)


# -- the comparison table ------------------------------------------------------------------------
COLUMNS = ("d_lo", "d_hi", "p_value", "p_test", "verdict", "margin", "n_samples", "n_seeds",
           "n_seeds_baseline", "no_interval", "seed_notes", "m_lo", "m_hi")
TEXT_COLUMNS = ("p_test", "verdict", "no_interval", "seed_notes")


def add_intervals(runs: pd.DataFrame, table: pd.DataFrame, keys: list[str], metric: str,
                  margin_pp: float, name_of: Callable[[pd.Series], str]
                  ) -> tuple[pd.DataFrame, dict[int, Paired]]:
    """Per row against its baseline row (``base_row``): :data:`COLUMNS` (``d_*`` in pp, ``m_*``
    the row's own metric interval as a fraction), and the :class:`Paired` results by row."""
    done = runs[runs["status"] == "completed"]
    loaded: dict[str, Predictions | str] = {}

    def side(row: pd.Series) -> dict[str, list[Predictions]] | str:
        mask = np.logical_and.reduce([done[k] == row[k] for k in keys])
        by_seed: dict[str, list[Predictions]] = {}
        for run_dir, seed in zip(done[mask]["run_dir"], done[mask]["seed"]):
            if run_dir not in loaded:
                try:
                    loaded[run_dir] = load_predictions(run_dir)
                except PredictionsError as err:
                    loaded[run_dir] = str(err)
            if isinstance(loaded[run_dir], str):
                return loaded[run_dir]
            by_seed.setdefault(str(seed), []).append(loaded[run_dir])
        return by_seed

    sides = {i: side(row) if row["n"] > 0 else "every run failed" for i, row in table.iterrows()}
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    paired: dict[int, Paired] = {}
    for i, row in table.iterrows():
        own = sides[i]
        lo, hi = metric_interval(own, metric) if isinstance(own, dict) else (np.nan, np.nan)
        base = row.get("base_row")
        res = None
        if not row.get("baseline", False) and base is not None and not pd.isna(base):
            j = int(base)
            names = (name_of(row), name_of(table.loc[j]))
            other = sides[j]
            if isinstance(own, str) or isinstance(other, str):
                res = Paired(metric=metric, margin_pp=margin_pp,
                             why=own if isinstance(own, str) else other)
            else:
                res = compare_sides(own, other, metric, margin_pp, names)
            paired[i] = res
        values = _cells(res) if res is not None else {
            **dict.fromkeys(COLUMNS[:-2], np.nan), **dict.fromkeys(TEXT_COLUMNS, "")}
        values.update(m_lo=lo, m_hi=hi)
        for c in COLUMNS:
            cols[c].append(values[c])
    return table.assign(**cols), paired


def _cells(r: Paired) -> dict[str, object]:
    return {"d_lo": r.lo, "d_hi": r.hi, "p_value": r.p_value, "p_test": r.test,
            "verdict": r.verdict, "margin": r.margin_pp,
            "n_samples": r.n_samples if r.has_interval else np.nan,
            "n_seeds": r.n_seeds[0] if r.has_interval else np.nan,
            "n_seeds_baseline": r.n_seeds[1] if r.has_interval else np.nan,
            "no_interval": r.why, "seed_notes": "; ".join(r.notes)}
