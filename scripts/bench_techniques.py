"""Every registered technique against ``finetune`` on one dataset, in one run: test accuracy, the
paired verdict of ``effbench-compare`` (95 % bootstrap interval of the difference, 1 pp margin),
training time and its change, and a PNG of accuracy against training time.

One sweep of the real CLI (``effbench -m strategy=finetune,<each technique>``) on digits + small_cnn
(the default experiment), then ``effbench-compare`` on it; techniques that cannot take the sweep's
backbone (``progressive_resizing``: small_cnn's dense layer is sized for full-size inputs) run in
a second sweep on ``--alt-backbone`` at 32 px against a finetune baseline of their own. Jobs run
one after the other as Hydra's basic launcher runs them::

    .venv/bin/python scripts/bench_techniques.py                 # seeds 0, about 6 min on 2 cores
    .venv/bin/python scripts/bench_techniques.py --seeds 0,1,2   # intervals over seeds too
    .venv/bin/python scripts/bench_techniques.py --quick         # tiny synthetic data

Prints the compare table (one row per technique) and ends with one JSON line of the headline
figures (per technique: accuracy, Δ accuracy in pp, verdict, training seconds, Δ time %), with the
load average at the start and the end: take figures only on a quiet machine (< 1).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

# small_cnn's dense layer is sized for full-size inputs: a smaller training size cannot go in.
NEEDS_ALT_BACKBONE = {"progressive_resizing"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--alt-backbone", default="cifar_cnn14",
                   help="backbone of the second sweep (techniques that need global pooling)")
    p.add_argument("--out", default=None, help="keep the compare folder here (table, CSV, PNG)")
    p.add_argument("--quick", action="store_true", help="tiny synthetic data, 8 epochs")
    p.add_argument("extra", nargs="*", help="overrides for every job, e.g. trainer.max_epochs=5")
    return p.parse_args()


def techniques() -> list[str]:
    from effbench.technique import registered

    return [t for t in registered() if t != "finetune"]


def sweep(names: list[str], common: list[str], cwd: Path, label: str) -> Path:
    """``effbench -m strategy=finetune,<names> <common>`` in ``cwd``; its multirun folder."""
    out = cwd / "multirun" / label
    cmd = [str(BIN / "effbench"), "-m", f"strategy=finetune,{','.join(names)}", *common,
           f"hydra.sweep.dir={out}"]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, cwd=cwd, text=True, capture_output=True)
    failed = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    if proc.returncode != 0:
        print("\n".join(failed[-10:]) or proc.stderr[-2000:], file=sys.stderr)
    return out


def compare(paths: list[Path], out: Path) -> list[dict[str, str]]:
    cmd = [str(BIN / "effbench-compare"), *map(str, paths), "--out", str(out)]
    subprocess.run(cmd, check=True, text=True, capture_output=True)
    print((out / "compare.md").read_text())
    with open(out / "compare.csv", newline="") as f:
        return list(csv.DictReader(f))


def _number(value: str | None) -> float | None:
    try:
        return round(float(value), 4) if value not in (None, "") else None
    except ValueError:
        return None


def headline(rows: list[dict[str, str]]) -> dict[str, dict]:
    """Per row: the metric, its paired difference to the baseline, the verdict and the time."""
    out: dict[str, dict] = {}
    for row in rows:
        name = "/".join(v for k, v in row.items() if k in ("strategy", "backbone") and v)
        out[name] = {k: _number(row.get(c)) if c != "verdict" else row.get(c)
                     for k, c in (("acc", "test/acc"), ("delta_pp", "d_metric_pp"),
                                  ("delta_lo", "d_lo"), ("delta_hi", "d_hi"),
                                  ("verdict", "verdict"), ("train_s", "train_s"),
                                  ("time_pct", "d_train_pct"))}
    return out


def main() -> None:
    args = parse_args()
    load_start = os.getloadavg()[0]
    base = ["trainer.enable_progress_bar=false", f"seed={args.seeds}"]
    if args.quick:
        # 8 epochs: prune's default schedule ends at epoch 7 (a technique's own keys cannot be
        # set for a sweep of several techniques: the others' jobs refuse them).
        base += ["dataset=synthetic", "dataset.num_train=64", "dataset.num_val=32",
                 "dataset.num_test=32", "trainer.max_epochs=8", "tracking.energy=false"]
    base += args.extra
    names = techniques()
    main_sweep = [n for n in names if n not in NEEDS_ALT_BACKBONE]
    alt = [n for n in names if n in NEEDS_ALT_BACKBONE]
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        # Keys of one technique are refused in the jobs of the others, so each technique's own
        # options are left at their defaults; the default experiment has the epochs they need.
        paths = [sweep(main_sweep, base, cwd, "main")]
        if alt:
            # at 32 px: digits' own 8 px is below what cifar_cnn14's three poolings can take
            paths.append(sweep(alt, [*base, f"backbone={args.alt_backbone}",
                                     "dataset.image_size=32"], cwd, "alt"))
        out = cwd / "compare"
        rows = compare(paths, out)
        if args.out:
            shutil.copytree(out, args.out, dirs_exist_ok=True)
            print(f"compare folder (table, CSV, PNG plots): {args.out}")
    figures = {"techniques": headline(rows), "load_avg_start": round(load_start, 2),
               "load_avg_end": round(os.getloadavg()[0], 2)}
    if max(load_start, figures["load_avg_end"]) >= 1:
        print("(NOT a quiet machine: load average >= 1)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
