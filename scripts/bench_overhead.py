"""Framework overhead: effbench ``finetune`` (Lightning) vs a plain PyTorch loop, side by side.

Same in-memory data (digits), same model (backbone + head), same optimizer, batch size and epochs,
both validating once per epoch. Runs are interleaved and repeated, the order rotating each repeat
(whichever ran first was slower here); the medians are compared, and next to them the minima and
the spread, because on a shared 2-core VM one method's repeats spread more (±15 %) than the methods
differ: a figure without its spread cannot say whether 5 % was met.

Each fit is also measured in CPU time (user + system seconds of this process, ``getrusage``): a
neighbour on the VM stretches wall time but not the CPU seconds the loop itself spends, so the
CPU-time figure is the one that still means something on a noisy machine.

    .venv/bin/python scripts/bench_overhead.py [--epochs 5] [--repeats 5] [--backbone small_cnn]
                                               [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compose(overrides: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    import effbench.cli  # noqa: F401 - resolvers

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hcompose("config", overrides=overrides)
    return cfg


def _cpu_s() -> float:
    """User + system CPU seconds this process has used (all its threads)."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def effbench_fit(cfg, tmp: Path) -> tuple[float, float, int]:
    """Train time (s), its CPU seconds and images processed through the real strategy path: the
    training machinery alone (the plain loop writes no checkpoints or logs either)."""
    from effbench.run import build_run

    torch.manual_seed(0)
    ctx = build_run(cfg, tmp)
    callbacks = [cb for t in ctx.techniques for cb in t.callbacks(ctx)]
    trainer = ctx.make_trainer(callbacks, logger=False, enable_checkpointing=False)
    start, cpu_start = time.perf_counter(), _cpu_s()
    trainer.fit(ctx.system, datamodule=ctx.datamodule)
    return time.perf_counter() - start, _cpu_s() - cpu_start, ctx.record.images


def effbench_full_fit(cfg, tmp: Path) -> tuple[float, float, int]:
    """As a real run trains: plus the recipe's checkpoints (best + last every epoch, for
    resume), the CSV/TensorBoard loggers and the learning-rate monitor."""
    from pytorch_lightning.callbacks import LearningRateMonitor

    from effbench.run import build_run

    torch.manual_seed(0)
    ctx = build_run(cfg, tmp)
    own = [cb for t in ctx.techniques for cb in t.callbacks(ctx)]
    gates = [cb.checkpoint_ready for cb in own if hasattr(cb, "checkpoint_ready")]
    callbacks = [*ctx.recipe.callbacks(tmp, gates), *own,
                 LearningRateMonitor(logging_interval="epoch")]
    trainer = ctx.make_trainer(callbacks)
    start, cpu_start = time.perf_counter(), _cpu_s()
    trainer.fit(ctx.system, datamodule=ctx.datamodule)
    return time.perf_counter() - start, _cpu_s() - cpu_start, ctx.record.images


def plain_fit(cfg, tmp: Path) -> tuple[float, float, int]:
    """The same training written as a bare PyTorch loop (the lower bound on overhead)."""
    from effbench.run import build_run

    torch.manual_seed(0)
    ctx = build_run(cfg, tmp)
    dm, model = ctx.datamodule, ctx.system
    opt = torch.optim.Adam(model.parameters(), lr=ctx.recipe.lr, fused=True)  # as effbench
    images = 0
    start, cpu_start = time.perf_counter(), _cpu_s()
    for _ in range(int(cfg.trainer.max_epochs)):
        model.train()
        for x, y in dm.loader("train"):
            x = dm.normalize(x, train=True)
            loss = model.loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            images += len(y)
        model.eval()
        with torch.no_grad():
            for x, y in dm.loader("val"):
                model.val_metrics.update(model(dm.normalize(x)), y)
            model.val_metrics.compute()
            model.val_metrics.reset()
    return time.perf_counter() - start, _cpu_s() - cpu_start, images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backbone", default="small_cnn")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--threads", default="auto",
                    help="hardware.cpu_threads for both loops (a count, or auto)")
    args = ap.parse_args()
    cfg = compose([f"backbone={args.backbone}", f"dataset={args.dataset}",
                   f"dataset.image_size={args.image_size}", "backbone.weights=null",
                   f"trainer.max_epochs={args.epochs}", "trainer.enable_progress_bar=false",
                   "hardware=cpu" if not torch.cuda.is_available() else "hardware=auto",
                   "optim.scheduler=null", "optim.early_stopping=null",
                   f"hardware.cpu_threads={args.threads}"])
    OmegaConf.set_struct(cfg, False)
    import tempfile

    load = os.getloadavg()[0]  # before this script adds its own
    methods = [("effbench", effbench_fit), ("plain", plain_fit), ("full", effbench_full_fit)]
    times: dict[str, list[float]] = {name: [] for name, _ in methods}
    cpu: dict[str, list[float]] = {name: [] for name, _ in methods}
    imgs = {}
    with tempfile.TemporaryDirectory() as tmp:
        # One uncounted epoch first: the process's first fit pays for lazy imports, allocator
        # growth and kernel selection (+40 % here), which would go to whichever method ran first.
        warm = cfg.copy()
        warm.trainer.max_epochs = 1
        effbench_fit(warm, Path(tmp) / "warm-up")
        for r in range(args.repeats):
            for name, fn in methods[r % 3:] + methods[:r % 3]:  # each goes first in turn
                t, c, n = fn(cfg, Path(tmp) / f"{name}{r}")
                cpu[name].append(c)
                times[name].append(t)
                imgs[name] = n
                print(f"  repeat {r}: {name:8s} {t:7.2f} s  {n / t:8.0f} img/s  "
                      f"{cpu[name][-1]:7.2f} CPU s", flush=True)
    end_load = os.getloadavg()[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    thr = {k: imgs[k] / med[k] for k in med}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    cpu_low = {k: min(v) for k, v in cpu.items()}

    def pct(a: float, b: float) -> float:
        return 100 * (a / b - 1)

    # Per repeat, against the plain loop of the same repeat (neighbours in time share the noise).
    paired = {k: sorted(pct(a, b) for a, b in zip(times[k], times["plain"]))
              for k in ("effbench", "full")}
    spread = {k: pct(max(v), min(v)) for k, v in times.items()}
    print(f"\n{args.backbone} on {args.dataset} @ {args.image_size}px, {args.epochs} epochs, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}, {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads")
    print(f"  {'':20s} {'img/s':>8s} {'median':>8s} {'min':>8s} {'max':>8s} {'spread':>8s} "
          f"{'CPU med':>8s} {'CPU min':>8s}")
    for k, label in (("plain", "plain PyTorch loop"), ("effbench", "effbench finetune"),
                     ("full", "effbench, as a run")):
        print(f"  {label:20s} {thr[k]:8.0f} {med[k]:7.2f}s {low[k]:7.2f}s {max(times[k]):7.2f}s "
              f"{spread[k]:+7.1f}% {cpu_med[k]:7.2f}s {cpu_low[k]:7.2f}s")
    print("  (as a run: + best/last checkpoints every epoch, loggers, lr monitor)")
    for k, label in (("effbench", "training machinery"), ("full", "as a run")):
        print(f"  overhead, {label:18s}: {pct(med[k], med['plain']):+.1f} % of the medians, "
              f"{pct(low[k], low['plain']):+.1f} % of the minima; per repeat "
              f"{paired[k][0]:+.1f} … {paired[k][-1]:+.1f} %; in CPU time "
              f"{pct(cpu_med[k], cpu_med['plain']):+.1f} % of the medians, "
              f"{pct(cpu_low[k], cpu_low['plain']):+.1f} % of the minima")
    quiet = load < 1
    print(f"  load average: {load:.2f} at the start, {end_load:.2f} at the end"
          + ("" if quiet else " (NOT a quiet machine)"))
    print(json.dumps({"overhead_pct": round(pct(med["effbench"], med["plain"]), 2),
                      "overhead_min_pct": round(pct(low["effbench"], low["plain"]), 2),
                      "overhead_paired_pct": [round(paired["effbench"][0], 2),
                                              round(paired["effbench"][-1], 2)],
                      "overhead_as_run_pct": round(pct(med["full"], med["plain"]), 2),
                      "overhead_as_run_min_pct": round(pct(low["full"], low["plain"]), 2),
                      "overhead_cpu_pct": round(pct(cpu_med["effbench"], cpu_med["plain"]), 2),
                      "overhead_cpu_min_pct": round(pct(cpu_low["effbench"], cpu_low["plain"]),
                                                    2),
                      "overhead_as_run_cpu_pct": round(pct(cpu_med["full"], cpu_med["plain"]),
                                                       2),
                      "threads": torch.get_num_threads(),
                      "spread_pct": {k: round(v, 1) for k, v in spread.items()},
                      "load_avg": round(load, 2), "load_avg_end": round(end_load, 2),
                      "effbench_img_s": round(thr["effbench"], 1),
                      "plain_img_s": round(thr["plain"], 1),
                      "effbench_s": round(med["effbench"], 3), "plain_s": round(med["plain"], 3),
                      "repeats": args.repeats, "epochs": args.epochs}))


if __name__ == "__main__":
    main()
