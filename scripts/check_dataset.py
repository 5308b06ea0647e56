"""Check a downloaded dataset: counts per class, split and patient, patient leakage, decoding.

    python scripts/check_dataset.py breakhis --root data/breakhis
    python scripts/check_dataset.py chestxray14 --root /data/nih dataset.labels=[Pneumonia]
    python scripts/check_dataset.py brain_mri --decode 50      # also open 50 files per split

The dataset is listed exactly as a run would list it (same config group, same overrides), without
decoding images (except ``--decode``) and without building the image cache. Exit status: 0 when all
is well, 1 when a check fails (leakage, undecodable files, empty split), 2 when the data is not
found or a value is bad (the message says what to do).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from effbench.backbones.base import Preprocessing  # noqa: E402
from effbench.data.base import ImageDataModule  # noqa: E402
from effbench.errors import EffbenchError  # noqa: E402

# What the official downloads hold (images, patients), to compare with what was found.
EXPECTED = {
    "beans": "1,295 images: train 1,034 / validation 133 / test 128",
    "brain_mri": "about 6,056 images in 3 classes",
    "breakhis": "7,909 images of 82 patients (2,480 benign / 5,429 malignant; ~2,000 per "
                "magnification)",
    "chestxray14": "112,120 images of 30,805 patients: train_val 86,524 / test 25,596",
    "medmnist": "see the MedMNIST table for the flag's split sizes",
}


def build(name: str, overrides: list[str]) -> ImageDataModule:
    import effbench.cli  # noqa: F401 - registers the resolvers the configs use

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"dataset={name}", "hardware=cpu", *overrides])
    with open_dict(cfg):
        if "cache_images" in cfg.dataset:
            cfg.dataset.cache_images = False  # a check never writes the cache
        cfg.dataset.num_workers = 0
    dm: ImageDataModule = instantiate(cfg.dataset, _convert_="all")
    dm.configure(Preprocessing(32, 32))
    dm.setup()
    return dm


def count_table(dm: ImageDataModule) -> list[str]:
    splits = list(dm.labels)
    head = "multilabel: positives per label" if dm.task == "multilabel" else "images per class"
    lines = [f"{head:<40}" + "".join(f"{s:>10}" for s in splits)]
    counts = {s: dm.class_counts(s) for s in splits}
    for i, name in enumerate(dm.class_names):
        lines.append(f"  {name[:38]:<38}" + "".join(f"{int(counts[s][i]):>10}" for s in splits))
    lines.append(f"  {'total images':<38}" + "".join(f"{len(dm.labels[s]):>10}" for s in splits))
    groups = getattr(dm, "groups", {})
    if groups:
        lines.append(f"  {'patients':<38}" + "".join(f"{len(set(groups.get(s, []))):>10}"
                                                       for s in splits))
    return lines


def leaks(dm: ImageDataModule) -> list[str]:
    """Patients found in more than one split."""
    groups = {s: set(g) for s, g in getattr(dm, "groups", {}).items()}
    names = list(groups)
    return [f"{len(groups[a] & groups[b])} patients in both {a} and {b}"
            for i, a in enumerate(names) for b in names[i + 1:] if groups[a] & groups[b]]


def decode_failures(dm: ImageDataModule, n: int | None, seed: int = 0) -> list[str]:
    """Open ``n`` random items per split (all when ``n`` is None); the ones that fail."""
    failures = []
    for split, ds in dm.datasets.items():
        idx = list(range(len(ds)))
        if n is not None:
            idx = random.Random(seed).sample(idx, min(n, len(idx)))
        for i in idx:
            try:
                x, _ = ds[i]
                assert isinstance(x, torch.Tensor) and x.dtype == torch.uint8
            except Exception as err:  # noqa: BLE001 - report every bad file, not the first
                where = getattr(ds, "paths", None)
                failures.append(f"{split}[{i}] {where[i] if where else ''}: {err}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", help="dataset config name (conf/dataset/<name>.yaml)")
    parser.add_argument("--root", help="the downloaded copy (default: the config's dataset.root)")
    parser.add_argument("--decode", default="0",
                        help="open N random files per split, or 'all' (default 0)")
    parser.add_argument("overrides", nargs="*",
                        help="more Hydra overrides, e.g. dataset.label=subtype")
    args = parser.parse_intermixed_args(argv)
    overrides = [*([f"dataset.root={args.root}"] if args.root else []), *args.overrides]
    try:
        dm = build(args.name, overrides)
    except EffbenchError as err:
        print(f"error: {err}")
        return 2
    print(f"{args.name} at {dm.root}: {dm.task}, {dm.num_classes} classes")
    if args.name in EXPECTED:
        print(f"official download: {EXPECTED[args.name]}")
    print("\n".join(count_table(dm)))
    problems = leaks(dm) + [f"split {s} is empty" for s, y in dm.labels.items() if len(y) == 0]
    if getattr(dm, "groups", {}):
        print("patient leakage: " + ("; ".join(leaks(dm)) or "none (no patient in two splits)"))
    if args.decode != "0":
        failures = decode_failures(dm, None if args.decode == "all" else int(args.decode))
        print(f"decoding: {len(failures)} failures")
        problems += failures
    for p in problems:
        print(f"problem: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
