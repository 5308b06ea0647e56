"""``effbench-compare``: read many ``summary.json`` files, group, aggregate, compare, plot.

Modules: ``load`` (find and read summaries), ``group`` (varying keys, mean ± std over seeds,
baseline deltas), ``stats`` (paired intervals, tests and verdicts from the runs'
``predictions.npz``), ``table`` (terminal / Markdown / CSV), ``curves`` and ``plots`` (PNG),
``cli``, and ``hparams`` (TensorBoard HParams, called by every run).

For notebooks (see docs/compare.md)::

    from effbench.compare import load_runs, paired_comparison
    runs = load_runs(["outputs/multirun/2026-05-21_10-00-00"])   # one pandas row per run
    result = paired_comparison("outputs/.../1_<technique>_…", "outputs/.../0_<baseline>_…",
                               metric="test/acc", margin=1.0)
    print(result.sentence())   # test/acc −0.40 pp [−1.60, +0.80], McNemar exact p = 0.52: …
"""

from __future__ import annotations

from typing import Any

__all__ = ["compare", "load_runs", "paired_comparison"]


def __getattr__(name: str) -> Any:
    # Lazy: every run imports effbench.compare.hparams, which must not pull pandas and scipy.
    if name == "load_runs":
        from effbench.compare.load import load_runs

        return load_runs
    if name == "paired_comparison":
        from effbench.compare.stats import paired_comparison

        return paired_comparison
    if name == "compare":
        from effbench.compare.group import compare

        return compare
    raise AttributeError(f"module 'effbench.compare' has no attribute {name!r}")
