"""``effbench-compare``: read many ``summary.json`` files, group, aggregate, compare, plot.

Modules: ``load`` (find and read summaries), ``group`` (varying keys, mean ± std over seeds,
baseline deltas), ``table`` (terminal / Markdown / CSV), ``curves`` and ``plots`` (PNG), ``cli``,
and ``hparams`` (TensorBoard HParams, called by every run).
"""
