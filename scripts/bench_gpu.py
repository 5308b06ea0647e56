"""GPU training throughput: fp32 vs AMP + channels_last, effbench vs a plain loop, resident vs JPEG.

Measured side by side in one run on one CUDA GPU, per model (default resnet18, resnet50,
densenet121; random init, 224 px, synthetic uint8 images):

- plain PyTorch loop on effbench's own model (backbone + head + loss, ``effbench.run.build_run``)
  and data, the uint8 training images already on the GPU: fp32, then each AMP dtype (``--amp``;
  default bf16 and fp16 where the GPU has bf16, fp16 with a GradScaler) + channels_last, and with
  ``--compile`` the first AMP under ``torch.compile``; cuDNN autotuning on, as a hand-written loop
  would run;
- effbench through the real pipeline (``run_overrides``: hardware=auto, dataset=synthetic,
  trainer.precision=..., hardware.channels_last=..., with ``--compile`` hardware.compile=true):
  two runs of ``--warmup`` and ``--warmup`` + ``--steps`` batches; img/s = the difference of their
  training images over the difference of their training times (both from ``summary.json``:
  ``throughput_img_s`` x ``time_s.train``), so fit set-up and warm-up cancel and the steady
  per-step cost remains, like the plain loop's;
- host-device synchronisations per effbench training step (first AMP + channels_last): the same
  two runs under ``torch.cuda.set_sync_debug_mode("warn")``, the difference of their counts over
  ``--steps``, with the lines that synchronise (``--no-syncs``: leave out).

For the first model, AMP + channels_last, the data paths: GPU-resident uint8; uint8 batches from
CPU memory copied per step (effbench's in-memory path); the resident loop under effbench's
determinism (``trainer.deterministic=warn``: deterministic algorithms, no cuDNN autotuning);
streamed JPEGs (``--jpeg-size`` px, written to a temporary folder) decoded by ``--workers``
DataLoader workers (effbench's ``dataset=imagefolder`` loader, in the plain loop); the same files
decoded on the GPU by ``torchvision.io.decode_jpeg(device="cuda")`` (nvJPEG, where available);
and effbench's ``dataset=imagefolder`` run.

Prints the tables, a reference figure, and ends with one JSON line of headline figures. Without a
CUDA GPU it prints one sentence and ``{"skipped": "no CUDA GPU"}`` and exits 0. ``--check``
composes every effbench job's config (no GPU needed): a key effbench no longer has fails there,
in one message. Extra arguments are Hydra overrides for every effbench job (and the plain loop's
model and data), e.g. ``trainer.deterministic=false``.

    .venv/bin/python scripts/bench_gpu.py                    # several minutes on one GPU
    .venv/bin/python scripts/bench_gpu.py --check            # configs only, no GPU
    .venv/bin/python scripts/bench_gpu.py --models resnet18 --steps 20 --compile
    .venv/bin/python scripts/bench_gpu.py --compile --skip-jpeg --models resnet18   # one model of
        # the full table (fp32, bf16, fp16, compile, syncs per step); one call per model
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = ("resnet18", "resnet50", "densenet121")
REFERENCE = ("reference: timm, resnet18 AMP + channels_last training on an RTX 3090 "
             "≈ 3,500 img/s")
SKIPPED = {"skipped": "no CUDA GPU"}
UNIQUE_JPEGS = 32  # distinct encoded images; the files repeat them (decode cost is per file)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Without a CUDA GPU: skipped (exit 0).")
    p.add_argument("--models", nargs="+", default=list(MODELS), help="effbench backbone names")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=40, help="timed training steps per measurement")
    p.add_argument("--warmup", type=int, default=10,
                   help="untimed steps first (allocator, cuDNN autotuning, compilation)")
    p.add_argument("--amp", nargs="+", choices=["bf16", "fp16"],
                   help="the mixed precisions measured next to fp32 (default: bf16 and fp16 "
                        "where the GPU has bf16, else fp16)")
    p.add_argument("--compile", action="store_true",
                   help="also torch.compile, first AMP + channels_last: the plain loop and "
                        "effbench's hardware.compile=true")
    p.add_argument("--no-syncs", action="store_true",
                   help="leave out the count of host-device synchronisations per effbench step")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--jpeg-size", type=int, default=256,
                   help="side of the written JPEGs (resized to --image-size when loaded)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader workers of the streamed JPEG paths")
    p.add_argument("--skip-jpeg", action="store_true", help="leave out the streamed JPEG paths")
    p.add_argument("--check", action="store_true",
                   help="only compose every effbench job's config (no GPU needed) and exit")
    p.add_argument("--json", type=Path, help="also write all figures here")
    p.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)  # code path test only
    p.add_argument("overrides", nargs="*",
                   help="extra Hydra overrides for every effbench job, e.g. "
                        "trainer.deterministic=false")
    args = p.parse_args(argv)
    # --models takes every word after it: Hydra overrides (key=value) given after it go back.
    words = [w for m in args.models for w in m.split(",") if w]
    args.models = [w for w in words if "=" not in w]
    args.overrides = [w for w in words if "=" in w] + args.overrides
    if not args.models:
        p.error("--models needs at least one backbone name")
    if args.batch < 2 or args.steps < 1 or args.warmup < 1:
        p.error("--batch must be >= 2, --steps and --warmup >= 1")
    return args


# -- effbench configs ----------------------------------------------------------------------------

def precision_of(amp: str | None) -> str:
    return {None: "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[amp]


def common_overrides(args: argparse.Namespace, amp: str | None, channels_last: bool) -> list[str]:
    return ["hardware=cpu" if args.cpu else "hardware=auto", "backbone.weights=null",
            "strategy=finetune", f"trainer.precision={precision_of(amp)}",
            f"hardware.channels_last={str(channels_last).lower()}", "optim.scheduler=null",
            "optim.early_stopping=null", "optim.checkpoint=false", "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false", "tracking.energy=false",
            f"dataset.image_size={args.image_size}", f"dataset.batch_size={args.batch}",
            f"dataset.eval_batch_size={args.batch}"]


def synthetic_overrides(args: argparse.Namespace, model: str, amp: str | None,
                        channels_last: bool, batches: int, compiled: bool = False) -> list[str]:
    """One training epoch of ``batches`` full batches; one batch of val and test images."""
    return [f"backbone={model}", "dataset=synthetic", *common_overrides(args, amp, channels_last),
            f"dataset.num_train={batches * args.batch}", f"dataset.num_val={args.batch}",
            f"dataset.num_test={args.batch}", "dataset.resolution=32",
            *(["hardware.compile=true"] if compiled else []), *args.overrides]


def effbench_settings(args: argparse.Namespace, amps: list[str]
                      ) -> list[tuple[str, str | None, bool, bool]]:
    """(result key, AMP dtype or None, channels_last, compiled) of every effbench measurement of a
    model: fp32, each AMP + channels_last, and with --compile the first AMP compiled."""
    out = [("effbench_fp32", None, False, False)]
    out += [(f"effbench_{amp}_cl", amp, True, False) for amp in amps]
    if args.compile:
        out.append((f"effbench_{amps[0]}_cl_compile", amps[0], True, True))
    return out


def imagefolder_overrides(args: argparse.Namespace, model: str, amp: str | None, root: Path,
                          batches: int | None) -> list[str]:
    """Streamed JPEGs from ``root`` (train/ val/ test/); ``batches`` caps the training images."""
    cap = "null" if batches is None else str(batches * args.batch)
    return [f"backbone={model}", "dataset=imagefolder",
            *common_overrides(args, amp, channels_last=True), f"dataset.root={root}",
            f"hardware.num_workers={args.workers}", f"dataset.max_samples={cap}",
            *args.overrides]


def compose(overrides: list[str]):
    """The job's config as the CLI composes it; a key or option effbench does not have is one
    clear message, not a traceback."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from effbench.config import CONF_DIR, register_resolvers

    register_resolvers()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = hydra_compose("config", overrides=list(overrides))
    except Exception as err:  # noqa: BLE001 - Hydra's composition errors have several types
        lines = [*str(err).strip().splitlines(), *([str(err.__cause__)] if err.__cause__ else [])]
        why = "\n    ".join(line for line in lines if line.strip())
        raise SystemExit(
            "bench_gpu: effbench refuses this job's overrides (has the config tree changed? list "
            "its keys with `.venv/bin/python -m effbench.cli --cfg job` and update "
            f"scripts/bench_gpu.py):\n    {why}\n  overrides: {' '.join(overrides)}") from None
    OmegaConf.set_struct(cfg, False)
    return cfg


def all_jobs(args: argparse.Namespace, amps: list[str], jpeg_root: Path) -> list[list[str]]:
    jobs = []
    for model in args.models:
        for _, prec, cl, compiled in effbench_settings(args, amps):
            jobs += [synthetic_overrides(args, model, prec, cl, n, compiled)
                     for n in (args.warmup, args.warmup + args.steps)]
    if not args.skip_jpeg:
        jobs += [imagefolder_overrides(args, args.models[0], amps[0], jpeg_root, n)
                 for n in (args.warmup, None)]
    return jobs


def effbench_job(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    from effbench.run import run_overrides

    summary = run_overrides(overrides, run_dir)
    if summary["status"] != "completed":
        raise SystemExit(f"bench_gpu: effbench job failed: {summary['error']}\n  overrides: "
                         f"{' '.join(overrides)}")
    if not summary.get("throughput_img_s") or not summary["time_s"].get("train"):
        raise SystemExit("bench_gpu: the effbench summary has no throughput_img_s / "
                         f"time_s.train (schema changed?)\n  overrides: {' '.join(overrides)}")
    return summary


def effbench_img_s(args: argparse.Namespace, jobs: list[list[str]],
                   tmp: Path) -> dict[str, float]:
    """Steady img/s from a short and a long run (their summaries' throughput_img_s): set-up and
    warm-up are the same in both and cancel."""
    short, long = (effbench_job(o, tmp / f"effbench_{time.time_ns()}") for o in jobs)
    (i1, t1), (i2, t2) = ((s["throughput_img_s"] * s["time_s"]["train"], s["time_s"]["train"])
                          for s in (short, long))
    steady = (i2 - i1) / (t2 - t1) if t2 > t1 and i2 > i1 else math.nan
    reset_flags()
    return {"steady": steady, "summary": long["throughput_img_s"], "train_s": t2,
            "precision": long["hardware"]["precision"]}


# -- the plain loop ------------------------------------------------------------------------------

def reset_flags(benchmark: bool = True) -> None:
    """A hand-written loop's settings (Lightning's ``deterministic=warn`` changes global flags)."""
    import torch

    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False
    torch.backends.cudnn.benchmark = benchmark


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_img_s(model, loss_fn: Callable, next_batch: Callable, args: argparse.Namespace, device,
                amp_dtype=None, channels_last: bool = False, compiled: bool = False) -> float:
    """Images per second of ``--steps`` training steps after ``--warmup`` untimed ones."""
    import torch

    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)  # effbench's default
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)

    def step() -> int:
        x, y = next_batch()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            loss = loss_fn(forward(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return len(y)

    for _ in range(args.warmup):
        step()
    sync(device)
    start, images = time.perf_counter(), 0
    for _ in range(args.steps):
        images += step()
    sync(device)
    return images / (time.perf_counter() - start)


def resident_batches(dm, device, batch: int) -> Callable:
    """Shuffled batches of the training images held on ``device`` as uint8."""
    import torch

    images = dm.datasets["train"].images.to(device)
    labels = dm.labels["train"].to(device)
    state = {"perm": torch.randperm(len(labels), device=device), "pos": 0}

    def next_batch():
        if state["pos"] + batch > len(labels):
            state["perm"], state["pos"] = torch.randperm(len(labels), device=device), 0
        idx = state["perm"][state["pos"]:state["pos"] + batch]
        state["pos"] += batch
        return dm.normalize(images[idx], train=True), labels[idx]

    return next_batch


def cycle(make: Callable[[], Any]) -> Iterator:
    while True:
        yield from make()


def loader_batches(dm, device, **loader_kwargs) -> Callable:
    """effbench's own train loader (in-memory uint8 or streamed files), copied per step."""
    loader = dm.loader("train", **loader_kwargs)
    it = cycle(lambda: loader)

    def next_batch():
        x, y = next(it)
        return (dm.normalize(x.to(device, non_blocking=True), train=True),
                y.to(device, non_blocking=True))

    return next_batch


class EncodedFiles:
    """File bytes as uint8 tensors (read in DataLoader workers); decoding happens on the GPU."""

    def __init__(self, paths: list[Path], labels) -> None:
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch

        # Plain bytes (torchvision's read_file maps the file: its storage cannot be sent back to
        # the main process, the worker fails with EBADF and the loader waits for ever).
        return torch.frombuffer(bytearray(Path(self.paths[i]).read_bytes()),
                                dtype=torch.uint8), self.labels[i]


def keep_encoded(items: list) -> tuple[list, Any]:
    import torch

    return [data for data, _ in items], torch.stack([torch.as_tensor(y) for _, y in items])


def gpu_decode_batches(dm, device, batch: int, workers: int) -> Callable:
    """Bytes from workers, ``decode_jpeg(device=...)`` (batched where torchvision can), the same
    resize as effbench's loader, on the GPU."""
    from torch.utils.data import DataLoader
    from torchvision.io import decode_jpeg

    from effbench.data.base import resize_crop

    files = dm.datasets["train"]
    loader = DataLoader(EncodedFiles(files.paths, dm.labels["train"]), batch_size=batch,
                        shuffle=True, num_workers=workers, persistent_workers=workers > 0,
                        collate_fn=keep_encoded, drop_last=len(files) >= batch,
                        timeout=300 if workers > 0 else 0)
    it = cycle(lambda: loader)
    decode_jpeg(loader.dataset[0][0], device=device)  # not available: raises here, not timed
    import torch

    def next_batch():
        data, y = next(it)
        images = decode_jpeg(data, device=device)
        x = resize_crop(torch.stack(images), files.pre) if len({i.shape for i in images}) == 1 \
            else torch.stack([resize_crop(i[None], files.pre)[0] for i in images])
        return dm.normalize(x, train=True), y.to(device, non_blocking=True)

    return next_batch


def deterministic_like_effbench():
    """Lightning's ``deterministic="warn"`` with ``benchmark=None``, as effbench's trainer runs."""
    import torch

    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


# -- data on disk --------------------------------------------------------------------------------

def write_jpegs(root: Path, n_train: int, n_eval: int, size: int) -> None:
    """``root/{train,val,test}/class_{0,1}/*.jpg``: smooth colour fields with noise, quality 90."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(UNIQUE_JPEGS):
        coarse = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8))
        smooth = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.int16)
        noisy = (smooth + rng.integers(-24, 25, smooth.shape)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    for split, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        for i in range(n):
            folder = root / split / f"class_{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:06d}.jpg").write_bytes(blobs[i % UNIQUE_JPEGS])


# -- the benchmark -------------------------------------------------------------------------------

def amp_dtype_names(args: argparse.Namespace) -> list[str]:
    """--amp, or every mixed precision this GPU runs (bf16 first where it has it)."""
    import torch

    if args.amp:
        return list(dict.fromkeys(args.amp))
    if args.cpu or args.check:
        return ["bf16"] if args.cpu else ["bf16", "fp16"]
    return ["bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp16"]


def syncs_per_step(args: argparse.Namespace, model: str, amp: str, tmp: Path) -> float | None:
    """Host-device synchronisations per training step of effbench (AMP + channels_last): the
    short and the long run again under ``torch.cuda.set_sync_debug_mode("warn")``, which warns at
    every synchronising call; the difference of their counts over the difference of their steps,
    so set-up, validation and the epoch's end cancel. 0 is the goal: each one stops the CPU from
    queueing the next step's kernels while the GPU works."""
    import torch

    if args.cpu:
        return None
    counts = []
    for n in (args.warmup, args.warmup + args.steps):
        overrides = synthetic_overrides(args, model, amp, True, n)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                effbench_job(overrides, tmp / f"syncs_{time.time_ns()}")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncing = [w for w in seen if "synchroniz" in str(w.message)]
        counts.append(len(syncing))
        if n > args.warmup and syncing:
            where = {f"{w.filename}:{w.lineno}" for w in syncing}
            print(f"  {model}: synchronising calls at {', '.join(sorted(where)[:8])}", flush=True)
        reset_flags()
    return (counts[1] - counts[0]) / args.steps


def measure_model(args: argparse.Namespace, model: str, amps: list[str], device, tmp: Path,
                  data_paths: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    from effbench.run import build_run

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    amp, dtype = amps[0], dtypes[amps[0]]
    res: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    # The plain loop: effbench's model and data (the long run's), built but not trained.
    reset_flags()
    torch.manual_seed(0)
    long_fp32 = synthetic_overrides(args, model, None, False, args.warmup + args.steps)
    ctx = build_run(compose(long_fp32), tmp / f"plain_{model}")
    system, dm = ctx.system, ctx.datamodule
    resident = resident_batches(dm, device, args.batch)
    res["plain_fp32"] = train_img_s(system, system.loss_fn, resident, args, device)
    print(f"  {model}: plain fp32 {res['plain_fp32']:.0f} img/s", flush=True)
    for each in amps:
        res[f"plain_{each}_cl"] = train_img_s(system, system.loss_fn, resident, args, device,
                                              dtypes[each], channels_last=True)
        print(f"  {model}: plain {each} + channels_last {res[f'plain_{each}_cl']:.0f} img/s",
              flush=True)
    if args.compile:
        res[f"plain_{amp}_cl_compile"] = train_img_s(system, system.loss_fn, resident, args,
                                                     device, dtype, channels_last=True,
                                                     compiled=True)
        print(f"  {model}: plain {amp} + channels_last + compile "
              f"{res[f'plain_{amp}_cl_compile']:.0f} img/s", flush=True)
    if data_paths:
        paths["resident"] = res[f"plain_{amp}_cl"]
        paths["cpu_memory"] = train_img_s(system, system.loss_fn, loader_batches(dm, device),
                                          args, device, dtype, channels_last=True)
        deterministic_like_effbench()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            paths["deterministic"] = train_img_s(system, system.loss_fn, resident, args, device,
                                                 dtype, channels_last=True)
        reset_flags()
        print(f"  {model}: plain {amp} + channels_last, uint8 from CPU memory "
              f"{paths['cpu_memory']:.0f} img/s, under effbench's determinism "
              f"{paths['deterministic']:.0f} img/s", flush=True)
    del ctx, system, dm, resident
    free_memory()
    # effbench, the real pipeline.
    for key, prec, cl, compiled in effbench_settings(args, amps):
        jobs = [synthetic_overrides(args, model, prec, cl, n, compiled)
                for n in (args.warmup, args.warmup + args.steps)]
        got = effbench_img_s(args, jobs, tmp)
        res[key], res[f"{key}_summary"] = got["steady"], got["summary"]
        res[f"{key}_precision"] = got["precision"]
        print(f"  {model}: effbench {got['precision']}{' + channels_last' if cl else ''}"
              f"{' + compile' if compiled else ''} {got['steady']:.0f} img/s steady "
              f"({got['summary']:.0f} img/s in the summary, set-up and warm-up included)",
              flush=True)
        free_memory()
    if not args.no_syncs:
        res["syncs_per_step"] = syncs_per_step(args, model, amp, tmp)
        print(f"  {model}: effbench {amp} + channels_last: {fmt(res['syncs_per_step'], '.2f')} "
              "host-device synchronisations per training step", flush=True)
        free_memory()
    return res, paths


def measure_jpeg(args: argparse.Namespace, model: str, amp: str, device, tmp: Path,
                 paths: dict[str, Any]) -> None:
    import torch

    from effbench.run import build_run

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    root = tmp / "jpegs"
    start = time.perf_counter()
    write_jpegs(root, args.batch * (args.warmup + args.steps), args.batch, args.jpeg_size)
    print(f"  wrote {args.batch * (args.warmup + args.steps + 2)} JPEGs of {args.jpeg_size} px "
          f"in {time.perf_counter() - start:.1f} s", flush=True)
    reset_flags()
    torch.manual_seed(0)
    ctx = build_run(compose(imagefolder_overrides(args, model, amp, root, None)),
                    tmp / "plain_jpeg")
    system, dm = ctx.system, ctx.datamodule
    paths["jpeg_workers"] = train_img_s(system, system.loss_fn, loader_batches(dm, device), args,
                                        device, dtype, channels_last=True)
    print(f"  {model}: streamed JPEG, {args.workers} workers {paths['jpeg_workers']:.0f} img/s",
          flush=True)
    try:
        decode = gpu_decode_batches(dm, device, args.batch, args.workers)
    except Exception as err:  # noqa: BLE001 - no nvJPEG in this torchvision build, or no GPU
        paths["jpeg_gpu_decode"] = None
        paths["jpeg_gpu_decode_error"] = f"{type(err).__name__}: {err}"
        print(f"  {model}: decode_jpeg(device={device.type!r}) not available: "
              f"{paths['jpeg_gpu_decode_error']}", flush=True)
    else:
        paths["jpeg_gpu_decode"] = train_img_s(system, system.loss_fn, decode, args, device,
                                               dtype, channels_last=True)
        print(f"  {model}: streamed JPEG, decode_jpeg(device={device.type!r}) "
              f"{paths['jpeg_gpu_decode']:.0f} img/s", flush=True)
    del ctx, system, dm
    free_memory()
    jobs = [imagefolder_overrides(args, model, amp, root, n) for n in (args.warmup, None)]
    got = effbench_img_s(args, jobs, tmp)
    paths["effbench_jpeg"], paths["effbench_jpeg_summary"] = got["steady"], got["summary"]
    print(f"  {model}: effbench dataset=imagefolder {got['steady']:.0f} img/s steady "
          f"({got['summary']:.0f} in the summary)", flush=True)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def fmt(v: float | None, spec: str = ".0f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def report(args: argparse.Namespace, amps: list[str], device_name: str,
           results: dict[str, dict], paths: dict[str, Any]) -> None:
    import torch

    print(f"\n== training throughput, {device_name}, torch {torch.__version__}, batch {args.batch}"
          f", {args.image_size} px, {args.steps} timed steps after {args.warmup} warm-up; "
          f"img/s ==")
    print("plain loop: uint8 images on the GPU, cuDNN autotuning on; fp32 = torch's defaults "
          f"(TF32 convolutions: {torch.backends.cudnn.allow_tf32}); effbench: steady img/s from "
          "two runs' summaries")
    head = (f"{'model':12} {'precision':30} {'plain':>8} {'effbench':>9} {'eb/plain':>9} "
            f"{'vs fp32':>8} {'eb summary':>11}")
    print(head)
    amp = amps[0]
    rows = [("fp32", "plain_fp32", "effbench_fp32")]
    rows += [(f"{each} + channels_last", f"plain_{each}_cl", f"effbench_{each}_cl")
             for each in amps]
    if args.compile:
        rows.append((f"{amp} + channels_last + compile", f"plain_{amp}_cl_compile",
                     f"effbench_{amp}_cl_compile"))
    for model, r in results.items():
        for label, plain, eb in rows:
            e = r.get(eb) if eb else None
            print(f"{model:12} {label:30} {fmt(r.get(plain)):>8} {fmt(e):>9} "
                  f"{fmt(ratio(e, r.get(plain)), '.2f'):>9} "
                  f"{fmt(ratio(r.get(plain), r['plain_fp32']), '.2f'):>8} "
                  f"{fmt(r.get(f'{eb}_summary') if eb else None):>11}")
    if not args.no_syncs:
        print("host-device synchronisations per effbench training step ("
              f"{amp} + channels_last; 0 is the goal): "
              + ", ".join(f"{m} {fmt(r.get('syncs_per_step'), '.2f')}"
                          for m, r in results.items()))
    if paths:
        first = next(iter(results))
        base = paths["resident"]
        print(f"\ndata paths, {first}, {amp} + channels_last{'':14} {'img/s':>8} "
              f"{'vs resident':>12}")
        for key, label in (
                ("resident", "plain, uint8 on the GPU"),
                ("cpu_memory", "plain, uint8 from CPU memory per step"),
                ("deterministic", "plain, on the GPU, effbench's determinism"),
                ("jpeg_workers", f"plain, JPEG decoded by {args.workers} workers"),
                ("jpeg_gpu_decode", "plain, JPEG decode_jpeg on the GPU"),
                ("effbench_jpeg", "effbench, dataset=imagefolder (workers)")):
            if key in paths:
                print(f"  {label:54} {fmt(paths[key]):>8} "
                      f"{fmt(ratio(paths[key], base), '.2f'):>12}")
        if paths.get("jpeg_gpu_decode_error"):
            print(f"  (GPU decoding not available: {paths['jpeg_gpu_decode_error']})")
    print(f"\n{REFERENCE}")


def headline(args: argparse.Namespace, amps: list[str], device_name: str,
             results: dict[str, dict], paths: dict[str, Any]) -> dict[str, Any]:
    import torch

    first = next(iter(results))
    r = results[first]

    def rnd(v: float | None, nd: int = 3) -> float | None:
        return None if v is None or math.isnan(v) else round(v, nd)

    amp = amps[0]
    # effbench / plain for every model and precision: the goal is >= 0.95 for each.
    vs_plain = {m: {"fp32": rnd(ratio(res.get("effbench_fp32"), res.get("plain_fp32"))),
                    **{each: rnd(ratio(res.get(f"effbench_{each}_cl"),
                                       res.get(f"plain_{each}_cl"))) for each in amps}}
                for m, res in results.items()}
    out = {"device": device_name, "torch": torch.__version__, "amp_dtype": amp,
           "amp_dtypes": amps,
           "batch": args.batch, "image_size": args.image_size, "headline_model": first,
           f"{first}_amp_cl_img_s": rnd(r[f"plain_{amp}_cl"], 1),
           f"{first}_fp32_img_s": rnd(r["plain_fp32"], 1),
           "amp_speedup": rnd(ratio(r[f"plain_{amp}_cl"], r["plain_fp32"])),
           "effbench_vs_plain": rnd(ratio(r[f"effbench_{amp}_cl"], r[f"plain_{amp}_cl"])),
           "effbench_vs_plain_fp32": rnd(ratio(r["effbench_fp32"], r["plain_fp32"])),
           "effbench_vs_plain_min": min((v for per in vs_plain.values() for v in per.values()
                                         if v is not None), default=None),
           "effbench_vs_plain_all": vs_plain,
           "compile_speedup": rnd(ratio(r.get(f"plain_{amp}_cl_compile"), r[f"plain_{amp}_cl"])),
           "effbench_compile_speedup": rnd(ratio(r.get(f"effbench_{amp}_cl_compile"),
                                                 r[f"effbench_{amp}_cl"])),
           "syncs_per_step": {m: res.get("syncs_per_step") for m, res in results.items()},
           "gpu_decode_speedup": rnd(ratio(paths.get("jpeg_gpu_decode"),
                                           paths.get("jpeg_workers"))),
           "streamed_vs_resident": rnd(ratio(paths.get("jpeg_workers"), paths.get("resident"))),
           "deterministic_vs_plain": rnd(ratio(paths.get("deterministic"),
                                               paths.get("resident"))),
           "models": {m: {k: rnd(v, 1) for k, v in res.items() if not k.endswith("precision")}
                      for m, res in results.items()}}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check:
        jobs = all_jobs(args, amp_dtype_names(args), Path(tempfile.gettempdir()) /
                        "bench_gpu_check")
        for overrides in jobs:
            compose(overrides)
        print(f"all {len(jobs)} effbench job configs compose")
        print(json.dumps({"checked_configs": len(jobs)}))
        return 0
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA GPU: skipped")
        print(json.dumps(SKIPPED))
        return 0
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    device = torch.device("cpu" if args.cpu else "cuda")
    device_name = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    amps = amp_dtype_names(args)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        for overrides in all_jobs(args, amps, Path(tmp) / "jpegs"):  # fail before measuring
            compose(overrides)
        print(f"{device_name}: {', '.join(args.models)}; AMP dtypes {', '.join(amps)}",
              flush=True)
        results: dict[str, dict] = {}
        paths: dict[str, Any] = {}
        for i, model in enumerate(args.models):
            results[model], got = measure_model(args, model, amps, device, Path(tmp), i == 0)
            paths.update(got)
        if not args.skip_jpeg:
            measure_jpeg(args, args.models[0], amps[0], device, Path(tmp), paths)
    report(args, amps, device_name, results, paths)
    figures = headline(args, amps, device_name, results, paths)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), "headline": figures,
                                         "models": results, "data_paths": paths}, indent=2,
                                        default=str))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
