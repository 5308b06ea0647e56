"""The foundation's loaders read their real formats (tiny generated files) and split right."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from effbench.backbones.base import Preprocessing
from effbench.data.cifar10 import Cifar10DataModule
from effbench.data.digits import DigitsDataModule
from effbench.data.imagefolder import ImageFolderDataModule
from effbench.data.synthetic import SyntheticDataModule
from effbench.errors import EffbenchError

PRE = Preprocessing(16, 16, (0.5,) * 3, (0.5,) * 3)


def write_cifar10(root: Path, per_batch: int = 20, test: int = 30) -> Path:
    """``cifar-10-batches-py`` exactly as the official archive lays it out."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    for i, n in enumerate([*[f"data_batch_{k}" for k in range(1, 6)], "test_batch"]):
        count = test if n == "test_batch" else per_batch
        labels = [int(v) for v in np.arange(count) % 10]
        entry = {"batch_label": f"batch {i}", "labels": labels,
                 "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 "filenames": [f"img_{i}_{j}.png" for j in range(count)]}
        with open(folder / n, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch,
                     "num_vis": 3072}, f, protocol=2)
    return folder


def test_cifar10_reads_pickles(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path)
    dm = Cifar10DataModule(name="cifar10", root=str(tmp_path), val_ratio=0.2).configure(PRE)
    dm.setup()
    assert dm.class_names[0] == "airplane" and dm.num_classes == 10
    assert {s: len(v) for s, v in dm.labels.items()} == {"train": 80, "val": 20, "test": 30}
    # Pixel layout: row-major 3×1024 planes → (3, 32, 32), identical to the raw bytes.
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="latin1")["data"][0].reshape(3, 32, 32)
    native = Cifar10DataModule(name="c", root=str(tmp_path), val_ratio=0.2).configure(
        Preprocessing(32, 32))
    native.setup()
    assert torch.equal(native.datasets["test"].images[0], torch.from_numpy(raw))
    x, y = next(iter(dm.loader("train", batch_size=8)))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.uint8


def test_cifar10_missing_names_layout(tmp_path: Path) -> None:
    dm = Cifar10DataModule(name="cifar10", root=str(tmp_path / "nope")).configure(PRE)
    with pytest.raises(EffbenchError, match="cifar-10-batches-py.*download"):
        dm.setup()


def write_images(folder: Path, classes: dict[str, int], size: int = 20) -> None:
    rng = np.random.default_rng(1)
    for c, n in classes.items():
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / c / f"{c}_{i}.{'png' if i % 2 else 'jpg'}")


def test_imagefolder_flat_tree_split_and_skips(tmp_path: Path) -> None:
    write_images(tmp_path, {"cat": 20, "dog": 20})
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "dog" / "Thumbs.db").write_bytes(b"\0")
    dm = ImageFolderDataModule(name="imagefolder", root=str(tmp_path), val_ratio=0.2,
                               test_ratio=0.2).configure(PRE)
    dm.setup()
    assert dm.class_names == ["cat", "dog"] and dm.skipped_files == 2
    sizes = {s: len(v) for s, v in dm.labels.items()}
    assert sizes == {"train": 24, "val": 8, "test": 8}
    assert torch.bincount(dm.labels["val"]).tolist() == [4, 4]  # stratified
    x, y = next(iter(dm.loader("test", batch_size=4)))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.uint8 and y.dtype == torch.int64


def test_imagefolder_official_subfolders(tmp_path: Path) -> None:
    write_images(tmp_path / "train", {"a": 6, "b": 4})
    write_images(tmp_path / "val", {"a": 2, "b": 2})
    write_images(tmp_path / "test", {"a": 3, "b": 1})
    dm = ImageFolderDataModule(name="imagefolder", root=str(tmp_path)).configure(PRE)
    dm.setup()
    assert {s: len(v) for s, v in dm.labels.items()} == {"train": 10, "val": 4, "test": 4}


def test_imagefolder_missing_root(tmp_path: Path) -> None:
    dm = ImageFolderDataModule(name="imagefolder", root=str(tmp_path / "x")).configure(PRE)
    with pytest.raises(EffbenchError, match="dataset.root"):
        dm.setup()


def test_digits_stratified_split_and_preprocessing_once() -> None:
    dm = DigitsDataModule(name="digits", val_ratio=0.15, test_ratio=0.15).configure(
        Preprocessing(32, 32, (0.5,) * 3, (0.5,) * 3))
    dm.setup()
    sizes = {s: len(v) for s, v in dm.labels.items()}
    assert sum(sizes.values()) == 1797 and sizes["test"] == 270
    counts = torch.bincount(dm.labels["test"], minlength=10)
    assert counts.min() >= 26 and counts.max() <= 28
    # Resized once at setup: the loader hands out stored tensors, no per-sample work.
    images = dm.datasets["train"].images
    assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.uint8
    x = dm.normalize(images[:4])
    assert x.dtype == torch.float32 and -1.01 <= float(x.min()) and float(x.max()) <= 1.01


@pytest.mark.parametrize("multilabel", [False, True])
def test_synthetic_deterministic_and_shaped(multilabel: bool) -> None:
    def make(seed: int) -> SyntheticDataModule:
        dm = SyntheticDataModule(name="synthetic", num_train=40, num_val=8, num_test=8,
                                 num_classes=3, resolution=12, multilabel=multilabel,
                                 seed=seed).configure(PRE)
        dm.setup()
        return dm

    a, b, c = make(0), make(0), make(1)
    assert torch.equal(a.datasets["train"].images, b.datasets["train"].images)
    assert not torch.equal(a.datasets["train"].images, c.datasets["train"].images)
    y = a.labels["train"]
    assert y.shape == ((40, 3) if multilabel else (40,))
    assert a.task == ("multilabel" if multilabel else "multiclass")


def test_flip_augmentation_only_when_training() -> None:
    dm = SyntheticDataModule(name="s", num_train=64, num_val=8, num_test=8, augment_flip=True)
    dm.configure(PRE).setup()
    x = dm.datasets["train"].images[:64]
    assert torch.equal(dm.normalize(x, train=False), dm.normalize(x, train=False))
    flipped = dm.normalize(x, train=True)
    plain = dm.normalize(x)
    same = (flipped == plain).flatten(1).all(1)
    mirrored = (flipped == plain.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 0 < int(mirrored.sum()) < 64
