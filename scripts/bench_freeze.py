"""Time per training epoch vs frozen blocks (strategy ``freeze``), side by side in one run.

Runs the real effbench pipeline (``effbench.run.run``) for ``strategy.freeze.frozen_stages=k`` for
every k,
in rounds with a rotating order so that load from other processes on a shared CPU spreads over all
k, and reports the median epoch time per k (first epoch of every run dropped as warm-up) and its
ratio to k=0. Default: resnet18 (random init) on digits at 32 px, on the CPU::

    .venv/bin/python scripts/bench_freeze.py                      # k = 0..4, plot in docs/img
    .venv/bin/python scripts/bench_freeze.py --rounds 3 --epochs 4 --ks 0,2,4
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from effbench.run import run_overrides

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.7  # with the frozen prefix outside autograd, k=4 should cost at most 0.7x of k=0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", default="0,1,2,3,4", help="frozen_stages values, comma separated")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (first is warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="runs per k, interleaved")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads; 1 keeps timings stable on a shared CPU (with "
                        "other jobs running, 2 OpenMP threads were 5x slower than 1 here)")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "freeze_epoch_time.png")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. hardware=cpu")
    return p.parse_args()


def one_run(args: argparse.Namespace, k: str, run_dir: Path) -> dict[str, Any]:
    overrides = [f"dataset={args.dataset}", f"dataset.image_size={args.image_size}",
                 f"backbone={args.backbone}", "backbone.weights=null", "strategy=freeze",
                 f"strategy.freeze.frozen_stages={k}", f"trainer.max_epochs={args.epochs}",
                 "optim.checkpoint=false", "optim.early_stopping=null",
                 "trainer.enable_progress_bar=false", "tracking.energy=false", "hardware=cpu",
                 f"hardware.cpu_threads={args.threads}",  # the run sets torch's threads itself
                 *args.overrides]
    summary = run_overrides(overrides, run_dir)
    if summary["status"] != "completed":
        raise SystemExit(f"frozen_stages={k} failed: {summary['error']}")
    return summary


def bench(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    ks = args.ks.split(",")
    results: dict[str, dict[str, Any]] = {k: {"epochs": [], "trainable": None} for k in ks}
    with tempfile.TemporaryDirectory(prefix="bench_freeze_") as tmp:
        for r in range(args.rounds):
            order = ks[r % len(ks):] + ks[:r % len(ks)]  # rotate: no k always runs first
            for k in order:
                summary = one_run(args, k, Path(tmp) / f"r{r}_k{k}")
                epochs = summary["strategy"]["freeze"]["epoch_times_s"]
                results[k]["epochs"] += epochs[1:]
                results[k]["trainable"] = summary["model"]["params_trainable"]
                print(f"  round {r} k={k}: epochs {[round(t, 3) for t in epochs]}", flush=True)
    for res in results.values():
        res["median"] = statistics.median(res["epochs"])
    return results


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> float:
    base = results[next(iter(results))]["median"]
    print(f"\n{args.backbone} (weights=null) on {args.dataset} at {args.image_size} px, "
          f"{torch.get_num_threads()} thread(s), {args.rounds} runs x {args.epochs - 1} timed "
          "epochs per k (median):")
    print(f"{'frozen_stages':>13} {'trainable params':>17} {'epoch s':>8} {'min':>7} {'max':>7} "
          f"{'vs k=0':>7}")
    for k, res in results.items():
        print(f"{k:>13} {res['trainable']:>17,} {res['median']:>8.3f} {min(res['epochs']):>7.3f} "
              f"{max(res['epochs']):>7.3f} {res['median'] / base:>7.2f}x")
    last = list(results)[-1]
    ratio = results[last]["median"] / base
    verdict = "OK" if ratio <= GOAL else "ABOVE GOAL"
    print(f"\nk={last} / k={next(iter(results))}: {ratio:.2f}x (goal <= {GOAL}x): {verdict}")
    return ratio


def plot(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(results)
    med = [results[k]["median"] for k in ks]
    lo = [m - min(results[k]["epochs"]) for k, m in zip(ks, med)]
    hi = [max(results[k]["epochs"]) - m for k, m in zip(ks, med)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(ks, med, yerr=[lo, hi], marker="o", capsize=4, label="median epoch (min-max)")
    for k, m in zip(ks, med):
        ax.annotate(f"{results[k]['trainable'] / 1e6:.2f}M", (k, m), textcoords="offset points",
                    xytext=(0, 8), ha="center", fontsize=8)
    ax.set_xlabel("strategy.frozen_stages (blocks frozen after the stem)")
    ax.set_ylabel("training epoch time [s]")
    ax.set_title(f"{args.backbone} on {args.dataset} {args.image_size}px, CPU "
                 "(labels: trainable params)", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    results = bench(args)
    ratio = report(results, args)
    plot(results, args)
    ks = list(results)
    print(json.dumps({"freeze_ratio": round(ratio, 3), "k_first": ks[0], "k_last": ks[-1],
                      "goal": GOAL,
                      "epoch_s": {k: round(r["median"], 4) for k, r in results.items()},
                      "trainable_params": {k: r["trainable"] for k, r in results.items()}}))


if __name__ == "__main__":
    main()
