"""How much the pre-resized image cache saves per epoch, measured side by side in one run.

    python scripts/bench_image_cache.py [--images 300] [--size 500] [--res 224] [--workers 0]

Writes ``--images`` JPEGs of ``--size`` px in the Brain-MRI layout to a temporary folder, then times
one pass over all images (i) streamed: decode + resize per item, (ii) building the cache once,
(iii) reading the cache (a later epoch or a later run). Prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from effbench.backbones.base import Preprocessing  # noqa: E402
from effbench.data.brain_mri import CLASSES, BrainMRIDataModule  # noqa: E402


def write_jpegs(root: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        cls = CLASSES[i % 3]
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / cls / f"{i:05d}.jpg", quality=90)


def epoch_seconds(dm: BrainMRIDataModule) -> float:
    start = time.perf_counter()
    for split in ("train", "val", "test"):
        for _ in dm.loader(split, shuffle=False):
            pass
    return time.perf_counter() - start


def timed_setup(root: Path, res: int, workers: int, **kwargs) -> tuple[BrainMRIDataModule, float]:
    start = time.perf_counter()
    dm = BrainMRIDataModule(name="brain_mri", root=str(root), num_workers=workers, batch_size=32,
                            **kwargs).configure(Preprocessing(res, res))
    dm.setup()
    return dm, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--size", type=int, default=500)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--workers", type=int, default=0)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "data", Path(tmp) / "cache"
        write_jpegs(root, a.images, a.size)
        streamed, _ = timed_setup(root, a.res, a.workers)
        t_stream = epoch_seconds(streamed)
        _, t_build = timed_setup(root, a.res, a.workers, cache_images=True, cache_dir=str(cache))
        cached, t_reuse = timed_setup(root, a.res, a.workers, cache_images=True,
                                      cache_dir=str(cache))
        t_cached = epoch_seconds(cached)
    print(f"{a.images} JPEGs of {a.size} px → {a.res} px, {a.workers} workers")
    print(f"  streamed epoch (decode every image):  {t_stream:8.2f} s")
    print(f"  cache build (first run only):         {t_build:8.2f} s")
    print(f"  later run: open cache {t_reuse:6.2f} s + epoch {t_cached:6.2f} s")
    speedup = t_stream / max(t_cached, 1e-9)
    print(f"  epoch speed-up with the cache:        {speedup:8.1f}x")
    print(json.dumps({"cache_epoch_speedup": round(speedup, 2),
                      "streamed_epoch_s": round(t_stream, 3), "cached_epoch_s": round(t_cached, 3),
                      "cache_build_s": round(t_build, 3), "cache_open_s": round(t_reuse, 3),
                      "images": a.images, "size": a.size, "res": a.res, "workers": a.workers}))


if __name__ == "__main__":
    main()
