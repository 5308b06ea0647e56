"""The paired comparison (effbench.compare.stats): numbers a wrong implementation gets wrong."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from effbench.compare import stats
from effbench.metrics import build_metrics
from effbench.predictions import Predictions


def preds(correct: np.ndarray, labels: np.ndarray | None = None, n_classes: int = 2,
          ids_sha: str = "same", conf: float = 0.9) -> Predictions:
    """Predictions that are right exactly where ``correct`` is True."""
    n = len(correct)
    labels = np.zeros(n, dtype=np.int64) if labels is None else labels
    wrong = (labels + 1) % n_classes
    predicted = np.where(correct, labels, wrong)
    probs = np.full((n, n_classes), (1 - conf) / (n_classes - 1), dtype=np.float32)
    probs[np.arange(n), predicted] = conf
    return Predictions(ids=np.arange(n).astype(str), labels=labels, probs=probs,
                       task="multiclass", class_names=[str(c) for c in range(n_classes)],
                       ids_sha256=ids_sha, sha256="")


def one(p: Predictions, seed: str = "0") -> dict[str, list[Predictions]]:
    return {seed: [p]}


@pytest.fixture
def model() -> Predictions:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 1000)
    return preds(rng.random(1000) < 0.9, labels, n_classes=3)


@pytest.mark.parametrize("margin", [0.1, 1.0, 5.0])
def test_identical_predictions_are_non_inferior_at_any_margin(model: Predictions,
                                                              margin: float) -> None:
    res = stats.compare_sides(one(model), one(model), "test/acc", margin)
    assert res.delta == 0 and res.lo <= 0 <= res.hi
    assert res.verdict == "non-inferior" and res.p_value == 1.0
    assert res.n_samples == 1000 and res.n_seeds == (1, 1) and res.test == "McNemar exact"


def test_ten_percent_of_correct_answers_flipped_is_inferior(model: Predictions) -> None:
    correct = model.probs.argmax(1) == model.labels
    flip = np.flatnonzero(correct)[::10]  # 10 % of the correct answers
    worse = correct.copy()
    worse[flip] = False
    res = stats.compare_sides(one(preds(worse, model.labels, 3)), one(model), "test/acc", 1.0)
    assert res.delta == pytest.approx(-len(flip) / 10, abs=1e-9)  # pp
    assert res.hi < -1.0 and res.verdict == "inferior" and res.p_value < 0.01


def test_interval_covers_a_known_difference() -> None:
    """200 simulated test sets of 1000 samples, each right with probability 0.85 (A) vs 0.80 (B),
    mostly through a shared per-sample difficulty (paired models): the 95 % interval covers the
    true +5 pp in at least 93 % of them — and not in nearly all, which an interval that ignored
    the pairing (far too wide here: it covers 199-200 of 200) would. Seeded: no flakiness."""
    rng = np.random.default_rng(0)
    n, covered = 1000, 0
    for _ in range(200):
        u = rng.random(n)  # difficulty: A is right below 0.85, B below 0.80 ...
        own = rng.random(n) < 0.3  # ... except on 30 % of the samples, independently
        a = np.where(own, rng.random(n) < 0.85, u < 0.85)
        b = np.where(own, rng.random(n) < 0.80, u < 0.80)
        side_a, side_b = stats.side_of(one(preds(a)), "a"), stats.side_of(one(preds(b)), "b")
        _, reps = stats.bootstrap(side_a, side_b, "probs", "acc", n, resamples=1000,
                                  seed=int(rng.integers(1 << 30)))
        lo, hi = stats.interval(reps)
        covered += lo <= 5.0 <= hi
    assert 186 <= covered <= 197, covered


def test_mcnemar_matches_the_exact_binomial_on_a_fixed_table() -> None:
    # 2×2 table [[80, 12], [3, 5]]: 12 right only by A, 3 right only by B.
    a = np.array([True] * 80 + [True] * 12 + [False] * 3 + [False] * 5)
    b = np.array([True] * 80 + [False] * 12 + [True] * 3 + [False] * 5)
    exact = 2 * sum(math.comb(15, k) for k in range(4)) / 2**15  # statsmodels mcnemar(exact)
    assert stats.mcnemar_exact(a, b) == pytest.approx(exact, rel=1e-12)
    assert stats.mcnemar_exact(a, b) == pytest.approx(binomtest(3, 15, 0.5).pvalue, rel=1e-12)
    assert exact == pytest.approx(0.03515625)


def test_different_test_ids_give_no_interval_and_one_sentence(model: Predictions) -> None:
    other = preds(model.probs.argmax(1) == model.labels, model.labels, 3, ids_sha="other")
    res = stats.compare_sides(one(model), one(other), "test/acc", 1.0, ("partial", "base"))
    assert not res.has_interval and math.isnan(res.lo) and res.verdict == ""
    assert "not tested on the same images" in res.why and "\n" not in res.why
    assert res.sentence().startswith("no interval: partial and base were not tested")


def test_metric_without_predictions_formula_is_said() -> None:
    res = stats.compare_sides({}, {}, "test/loss", 1.0)
    assert "test/loss is not computed from the predictions" in res.why


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_weighted_metrics_at_unit_weights_equal_torchmetrics(task: str) -> None:
    rng = np.random.default_rng(2)
    n, c = 300, 4
    logits = torch.from_numpy(rng.normal(size=(n, c))).float()
    if task == "multilabel":
        y = torch.from_numpy(rng.random((n, c)) < 0.3).long()
        probs = torch.sigmoid(logits)
    else:
        y = torch.from_numpy(rng.integers(0, c, n))
        probs = torch.softmax(logits, -1)
        logits[y == 1, 1] += 1.0  # some skill, so the metrics are not all at chance
    metrics = build_metrics(task, c)
    metrics.update(logits, y)
    expected = {k: float(v) for k, v in metrics.compute().items() if v.ndim == 0}
    probs = torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, -1)
    for name in stats.METRICS:
        got = stats.weighted_metric(name, probs.numpy(), y.numpy(), task, np.ones((1, n)))
        assert got[0] == pytest.approx(expected[name], abs=1e-5), name


def test_weights_are_resampled_counts() -> None:
    w = stats.sample_weights(np.random.default_rng(0), 7, 50)
    assert w.shape == (7, 50) and (w.sum(1) == 50).all()


def test_seeds_widen_the_interval_and_repeats_count_once() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 500)
    base = one(preds(rng.random(500) < 0.8, labels))
    seeds = {str(s): [preds(rng.random(500) < 0.8 + 0.04 * s, labels)] for s in range(3)}
    wide = stats.compare_sides(seeds, base, "test/acc", 1.0)
    narrow = stats.compare_sides({"0": seeds["0"]}, base, "test/acc", 1.0)
    assert wide.n_seeds == (3, 1) and wide.test == "bootstrap"
    assert wide.hi - wide.lo > narrow.hi - narrow.lo
    repeated = stats.compare_sides({"0": seeds["0"] * 2}, base, "test/acc", 1.0)
    assert repeated.n_seeds == (1, 1) and "repeats" in " ".join(repeated.notes)
    same = stats.compare_sides({"0": seeds["0"], "1": seeds["0"]}, base, "test/acc", 1.0)
    assert same.n_seeds == (1, 1) and "identical predictions" in " ".join(same.notes)


def test_same_runs_give_the_same_interval(model: Predictions) -> None:
    other = preds(np.random.default_rng(5).random(1000) < 0.88, model.labels, 3)
    first = stats.compare_sides(one(other), one(model), "test/auroc_macro", 1.0)
    again = stats.compare_sides(one(other), one(model), "test/auroc_macro", 1.0)
    assert (first.lo, first.hi, first.p_value) == (again.lo, again.hi, again.p_value)
    assert first.resamples == stats.RESAMPLES and first.seed == stats.SEED


@pytest.mark.parametrize(("lo", "hi", "expected"), [
    (0.2, 1.0, "superior"), (-0.5, 0.5, "non-inferior"), (-3.0, -1.5, "inferior"),
    (-2.0, 0.5, "inconclusive"), (-1.5, -0.5, "inconclusive")])
def test_verdict_against_the_margin(lo: float, hi: float, expected: str) -> None:
    assert stats.verdict(lo, hi, 1.0) == expected
