"""``effbench-compare PATH…``: side-by-side table and plots of logged runs, relative to a baseline.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effbench.compare import safe
from effbench.compare.cost import charge
from effbench.compare.group import compare, default_baseline
from effbench.compare.load import find_summaries, load_runs
from effbench.compare.output import prepare_out
from effbench.compare.plots import write_plots
from effbench.compare.search import search_cost, search_text
from effbench.compare.stats import DEFAULT_MARGIN_PP, RESAMPLES
from effbench.compare.table import terminal_text, write_tables
from effbench.errors import EffbenchError, exit_with_one_line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="effbench-compare",
        description="Compare effbench runs: every summary.json below the paths, grouped by the "
                    "config keys that vary, mean ± std over seeds, deltas to a baseline; writes "
                    "compare.md, compare.csv, runs.csv and PNG plots.")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="run dirs, sweep dirs (outputs/multirun/<date>) or glob patterns")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: compare/ inside the first path)")
    p.add_argument("--metric", default=None,
                   help="headline metric (default: test/acc; test/auroc_macro when multilabel)")
    p.add_argument("--baseline", action="append", default=None, metavar="KEY=VALUE",
                   help=f"the reference configuration, matched on the other keys (default: "
                        f"{default_baseline()} when such runs exist); repeat or comma-join for "
                        f"several keys")
    p.add_argument("--by", action="append", default=None, metavar="KEY",
                   help="group by these config keys instead of the ones that vary (repeatable)")
    p.add_argument("--sort", default=None,
                   help="metric (best first), time, co2, params, size (effective), dense-size, "
                        "or a config key")
    p.add_argument("--margin", default=f"{DEFAULT_MARGIN_PP:g}pp", metavar="PP",
                   help=f"non-inferiority margin in percentage points of the metric (default "
                        f"{DEFAULT_MARGIN_PP:g}pp): a row whose 95 %% interval of the paired "
                        f"difference to its baseline (bootstrap over test samples and seeds, "
                        f"{RESAMPLES} resamples, fixed seed) lies above −margin is non-inferior, "
                        f"above 0 superior, below −margin inferior, else inconclusive")
    p.add_argument("--best-so-far", action="store_true",
                   help="learning curves as the running best (elitism: the best model so far)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--amortize", action="store_true", help="share each feature-cache build among "
                   "the jobs that used it (default: each job pays for the features it used)")
    p.add_argument("--search-cost", default=None, metavar="KEY",
                   help="the cost of a hyper-parameter search per value of KEY (e.g. strategy): "
                        "summed training time, best job by --metric (default val/acc; "
                        "val/auroc_macro when multilabel), N× faster")
    return p


def parse_margin(text: str) -> float:
    """``1pp``, ``1 pp`` or ``1``: percentage points, zero or more."""
    number = str(text).strip().lower().removesuffix("pp").strip()
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise EffbenchError(f"--margin {text} is not a margin in percentage points; write e.g. "
                            f"--margin {DEFAULT_MARGIN_PP:g}pp.")
    return value


def default_out(first: str) -> Path:
    path = Path(first)
    if not path.exists():  # a glob: the folder of its first summary
        path = find_summaries([first])[0].parent
    return (path.parent if path.is_file() else path) / "compare"


def run(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    by = [k for item in args.by for k in item.split(",")] if args.by else None
    runs = load_runs(args.paths)
    for path, why in runs.attrs["skipped"]:  # said before any error below, and in compare.md
        print(f"effbench-compare: warning: skipped {path}: {why}.", file=sys.stderr)
    if args.search_cost:
        table = search_cost(runs, args.search_cost, args.metric)
        print(safe.text(search_text(table, args.search_cost)))
        return 0
    runs = charge(runs, amortize=args.amortize)  # a cache hit pays for its features
    comp = compare(runs, metric=args.metric, by=by, baseline=args.baseline,
                   margin=parse_margin(args.margin))
    out = prepare_out(args.out or default_out(args.paths[0]))
    images, skipped = ([], []) if args.no_plots else write_plots(comp, out, args.best_so_far)
    files = write_tables(comp, out, args.sort, images)
    print(safe.text(terminal_text(comp, args.sort)))  # no escape sequence from a summary
    print(f"\nwrote {', '.join(str(p) for p in [*files, *images])}")
    for note in skipped:
        print(f"  {note}")
    return 0


def main(argv: list[str] | None = None) -> None:
    exit_with_one_line("effbench-compare", run, argv, 2)


if __name__ == "__main__":
    main()
