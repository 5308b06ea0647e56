"""Benchmark: ``dynamic`` (subset A of α images) vs ``finetune`` on the full set, equal epochs.

Synthetic CIFAR-shaped data (32 px, 10 classes) and the study's ``cifar_cnn14``, run side by side
in one process on this machine; prints train time, the time ratio and the accuracies.

    .venv/bin/python scripts/bench_dynamic.py   # ~4 CPU-min; 9-14 min wall on 2 busy shared cores
    .venv/bin/python scripts/bench_dynamic.py --epochs 3 --num-train 8000 --variants base adaptive
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import effbench.cli  # noqa: F401 - registers the config resolvers
from effbench.run import run

CONF = Path(__file__).resolve().parents[1] / "conf"


def run_one(name: str, overrides: list[str], out: Path) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    summary = run(cfg, out / name, choices, overrides)
    if summary["status"] != "completed":
        raise SystemExit(f"{name} failed: {summary['error']}")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-train", type=int, default=4000)
    p.add_argument("--num-val", type=int, default=400)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--beta", type=float, default=0.7)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--noise", type=float, default=1.0, help="synthetic difficulty")
    p.add_argument("--variants", nargs="+", default=["base"], choices=["base", "adaptive"])
    p.add_argument("--fixed", action="store_true", help="also the fixed-subset control")
    args = p.parse_args()

    common = ["dataset=synthetic", "backbone=cifar_cnn14", "hardware=cpu",
              f"dataset.num_train={args.num_train}", f"dataset.num_val={args.num_val}",
              f"dataset.num_test={args.num_val}", "dataset.num_classes=10",
              f"dataset.noise={args.noise}", f"dataset.batch_size={args.batch_size}",
              f"trainer.max_epochs={args.epochs}", "trainer.enable_progress_bar=false",
              "tracking.energy=false", "optim.scheduler=null", "optim.early_stopping=null"]
    dyn = ["strategy=dynamic", f"strategy.dynamic.alpha={args.alpha}",
           f"strategy.dynamic.beta={args.beta}"]
    runs = {"finetune (full set)": ["strategy=finetune"]}
    for v in args.variants:
        runs[f"dynamic {v} (alpha={args.alpha})"] = [*dyn, f"strategy.dynamic.variant={v}"]
    if args.fixed:
        runs[f"fixed subset (alpha={args.alpha})"] = [*dyn, "strategy.dynamic.resample=false"]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; synthetic "
          f"{args.num_train} train / {args.num_val} val images, 32 px, cifar_cnn14, "
          f"batch {args.batch_size}, {args.epochs} epochs")
    results = {}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        # A tiny throw-away run first, so imports and allocator warm-up count against neither.
        run_one("warmup", [*common, "dataset.num_train=128", "trainer.max_epochs=1"], Path(tmp))
        for i, (name, extra) in enumerate(runs.items()):
            results[name] = run_one(f"run{i}", [*common, *extra], Path(tmp))
    print(f"\nload average (1 min) at start {load:.1f}, at end {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores (the CPU is shared: absolute times vary, ratios less)")
    base = results["finetune (full set)"]["time_s"]["train"]
    print(f"{'run':32s} {'train s':>8s} {'ratio':>6s} {'images':>7s} {'val acc':>8s} "
          f"{'test acc':>8s} {'resamples':>9s}")
    for name, s in results.items():
        st = s["strategy"].get("dynamic", {})  # finetune has no dynamic facts
        images = st.get("images_trained", args.num_train * args.epochs)
        print(f"{name:32s} {s['time_s']['train']:8.1f} {s['time_s']['train'] / base:6.2f} "
              f"{images:7d} {s['best_val'].get('val/acc', float('nan')):8.4f} "
              f"{s['metrics']['test/acc']:8.4f} {st.get('resamples', '-'):>9}")
    runs_json = {n: {"train_s": round(s["time_s"]["train"], 2),
                     "ratio": round(s["time_s"]["train"] / base, 3),
                     "test_acc": round(s["metrics"]["test/acc"], 4)}
                 for n, s in results.items()}
    first_dynamic = next(n for n in runs if n.startswith("dynamic"))
    # headline: the first dynamic variant's train phase / finetune's (full set), equal epochs
    print(json.dumps({"train_phase_ratio": runs_json[first_dynamic]["ratio"],
                      "variant": first_dynamic, "alpha": args.alpha, "epochs": args.epochs,
                      "runs": runs_json}))


if __name__ == "__main__":
    main()
