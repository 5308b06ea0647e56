"""``precomputed`` vs ``finetune``, side by side in one run: one run each, a K-job sweep, the
cache-hit fast path and batched head training.

(a) one ``finetune`` run vs one ``precomputed`` run (cold cache) at equal epochs: total time
    ratio, time reduction and both test accuracies; the floor ratio: precomputed's total over
    (BN passes + 1) forward passes of the backbone over the training images (what no cache-miss
    job can go under), with the miss job's phases next to it;
(b) a K-combination hyper-parameter sweep (K learning rates): K ``finetune`` runs vs K
    ``precomputed`` jobs sharing one fresh cache (the first extracts, the others are cache hits
    that decode no image and build no backbone): total time ratio, and a hit job's fixed cost
    (its time less head training), in total and by part (``summary.strategy.precomputed.
    fixed_costs_s``). The sweep's precomputed jobs keep no model (``save_model=false``: a sweep
    compares heads); one more hit job that saves its model shows what saving adds;
(c) the same K heads as K sequential cache-hit jobs vs one batched group
    (``hydra/launcher=batched_heads``' path: precomputed's ``launcher.pretrain`` + K jobs that
    take their trained heads): the batched speed-up and the largest metric difference.

(b) runs each side as the user types it, ``effbench -m … optim.optimizer.lr=<K values>`` (one
process per side, Hydra's basic launcher), and reports two ratios: per run (the jobs' own totals)
and whole sweep (each process's wall time: start-up, Hydra, composition included). The other
parts run the real pipeline (``effbench.run.run``) in this process. Times are the jobs'
``summary["time_s"]["total"]`` (a batched job's share of its group's training is in
``time_s.train``, outside its total: (c) adds the group's wall time once). Defaults (resnet18,
random init, digits at 32 px, CPU, 10 epochs per sweep job as in the study) take about 8 minutes
on a free 2-core CPU::

    .venv/bin/python scripts/bench_precomputed.py            # (a) 10 epochs, (b) (c) K=10 x 10
    .venv/bin/python scripts/bench_precomputed.py --k 3 --sweep-epochs 2 --epochs 2   # a quick look
    .venv/bin/python scripts/bench_precomputed.py --backbone densenet121 --weights imagenet \\
        --dataset brain_mri --image-size 224 --k 160 hardware=rtx4060    # study sizes on a GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from effbench.run import run_overrides

# Issue 4's targets (the study's figures) and issue 16's (fast path, floor, hit-job fixed cost).
GOALS = {"a_time_reduction": 0.85, "b_speedup": 50.0, "floor_ratio": 1.3, "hit_fixed_s": 0.25}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--weights", default="null", help="imagenet | null | path")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=10, help="(a): epochs of both runs")
    p.add_argument("--k", type=int, default=10, help="(b): sweep size (learning rates)")
    p.add_argument("--sweep-epochs", type=int, default=10, help="(b), (c): epochs of every job")
    p.add_argument("--skip", choices=["a", "b", "c"], action="append", default=[],
                   help="leave out a part (repeatable)")
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


def job_overrides(args: argparse.Namespace, strategy: str, epochs: int, lr: float | str,
                  cache: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """One job's overrides; ``lr`` a rate, or a sweep's comma-separated rates (``effbench -m``)."""
    lr = lr if isinstance(lr, str) else f"{lr:g}"
    return [*common_overrides(args), f"strategy={strategy}", f"optim.optimizer.lr={lr}",
            f"trainer.max_epochs={epochs}", f"cache_dir={cache}",
            "trainer.enable_progress_bar=false", f"tracking.energy={str(args.energy).lower()}",
            *extra, *args.overrides]


def job(args: argparse.Namespace, strategy: str, epochs: int, lr: float, cache: Path,
        run_dir: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    summary = run_overrides(job_overrides(args, strategy, epochs, lr, cache, extra), run_dir)
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
            "bn_passes": pc["strategy"]["precomputed"]["bn_adaptation"]["passes"],
            "bn_forward_passes": pc["strategy"]["precomputed"]["bn_adaptation"].get(
                "forward_passes", pc["strategy"]["precomputed"]["bn_adaptation"]["passes"])}


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


NO_SAVE = ("strategy.precomputed.save_model=false",)


def lrs_of(args: argparse.Namespace) -> list[float]:
    return [10 ** (-2 - 2 * i / max(1, args.k - 1)) for i in range(args.k)]  # 1e-2 … 1e-4


def hit_fixed_s(s: dict) -> float:
    """A job's time less its head training: what a cache-hit job costs on top of the head."""
    return total(s) - s["time_s"].get("train", 0.0)


def cli_sweep(args: argparse.Namespace, strategy: str, cache: Path, sweep_dir: Path,
              extra: tuple[str, ...] = ()) -> tuple[float, list[dict]]:
    """``effbench -m`` over the K learning rates, as a user types it: the whole process's wall
    time (start-up, Hydra's multirun, every job) and the jobs' summaries in sweep order."""
    lrs = ",".join(f"{lr:g}" for lr in lrs_of(args))
    cmd = [str(Path(sys.executable).parent / "effbench"), "-m",
           *job_overrides(args, strategy, args.sweep_epochs, lrs, cache, extra),
           f"hydra.sweep.dir={sweep_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"the {strategy} sweep failed: {proc.stderr.strip()[-2000:]}")
    paths = sorted(sweep_dir.glob("*/summary.json"), key=lambda p: int(p.parent.name.split("_")[0]))
    summaries = [json.loads(p.read_text()) for p in paths]
    for s in summaries:
        t = s["time_s"]
        lr = next(o.split("=", 1)[1] for o in s["overrides"]
                  if o.startswith("optim.optimizer.lr="))
        print(f"  {strategy:<11} lr={lr:<8} "
              f"{t['total']:7.1f} s  acc {s['metrics'].get('test/acc', float('nan')):.4f}  "
              + ", ".join(f"{k} {v:.2f}" for k, v in t.items() if k != "total"), flush=True)
    print(f"  {strategy} sweep, whole process: {wall:.1f} s", flush=True)
    return wall, summaries


def part_b(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The K-job sweep through the CLI (``effbench -m``), one process per side: the per-run ratio
    (the jobs' own totals) and the whole-sweep ratio (each process's wall time, start-up,
    Hydra and composition included)."""
    print(f"(b) sweep of K={args.k} learning rates, {args.sweep_epochs} epochs per job, "
          "`effbench -m` per side")
    pc_wall, pc = cli_sweep(args, "precomputed", tmp / "cache_b", tmp / "b_pc", NO_SAVE)
    ft_wall, ft = cli_sweep(args, "finetune", tmp / "cache_b", tmp / "b_ft")
    saving = job(args, "precomputed", args.sweep_epochs, lrs_of(args)[0], tmp / "cache_b",
                 tmp / "b_pc_save")
    hits = [s for s in pc if s["strategy"]["precomputed"]["fast_path"]["used"]]
    phases = ("setup", "bn_adapt", "extract", "train", "eval", "save")
    fixed = {p: statistics.median(s["time_s"].get(p, 0.0) for s in hits) for p in phases
             if p != "train"} if hits else {}
    parts = {k: statistics.median(s["strategy"]["precomputed"]["fixed_costs_s"].get(k, 0.0)
                                  for s in hits)
             for k in ("lookup", "load")} if hits else {}
    ft_s, pc_s = sum(map(total, ft)), sum(map(total, pc))
    return {"k": args.k, "epochs": args.sweep_epochs, "finetune_s": ft_s, "precomputed_s": pc_s,
            "speedup": ft_s / pc_s, "cache_hits": len(hits),
            "finetune_wall_s": ft_wall, "precomputed_wall_s": pc_wall,
            "speedup_whole": ft_wall / pc_wall,
            "first_precomputed_s": total(pc[0]),
            "hit_job_median_s": statistics.median(map(total, hits)) if hits else None,
            "hit_job_fixed_s": statistics.median(map(hit_fixed_s, hits)) if hits else None,
            "hit_job_fixed_costs_s": {**fixed, **parts},
            "hit_job_fixed_s_saving_model": hit_fixed_s(saving),
            "hit_job_save_s": saving["time_s"].get("save"),
            "finetune_save_s": statistics.median(s["time_s"].get("save", 0.0) for s in ft),
            "best_acc_finetune": max(s["metrics"]["test/acc"] for s in ft),
            "best_acc_precomputed": max(s["metrics"]["test/acc"] for s in pc)}


def part_c(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """K heads: K sequential cache-hit jobs vs one batched group + K jobs taking their heads."""
    from effbench.techniques.precomputed.batched import PRETRAINED
    from effbench.techniques.precomputed.launcher import pretrain

    print(f"(c) the same K={args.k} heads: sequential cache-hit jobs vs one batched group")
    cache = tmp / "cache_c"
    job(args, "precomputed", args.sweep_epochs, lrs_of(args)[0], cache, tmp / "c_first", NO_SAVE)
    seq = [job(args, "precomputed", args.sweep_epochs, lr, cache, tmp / f"c_seq{i}", NO_SAVE)
           for i, lr in enumerate(lrs_of(args))]
    tasks = []
    for lr in lrs_of(args):
        cfg = compose_task(job_overrides(args, "precomputed", args.sweep_epochs, lr, cache,
                                         NO_SAVE))
        tasks.append(cfg)
    start = time.perf_counter()
    pretrain(tasks, tmp / "c_group")
    group_s = time.perf_counter() - start
    bat = [job(args, "precomputed", args.sweep_epochs, lr, cache, tmp / f"c_bat{i}", NO_SAVE)
           for i, lr in enumerate(lrs_of(args))]
    PRETRAINED.clear()
    seq_s, bat_s = sum(map(total, seq)), group_s + sum(map(total, bat))
    diff = max(abs(a["metrics"][k] - b["metrics"][k]) for a, b in zip(seq, bat)
               for k in a["metrics"])
    return {"k": args.k, "epochs": args.sweep_epochs, "sequential_s": seq_s,
            "batched_s": bat_s, "group_s": group_s, "speedup": seq_s / bat_s,
            "max_metric_diff": diff,
            "all_batched": all("batched" in s["strategy"]["precomputed"] for s in bat)}


def compose_task(overrides: list[str]):
    """A job's config as its task function receives it (what the batched launcher groups)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from effbench.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    OmegaConf.set_struct(cfg, False)
    return cfg


def report(args: argparse.Namespace, a: dict | None, b: dict | None,
           floor: dict | None = None, c: dict | None = None) -> None:
    print(f"\n== precomputed vs finetune: {args.backbone} (weights={args.weights}) on "
          f"{args.dataset} at {args.image_size} px, {torch.get_num_threads()} CPU threads, "
          f"load average {os.getloadavg()[0]:.2f} ==")

    def ok(value: float | None, goal: float, higher: bool = True) -> str:
        if value is None:
            return "n/a"
        return "meets" if (value >= goal if higher else value <= goal) else "MISSES"

    if a:
        print(f"(a) {a['epochs']} epochs: finetune {a['finetune_s']:.1f} s (acc "
              f"{a['finetune_acc']:.4f}) vs precomputed {a['precomputed_s']:.1f} s (acc "
              f"{a['precomputed_acc']:.4f}); ratio {a['ratio']:.3f}, time "
              f"-{100 * a['time_reduction']:.1f} % ({ok(a['time_reduction'], 0.85)} the >= 85 % "
              f"goal); BN passes {a['bn_passes']}")
    if floor:
        print(f"    floor: (BN passes {floor['bn_passes']} + 1) x one forward pass over the "
              f"training images {floor['forward_pass_s']:.2f} s = {floor['floor_s']:.2f} s; "
              f"precomputed total {floor['precomputed_s']:.2f} s = {floor['floor_ratio']:.2f}x "
              f"the floor ({ok(floor['floor_ratio'], 1.3, False)} the <= 1.3 goal); the BN "
              f"passes are replayed from {a['bn_forward_passes']} forward pass(es): "
              f"{floor['strict_floor_ratio']:.2f}x (forward passes run + 1); in floor units: "
              + ", ".join(f"{k} {v / floor['forward_pass_s']:.2f}"
                                    for k, v in floor["phases_s"].items() if k != "total"))
    if b:
        f = b["hit_job_fixed_costs_s"]
        print(f"(b) K={b['k']} x {b['epochs']} epochs: finetune {b['finetune_s']:.1f} s vs "
              f"precomputed {b['precomputed_s']:.1f} s -> {b['speedup']:.1f}x faster "
              f"({ok(b['speedup'], 50)} the >= 50x goal); first precomputed job "
              f"{b['first_precomputed_s']:.1f} s, fast-path hits {b['cache_hits']}/"
              f"{b['k'] - 1} expected, median {b['hit_job_median_s'] or float('nan'):.2f} s")
        print(f"    whole sweep (each `effbench -m` process, start-up included): finetune "
              f"{b['finetune_wall_s']:.1f} s vs precomputed {b['precomputed_wall_s']:.1f} s -> "
              f"{b['speedup_whole']:.1f}x")
        fixed = b["hit_job_fixed_s"]
        print(f"    hit-job fixed cost (total - head training, median): "
              f"{fixed or float('nan'):.3f} s ({ok(fixed, 0.25, False)} the <= 0.25 s goal): "
              + ", ".join(f"{k} {v:.3f}" for k, v in f.items()))
        print(f"    a hit job that also saves its model: fixed cost "
              f"{b['hit_job_fixed_s_saving_model']:.3f} s (save {b['hit_job_save_s'] or 0:.3f} s;"
              f" a finetune job's save: {b['finetune_save_s']:.3f} s)")
        print(f"    best test acc: finetune {b['best_acc_finetune']:.4f}, precomputed "
              f"{b['best_acc_precomputed']:.4f}")
    if c:
        print(f"(c) K={c['k']} heads x {c['epochs']} epochs: sequential hit jobs "
              f"{c['sequential_s']:.2f} s vs batched {c['batched_s']:.2f} s (group "
              f"{c['group_s']:.2f} s) -> {c['speedup']:.2f}x; largest metric difference "
              f"{c['max_metric_diff']:.2g}; every job took its batched head: {c['all_batched']}")


def main() -> None:
    args = parse_args()
    # The sweep's jobs keep no model on purpose; the saver's warning (with its traceback) for
    # each of them would bury the figures.
    logging.getLogger("effbench.pipeline").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_precomputed_") as tmp:
        a = part_a(args, Path(tmp)) if "a" not in args.skip else None
        floor = None
        if a:
            fwd = forward_pass_s(args, Path(tmp))
            floor_s = (a["bn_passes"] + 1) * fwd
            floor = {"forward_pass_s": fwd, "bn_passes": a["bn_passes"], "floor_s": floor_s,
                     "precomputed_s": a["precomputed_s"],
                     "floor_ratio": a["precomputed_s"] / floor_s,
                     # What the job ran: BN passes are replayed from one recorded pass.
                     "strict_floor_ratio": a["precomputed_s"] / ((a["bn_forward_passes"] + 1)
                                                                  * fwd),
                     "phases_s": a["precomputed_time_s"]}
        b = part_b(args, Path(tmp)) if "b" not in args.skip else None
        c = part_c(args, Path(tmp)) if "c" not in args.skip else None
    report(args, a, b, floor, c)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), "a": a, "b": b, "floor": floor,
                                         "c": c}, indent=2, default=str))

    def r(value: float | None, digits: int = 2) -> float | None:
        return round(value, digits) if value is not None else None

    print(json.dumps({
        "time_reduction_pct": r(100 * a["time_reduction"]) if a else None,
        "sweep_speedup": r(b["speedup"]) if b else None,
        "sweep_speedup_whole": r(b["speedup_whole"]) if b else None,
        "hit_fixed_s": r(b["hit_job_fixed_s"], 3) if b else None,
        "hit_fixed_s_saving_model": r(b["hit_job_fixed_s_saving_model"], 3) if b else None,
        "floor_ratio": r(floor["floor_ratio"]) if floor else None,
        "strict_floor_ratio": r(floor["strict_floor_ratio"]) if floor else None,
        "batched_speedup": r(c["speedup"]) if c else None,
        "batched_max_metric_diff": c["max_metric_diff"] if c else None,
        "finetune_s": r(a["finetune_s"]) if a else None,
        "precomputed_s": r(a["precomputed_s"]) if a else None,
        "floor_s": r(floor["floor_s"], 3) if floor else None,
        "bn_passes": a["bn_passes"] if a else None,
        "finetune_acc": a["finetune_acc"] if a else None,
        "precomputed_acc": a["precomputed_acc"] if a else None,
        "sweep_k": b["k"] if b else (c["k"] if c else None),
        "sweep_epochs": args.sweep_epochs, "load_avg_1m": r(os.getloadavg()[0])}))


if __name__ == "__main__":
    main()
