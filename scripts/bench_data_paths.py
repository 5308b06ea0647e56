"""The data paths of each dataset format, side by side in one run: images per second delivered to
the training loop (normalised float batches), per format and per path.

For each of the studies' on-disk formats (Brain-MRI JPEG folders, BreaKHis PNG slides,
ChestX-ray14 PNGs + CSV, beans JPEG splits, MedMNIST ``.npz``, CIFAR-10 pickles) it writes
``--images`` images in the real layout (the test suite's writers, ``tests/data/fakes.py``) at the
format's native size, then reads them through effbench's own datamodule
(``conf/dataset/<name>.yaml``) at ``--res`` px:

- file formats: (i) streamed, decode + resize per image in the loader, ``0`` workers and
  ``--workers`` workers; (ii) the pre-resized uint8 cache (``dataset.cache_images=true``): built
  once, then read from memory, and memory-mapped (``dataset.memory_budget_gb=0``);
- array formats (MedMNIST, CIFAR-10): parsed and resized once at set-up, then resident;
- with ``--device cuda`` every path also moves its batches to the GPU, and in-memory data is read
  from GPU memory as a run with ``hardware.data_on_device`` does (``effbench.resident``).

A pass reads every split once; a path's figure is its fastest pass, its median next to it (at
least ``--passes`` passes and ``--min-time`` seconds of them; set-up, worker start included, is
reported apart): on a shared virtual machine the paths with loader workers spread widely from
pass to pass. Ends with one JSON line. About a minute on a quiet 2-core CPU::

    .venv/bin/python scripts/bench_data_paths.py                    # 120 images per format
    .venv/bin/python scripts/bench_data_paths.py --formats chestxray14 --images 400 --workers 8
    .venv/bin/python scripts/bench_data_paths.py --device cuda --workers 8   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from effbench.backbones.base import Preprocessing  # noqa: E402
from effbench.data.base import ImageDataModule, TensorImages  # noqa: E402
from effbench.resident import DeviceImages  # noqa: E402

# The test suite's writers are the one place that knows each real layout (file names, CSV columns,
# split lists, npz keys, py2 pickles); the benchmark reuses them and only enlarges the images.
from tests.data import fakes  # noqa: E402

# format → native image size (width, height) of the real data, from the datasets' descriptions.
NATIVE = {"brain_mri": (512, 512), "breakhis": (700, 460), "chestxray14": (1024, 1024),
          "beans": (500, 500)}
ARRAYS = ("medmnist", "cifar10")
FORMATS = (*NATIVE, *ARRAYS)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset")
    p.add_argument("--images", type=int, default=120, help="about this many images per format")
    p.add_argument("--res", type=int, default=224, help="training resolution (px)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="loader workers of the streamed parallel path")
    p.add_argument("--passes", type=int, default=3, help="passes per path, at least")
    p.add_argument("--min-time", type=float, default=1.0,
                   help="seconds of timed passes per path, at least")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    return p.parse_args()


def write_format(name: str, root: Path, n: int) -> Path:
    """``name``'s real layout with about ``n`` images."""
    if name == "brain_mri":
        return fakes.write_brain_mri(root, per_class=max(4, n // 3))
    if name == "beans":
        k = max(6, n // 3)
        return fakes.write_beans(root, {"train": k - 2 * (k // 6), "validation": k // 6,
                                        "test": k // 6})
    if name == "breakhis":  # 8 tumour types x 4 magnifications per patient
        return fakes.write_breakhis(root, patients_per_type=max(3, n // 32))
    if name == "chestxray14":
        return fakes.write_chestxray14(root, patients=24, per_patient=max(1, n // 24))
    if name == "medmnist":
        return fakes.write_medmnist(root, sizes=(n - 2 * (n // 6), n // 6, n // 6))
    return fakes.write_cifar10(root, per_batch=max(20, n // 6))  # 10 classes in each split


def enlarge(root: Path, size: tuple[int, int]) -> int:
    """Rewrite every image under ``root`` at ``size`` (same mode and format). The content is a
    smooth random field with grain, which compresses about as photographs and scans do (pure
    noise would make decoding unrealistically slow, a flat image unrealistically fast)."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for i, path in enumerate(files):
        with Image.open(path) as tiny:
            mode = tiny.mode
        rng = np.random.default_rng(i)
        bands = 1 if mode == "L" else 3
        coarse = rng.integers(0, 256, (size[1] // 32 + 1, size[0] // 32 + 1, bands), np.uint8)
        field = np.asarray(Image.fromarray(coarse.squeeze(-1) if bands == 1 else coarse)
                           .resize(size, Image.BICUBIC), np.int16)
        grain = rng.integers(-6, 7, field.shape, dtype=np.int16)
        pixels = np.clip(field + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).convert(mode).save(path, quality=90)
    return len(files)


def datamodule(name: str, root: Path, cache: Path, res: int, workers: int,
               **options: Any) -> ImageDataModule:
    """effbench's datamodule for ``name`` from its config (``conf/dataset/<name>.yaml``)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "conf" / "dataset" / f"{name}.yaml")
    cfg.merge_with({"root": str(root), "num_workers": workers, "pin_memory": False,
                    "image_size": res, **({"cache_dir": str(cache)} if "cache_dir" in cfg else {}),
                    **options})
    dm = instantiate(cfg, _convert_="all")
    return dm.configure(Preprocessing(res, res))


def loaders(dm: ImageDataModule, batch: int) -> dict[str, DataLoader]:
    """One loader per split, kept for every pass as a run keeps them for every epoch (workers
    persist: their start-up is paid once, in the set-up figure)."""
    return {s: dm.loader(s, shuffle=s == "train", batch_size=batch)
            for s in ("train", "val", "test") if s in dm.datasets}


def one_pass(dm: ImageDataModule, split_loaders: dict[str, DataLoader],
             device: torch.device) -> int:
    """Every split once, as the training loop receives it; the number of images read."""
    seen = 0
    for split, loader in split_loaders.items():
        for x, _ in loader:
            x = dm.normalize(x.to(device, non_blocking=True), train=split == "train")
            seen += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen


def on_device(dm: ImageDataModule, device: torch.device) -> bool:
    """In-memory splits moved to GPU memory (what ``ResidentData`` does in a run)."""
    moved = False
    for split, ds in list(dm.datasets.items()):
        if isinstance(ds, TensorImages) and not isinstance(ds, DeviceImages):
            dm.datasets[split] = DeviceImages(ds.images.to(device), ds.labels.to(device))
            moved = True
    return moved


def measure(dm: ImageDataModule, device: torch.device, args: argparse.Namespace,
            resident: bool = False) -> dict[str, float]:
    start = time.perf_counter()
    dm.setup()
    if resident and not on_device(dm, device):
        return {}
    split_loaders = loaders(dm, args.batch)
    for loader in split_loaders.values():  # workers start here, not inside the first pass
        iter(loader)
    setup = time.perf_counter() - start
    times: list[float] = []
    n = 0
    # A cached pass takes tens of milliseconds: fast paths repeat until --min-time is spent.
    while len(times) < args.passes or sum(times) < args.min_time:
        start = time.perf_counter()
        n = one_pass(dm, split_loaders, device)
        times.append(time.perf_counter() - start)
    return {"setup_s": round(setup, 3), "img_s": round(n / min(times), 1),
            "median_img_s": round(n / statistics.median(times), 1), "images": n,
            "passes": len(times)}


def paths_of(name: str, root: Path, tmp: Path, args: argparse.Namespace,
             device: torch.device) -> dict[str, dict[str, float]]:
    def dm(workers: int = 0, **options: Any) -> ImageDataModule:
        return datamodule(name, root, tmp / "cache", args.res, workers, **options)

    out: dict[str, dict[str, float]] = {}
    if name in ARRAYS:
        out["resident"] = measure(dm(), device, args)
    else:
        out["streamed_0w"] = measure(dm(0), device, args)
        out[f"streamed_{args.workers}w"] = measure(dm(args.workers), device, args)
        out["cache_build"] = {"setup_s": measure(dm(0, cache_images=True), device,
                                                 args)["setup_s"]}
        out["cached_ram"] = measure(dm(0, cache_images=True), device, args)
        out["cached_mmap"] = measure(dm(args.workers, cache_images=True, memory_budget_gb=0.0),
                                     device, args)
    if device.type == "cuda":
        options = {"cache_images": True} if name not in ARRAYS else {}
        resident = measure(dm(0, **options), device, args, resident=True)
        if resident:  # {}: no split was in memory to move
            out["on_gpu"] = resident
    return out


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    names = [n.strip() for n in args.formats.split(",") if n.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        sys.exit(f"unknown format {unknown[0]!r}: use {', '.join(FORMATS)}")
    load_start = os.getloadavg()[0]
    print(f"data paths at {args.res} px, batch {args.batch}, {args.workers} workers for the "
          f"parallel paths, {device}; load average {load_start:.2f}")
    results: dict[str, Any] = {}
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            root = write_format(name, Path(tmp) / "data", args.images)
            if name in NATIVE:
                w, h = NATIVE[name]
                print(f"{name}: {enlarge(root, NATIVE[name])} images of {w}x{h} px", flush=True)
            else:
                print(f"{name}: array file", flush=True)
            results[name] = paths_of(name, root, Path(tmp), args, device)
        base = results[name].get("streamed_0w") or results[name].get("resident")
        for path, fig in results[name].items():
            if "img_s" in fig:
                print(f"  {path:<14}{fig['img_s']:9.0f} img/s (median {fig['median_img_s']:7.0f})"
                      f"  {fig['img_s'] / base['img_s']:6.1f}x  set-up {fig['setup_s']:6.2f} s",
                      flush=True)
            else:
                print(f"  {path:<14}{'':42}set-up {fig['setup_s']:6.2f} s", flush=True)
    headline = {f"{n}_cache_vs_streamed":
                round(r["cached_ram"]["img_s"] / r["streamed_0w"]["img_s"], 1)
                for n, r in results.items() if "cached_ram" in r}
    print(json.dumps({**headline, "res": args.res, "device": str(device),
                      "load_start": round(load_start, 2), "load_end": round(os.getloadavg()[0], 2),
                      "paths": results}))


if __name__ == "__main__":
    main()
