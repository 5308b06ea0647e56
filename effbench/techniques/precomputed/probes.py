"""Probes on the cached features: a k-NN classifier and a logistic regression (scikit-learn).

What they are for: one extraction then says how good the features themselves are, several ways,
in seconds — DINOv2's and CLIP_benchmark's k-NN and linear evaluations — next to the trained head.
Both fit on the train split's cached features and are scored on val and test with the run's own
metric definitions (``effbench.metrics.build_metrics``: acc, f1_macro, auroc_macro; multilabel
too), so ``test/acc`` of a probe and of the head are the same number computed the same way.

The features are what the head reads: the backbone's last stage ends with pooling + flatten, so
each cached row is already one ``D``-vector per image (nothing left to pool).

- ``knn``: ``KNeighborsClassifier`` with cosine distance, votes weighted by 1 / distance, on the
  raw features (cosine is scale-free per vector). Multilabel: sklearn's multi-output k-NN (the
  neighbours vote per label).
- ``logreg``: ``StandardScaler`` → L2 ``LogisticRegression`` (lbfgs, ``C``), fitted on the train
  split only. Multilabel: one binary model per label; a label constant in the training split gets
  a constant predictor (its training prior), since no classifier can be fitted on one class.

Both are deterministic (brute-force neighbours; lbfgs has no random state), so the same features
and options give the same numbers whether the features were just extracted or loaded. The jobs of
a sweep that share a cache entry (``-m``, ``hydra/launcher=batched_heads``) run in one process:
the first one fits the probes and the others record its results (``reused_from``) instead of
fitting the same models on the same features again.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import ListConfig

from effbench.errors import EffbenchError
from effbench.metrics import build_metrics, split_scalars
from effbench.task import is_multilabel
from effbench.techniques.precomputed.cache import digest

log = logging.getLogger(__name__)

PROBES = ("knn", "logreg")
Split = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ProbeOptions:
    """``strategy.precomputed.probes`` and the probes' own options."""

    names: tuple[str, ...] = ()
    knn_k: int = 20
    logreg_c: float = 1.0
    logreg_max_iter: int = 1000


def as_names(probes: Any) -> Any:
    """The probe names as a list (one name given alone counts as a list of one); any other value
    is returned as it is, for :func:`check` to refuse."""
    if probes is None:
        return []
    if isinstance(probes, str):
        return [probes]
    if isinstance(probes, (list, tuple, ListConfig)):
        return list(probes)
    return probes


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check(probes: Any, knn_k: Any, logreg_c: Any, logreg_max_iter: Any) -> ProbeOptions:
    """The options, or an EffbenchError that names the bad value and the fix."""
    ok = isinstance(probes, list) and all(isinstance(p, str) for p in probes)
    unknown = [p for p in probes if p not in PROBES] if ok else probes
    if not ok or unknown or len(set(probes)) != len(probes):
        shown = "[" + ",".join(map(str, probes)) + "]" if isinstance(probes, list) else probes
        what = (f"{', '.join(map(repr, unknown))} is not a probe; " if ok and unknown
                else "a probe is named twice; " if ok else "")
        raise EffbenchError(f"invalid value strategy.precomputed.probes={shown}: {what}use a "
                            f"list of {', '.join(PROBES)} such as "
                            "strategy.precomputed.probes=[knn,logreg], or [] for none.")
    if not (_whole(knn_k) and knn_k >= 1):
        raise EffbenchError(f"invalid value strategy.precomputed.probe_knn_k={knn_k!r}: use a "
                            "number of neighbours of 1 or more such as "
                            "strategy.precomputed.probe_knn_k=20.")
    if not (isinstance(logreg_c, (int, float)) and not isinstance(logreg_c, bool)
            and math.isfinite(logreg_c) and logreg_c > 0):
        raise EffbenchError(f"invalid value strategy.precomputed.probe_logreg_c={logreg_c!r}: use "
                            "a positive inverse regularisation strength such as "
                            "strategy.precomputed.probe_logreg_c=1.0.")
    if not (_whole(logreg_max_iter) and logreg_max_iter >= 1):
        raise EffbenchError("invalid value strategy.precomputed.probe_logreg_max_iter="
                            f"{logreg_max_iter!r}: use 1 or more iterations such as "
                            "strategy.precomputed.probe_logreg_max_iter=1000.")
    return ProbeOptions(tuple(probes), knn_k, float(logreg_c), logreg_max_iter)


# -- the probes: fit on train, class probabilities (N, C) for any split --------------------------
@dataclass
class Fitted:
    """A fitted probe: its class probabilities and what to record about the fit."""

    proba: Callable[[np.ndarray], np.ndarray]
    facts: dict[str, Any]


def _columns(probas: np.ndarray | list[np.ndarray], classes: Any, num_classes: int,
             multilabel: bool) -> np.ndarray:
    """sklearn's ``predict_proba`` as an (N, C) matrix: multiclass columns placed at their class
    (a class absent from the training split scores 0), multilabel the probability of 1 per label
    (sklearn gives one (N, 2) array per label, (N, 1) for a label constant in training)."""
    if multilabel:
        return np.stack([p[:, list(c).index(1)] if 1 in c else np.zeros(len(p))
                         for p, c in zip(probas, classes)], axis=1)
    out = np.zeros((len(probas), num_classes))
    out[:, np.asarray(classes, dtype=int)] = probas
    return out


def fit_knn(x: np.ndarray, y: np.ndarray, num_classes: int, multilabel: bool,
            options: ProbeOptions) -> Fitted:
    # scikit-learn's estimators are imported where a probe is fitted: probes are off by default,
    # and sklearn.neighbors and linear_model cost 0.3–0.4 s of every precomputed run's set-up
    # otherwise (measured on the 2-core EPYC), the first job of a sweep included.
    from sklearn.neighbors import KNeighborsClassifier

    # k above the training set's size would be an error in sklearn; all neighbours vote then.
    k = min(options.knn_k, len(x))
    model = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance",
                                 algorithm="brute").fit(x, y)
    classes = model.classes_
    return Fitted(lambda v: _columns(model.predict_proba(v), classes, num_classes, multilabel),
                  {"k": options.knn_k, "k_used": k, "metric": "cosine", "weights": "distance",
                   "standardized": False})


def fit_logreg(x: np.ndarray, y: np.ndarray, num_classes: int, multilabel: bool,
               options: ProbeOptions) -> Fitted:
    from sklearn.dummy import DummyClassifier  # here, not at the top: see fit_knn
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def model() -> Any:
        return make_pipeline(StandardScaler(), LogisticRegression(
            C=options.logreg_c, max_iter=options.logreg_max_iter, solver="lbfgs"))

    with warnings.catch_warnings():
        # Convergence is recorded (and logged) below instead of a warning per label.
        warnings.simplefilter("ignore", ConvergenceWarning)
        if multilabel:
            models = [(model() if len(np.unique(col)) > 1 else DummyClassifier(strategy="prior"))
                      .fit(x, col) for col in y.T]
        else:
            models = [model().fit(x, y)]
    iters = [int(np.max(m[-1].n_iter_)) for m in models if not isinstance(m, DummyClassifier)]
    converged = all(i < options.logreg_max_iter for i in iters)
    if not converged:
        log.warning("the logreg probe did not converge in %d iterations; raise "
                    "strategy.precomputed.probe_logreg_max_iter", options.logreg_max_iter)

    def proba(v: np.ndarray) -> np.ndarray:
        if multilabel:
            return _columns([m.predict_proba(v) for m in models], [m.classes_ for m in models],
                            num_classes, True)
        return _columns(models[0].predict_proba(v), models[0].classes_, num_classes, False)

    return Fitted(proba, {"C": options.logreg_c, "max_iter": options.logreg_max_iter,
                          "solver": "lbfgs", "standardized": True, "per_label": multilabel,
                          "constant_labels": len(models) - len(iters) if multilabel else 0,
                          "iterations": max(iters, default=0), "converged": converged})


FIT: dict[str, Callable[[np.ndarray, np.ndarray, int, bool, ProbeOptions], Fitted]] = {
    "knn": fit_knn, "logreg": fit_logreg}


# -- scoring with the run's metrics ---------------------------------------------------------------
def split_metrics(proba: np.ndarray, y: torch.Tensor, task: str, class_names: list[str],
                  prefix: str) -> dict[str, float]:
    """The run's scalar metrics (``build_metrics``) of class probabilities against ``y``."""
    metrics = build_metrics(task, len(class_names))
    target = y.long() if is_multilabel(task) else y
    metrics.update(torch.as_tensor(proba, dtype=torch.float32), target)
    scalars, _ = split_scalars(metrics.compute(), prefix, class_names)
    return scalars


def probe(name: str, feats: dict[str, Split], task: str, class_names: list[str],
          options: ProbeOptions) -> dict[str, Any]:
    """Fit probe ``name`` on ``feats["train"]``, score it on val and test."""
    multilabel = is_multilabel(task)
    x, y = feats["train"]
    if len(y) == 0:
        raise EffbenchError("the probes need training features, and the train split is empty.")
    start = time.perf_counter()
    fitted = FIT[name](_vectors(x), y.numpy().astype(int), len(class_names), multilabel, options)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics: dict[str, float] = {}
    for split in ("val", "test"):
        xs, ys = feats.get(split, (x[:0], y[:0]))
        if len(ys):
            metrics.update(split_metrics(fitted.proba(_vectors(xs)), ys, task, class_names,
                                         split))
    return {"metrics": metrics, "fit_s": fit_s, "predict_s": time.perf_counter() - start,
            "train_vectors": len(y), "test_vectors": len(feats.get("test", (x[:0], y[:0]))[1]),
            "options": fitted.facts, "reused_from": None}


def _vectors(x: torch.Tensor) -> np.ndarray:
    if x.ndim != 2:  # the cache holds pooled (N, D) features: anything else is a bug upstream
        raise EffbenchError(f"the probes expect cached features of shape (N, D), got "
                            f"{tuple(x.shape)}.")
    return x.detach().float().cpu().numpy()


# Probe results of this process by what they were computed from (see the module docstring).
_DONE: dict[str, dict[str, Any]] = {}


def run_probes(feats: dict[str, Split], task: str, class_names: list[str],
               options: ProbeOptions, source: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Every requested probe's record; ``source`` names the features (the cache's content keys
    and the test rows used), so a later job on the same features reuses the records."""
    out: dict[str, Any] = {}
    for name in options.names:
        key = digest(json.dumps({**source, "probe": name, "task": task,
                                 "options": asdict(options) | {"names": None}},
                                sort_keys=True, default=str))
        if key not in _DONE:
            _DONE[key] = {**probe(name, feats, task, class_names, options),
                          "computed_by": run_dir}
            out[name] = copy.deepcopy(_DONE[key])
        else:
            out[name] = {**copy.deepcopy(_DONE[key]), "reused_from": _DONE[key]["computed_by"]}
    return out


def headline(records: dict[str, Any], task: str) -> str | None:
    """``probes: knn test acc 0.970, logreg 0.981 (0.4 s)`` (auroc_macro for multilabel data)."""
    if not records:
        return None
    metric = "auroc_macro" if is_multilabel(task) else "acc"
    parts = [f"{name} {'test ' + metric + ' ' if i == 0 else ''}"
             f"{_fmt(r['metrics'].get('test/' + metric))}"
             for i, (name, r) in enumerate(records.items())]
    seconds = sum(r["fit_s"] + r["predict_s"] for r in records.values())
    by = {r.get("reused_from") for r in records.values()}
    if len(by) == 1 and None not in by:  # every probe fitted by an earlier job of the sweep
        return f"probes: {', '.join(parts)} (reused: fitted in {seconds:.1f} s by {by.pop()})"
    return f"probes: {', '.join(parts)} ({seconds:.1f} s)"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
