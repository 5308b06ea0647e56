"""``precomputed`` vs ``finetune``, side by side in one run: one run each, and a K-job sweep.

(a) one ``finetune`` run vs one ``precomputed`` run (cold cache) at equal epochs: total time
    ratio, time reduction and both test accuracies;
(b) a K-combination hyper-parameter sweep (K learning rates): K ``finetune`` runs vs K
    ``precomputed`` jobs sharing one fresh cache (the first extracts, the others load): total
    time ratio, plus the per-job fixed costs of a cache-hit job.

Every job runs the real pipeline (``effbench.run.run``) in this process, as Hydra's basic
launcher runs a multirun; finetune and precomputed jobs are interleaved so that load from other
processes on a shared machine falls on both. Times are the jobs' ``summary["time_s"]["total"]``.
Defaults (resnet18, random init, digits at 32 px, CPU) take about 5 minutes on a free 2-core CPU::

    .venv/bin/python scripts/bench_precomputed.py                      # (a) 10 epochs, (b) K=10 x 2
    .venv/bin/python scripts/bench_precomputed.py --sweep-epochs 10    # the study's setting
    .venv/bin/python scripts/bench_precomputed.py --backbone densenet121 --weights imagenet \\
        --dataset brain_mri --image-size 224 --k 160 hardware=rtx4060    # study sizes on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from effbench.run import run_overrides

GOALS = {"a_time_reduction": 0.85, "b_speedup": 28.0}  # issue 4's targets (the study's figures)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--weights", default="null", help="imagenet | null | path")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=10, help="(a): epochs of both runs")
    p.add_argument("--k", type=int, default=10, help="(b): sweep size (learning rates)")
    p.add_argument("--sweep-epochs", type=int, default=2, help="(b): epochs of every sweep job")
    p.add_argument("--skip", choices=["a", "b"], help="leave out one part")
    p.add_argument("--energy", action="store_true", help="also measure energy (codecarbon)")
    p.add_argument("--threads", type=int, help="torch CPU threads for every job (e.g. 1 on a "
                   "shared, oversubscribed CPU: both sides get the same)")
    p.add_argument("--json", type=Path, help="write all figures here")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. hardware=cpu")
    return p.parse_args()


def threads_override(args: argparse.Namespace) -> list[str]:
    # A run sets torch's threads itself (hardware.cpu_threads): torch.set_num_threads alone would
    # be undone by the first job.
    return [f"hardware.cpu_threads={args.threads}"] if args.threads else []


def common_overrides(args: argparse.Namespace) -> list[str]:
    return [f"dataset={args.dataset}", f"dataset.image_size={args.image_size}",
            f"backbone={args.backbone}", f"backbone.weights={args.weights}",
            *threads_override(args)]


def job(args: argparse.Namespace, strategy: str, epochs: int, lr: float, cache: Path,
        run_dir: Path) -> dict[str, Any]:
    overrides = [*common_overrides(args), f"strategy={strategy}", f"optim.optimizer.lr={lr:g}",
                 f"trainer.max_epochs={epochs}", f"cache_dir={cache}",
                 "trainer.enable_progress_bar=false",
                 f"tracking.energy={str(args.energy).lower()}", *args.overrides]
    summary = run_overrides(overrides, run_dir)
    if summary["status"] != "completed":
        raise SystemExit(f"{strategy} lr={lr:g} failed: {summary['error']}")
    t = summary["time_s"]
    print(f"  {strategy:<11} lr={lr:<8g} {t['total']:7.1f} s  acc "
          f"{summary['metrics'].get('test/acc', float('nan')):.4f}  "
          + ", ".join(f"{k} {v:.2f}" for k, v in t.items() if k != "total"), flush=True)
    return summary


def total(s: dict) -> float:
    return s["time_s"]["total"]


def part_a(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    print(f"(a) one run each, {args.epochs} epochs")
    ft = job(args, "finetune", args.epochs, 1e-3, tmp / "cache_a", tmp / "a_finetune")
    pc = job(args, "precomputed", args.epochs, 1e-3, tmp / "cache_a", tmp / "a_precomputed")
    return {"epochs": args.epochs, "finetune_s": total(ft), "precomputed_s": total(pc),
            "ratio": total(pc) / total(ft), "time_reduction": 1 - total(pc) / total(ft),
            "finetune_acc": ft["metrics"]["test/acc"], "precomputed_acc": pc["metrics"]["test/acc"],
            "precomputed_time_s": pc["time_s"], "finetune_time_s": ft["time_s"],
            "bn_passes": pc["strategy"]["precomputed"]["bn_adaptation"]["passes"]}


def forward_pass_s(args: argparse.Namespace, tmp: Path, repeats: int = 3) -> float:
    """Seconds of one forward pass (eval mode, no autograd) of the backbone over the training
    images at the training batch size, as precomputed's extraction runs it: the unit of its
    floor. Median of ``repeats`` passes after one warm-up pass."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from effbench.config import CONF_DIR
    from effbench.hardware import torch_device
    from effbench.run import build_run

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        # part (a)'s precomputed job, built but not run: its backbone and data, the same sizes
        cfg = compose("config", overrides=[*common_overrides(args), "strategy=precomputed",
                                           f"cache_dir={tmp / 'cache_floor'}",
                                           "tracking.energy=false", *args.overrides])
    OmegaConf.set_struct(cfg, False)
    ctx = build_run(cfg, tmp / "floor")
    dm, backbone = ctx.datamodule, ctx.system.backbone
    device = torch_device(ctx.trainer_args["accelerator"])
    backbone.to(device).eval()

    def one_pass() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for x, _ in dm.loader("train", shuffle=False):
                backbone(dm.normalize(x.to(device, non_blocking=True)))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    one_pass()  # warm-up (allocator, cuDNN autotuning)
    return statistics.median(one_pass() for _ in range(repeats))


def part_b(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    lrs = [10 ** (-2 - 2 * i / max(1, args.k - 1)) for i in range(args.k)]  # 1e-2 … 1e-4
    print(f"(b) sweep of K={args.k} learning rates, {args.sweep_epochs} epochs per job")
    ft, pc = [], []
    for i, lr in enumerate(lrs):  # interleaved: background load falls on both sides
        ft.append(job(args, "finetune", args.sweep_epochs, lr, tmp / "cache_b", tmp / f"b_ft{i}"))
        pc.append(job(args, "precomputed", args.sweep_epochs, lr, tmp / "cache_b",
                      tmp / f"b_pc{i}"))
    hits = [s for s in pc if s["strategy"]["precomputed"]["cache_hit"]]
    phases = ("setup", "bn_adapt", "extract", "train", "eval")
    fixed = {p: statistics.median(s["time_s"].get(p, 0.0) for s in hits) for p in phases}
    fixed["other"] = statistics.median(total(s) - sum(s["time_s"].get(p, 0.0) for p in phases)
                                       for s in hits)
    ft_s, pc_s = sum(map(total, ft)), sum(map(total, pc))
    return {"k": args.k, "epochs": args.sweep_epochs, "finetune_s": ft_s, "precomputed_s": pc_s,
            "speedup": ft_s / pc_s, "cache_hits": len(hits),
            "first_precomputed_s": total(pc[0]),
            "hit_job_median_s": statistics.median(map(total, hits)) if hits else None,
            "hit_job_fixed_costs_s": fixed,
            "best_acc_finetune": max(s["metrics"]["test/acc"] for s in ft),
            "best_acc_precomputed": max(s["metrics"]["test/acc"] for s in pc)}


def report(args: argparse.Namespace, a: dict | None, b: dict | None,
           floor: dict | None = None) -> None:
    print(f"\n== precomputed vs finetune: {args.backbone} (weights={args.weights}) on "
          f"{args.dataset} at {args.image_size} px, {torch.get_num_threads()} CPU threads ==")
    if a:
        ok = "meets" if a["time_reduction"] >= GOALS["a_time_reduction"] else "MISSES"
        print(f"(a) {a['epochs']} epochs: finetune {a['finetune_s']:.1f} s (acc "
              f"{a['finetune_acc']:.4f}) vs precomputed {a['precomputed_s']:.1f} s (acc "
              f"{a['precomputed_acc']:.4f}); ratio {a['ratio']:.3f}, time "
              f"-{100 * a['time_reduction']:.1f} % ({ok} the >= 85 % goal); "
              f"BN passes {a['bn_passes']}")
    if floor:
        print(f"    floor: (BN passes {floor['bn_passes']} + 1) x one forward pass over the "
              f"training images {floor['forward_pass_s']:.2f} s = {floor['floor_s']:.2f} s; "
              f"precomputed total {floor['precomputed_s']:.1f} s = {floor['floor_ratio']:.1f}x "
              "the floor")
    if b:
        ok = "meets" if b["speedup"] >= GOALS["b_speedup"] else "MISSES"
        f = b["hit_job_fixed_costs_s"]
        print(f"(b) K={b['k']} x {b['epochs']} epochs: finetune {b['finetune_s']:.1f} s vs "
              f"precomputed {b['precomputed_s']:.1f} s -> {b['speedup']:.1f}x faster ({ok} the "
              f">= 28x goal); first precomputed job {b['first_precomputed_s']:.1f} s, cache-hit "
              f"jobs {b['cache_hits']}/{b['k'] - 1} expected, median "
              f"{b['hit_job_median_s'] or float('nan'):.2f} s")
        print("    cache-hit job fixed costs (median s): "
              + ", ".join(f"{k} {v:.3f}" for k, v in f.items()))
        print(f"    best test acc: finetune {b['best_acc_finetune']:.4f}, precomputed "
              f"{b['best_acc_precomputed']:.4f}")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_precomputed_") as tmp:
        a = part_a(args, Path(tmp)) if args.skip != "a" else None
        floor = None
        if a:
            fwd = forward_pass_s(args, Path(tmp))
            floor_s = (a["bn_passes"] + 1) * fwd
            floor = {"forward_pass_s": fwd, "bn_passes": a["bn_passes"], "floor_s": floor_s,
                     "precomputed_s": a["precomputed_s"],
                     "floor_ratio": a["precomputed_s"] / floor_s}
        b = part_b(args, Path(tmp)) if args.skip != "b" else None
    report(args, a, b, floor)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), "a": a, "b": b, "floor": floor},
                                        indent=2, default=str))
    print(json.dumps({
        "time_reduction_pct": round(100 * a["time_reduction"], 2) if a else None,
        "sweep_speedup": round(b["speedup"], 2) if b else None,
        "floor_ratio": round(floor["floor_ratio"], 2) if floor else None,
        "finetune_s": round(a["finetune_s"], 2) if a else None,
        "precomputed_s": round(a["precomputed_s"], 2) if a else None,
        "floor_s": round(floor["floor_s"], 3) if floor else None,
        "bn_passes": a["bn_passes"] if a else None,
        "finetune_acc": a["finetune_acc"] if a else None,
        "precomputed_acc": a["precomputed_acc"] if a else None,
        "sweep_k": b["k"] if b else None}))


if __name__ == "__main__":
    main()
