"""CIFAR-10 from the real ``cifar-10-batches-py`` pickles.

The pickles are read directly (so a local copy, or test files written in that format, load without
torchvision's md5 check); when they are missing and ``download`` is true, torchvision fetches and
extracts the official archive first.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from effbench.data.base import ImageDataModule, missing_data_error, split_indices

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickle → (N, 3, 32, 32) uint8 images and int64 labels."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    # Python-2 pickles decode to str keys with latin1; tolerate bytes keys from other writers too.
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
    return data, labels


class Cifar10DataModule(ImageDataModule):
    """Official train/test split; the validation split is carved (stratified) from train."""

    def __init__(self, download: bool = False, **kwargs) -> None:
        kwargs.setdefault("test_ratio", 0.0)
        super().__init__(**kwargs)
        self.download = bool(download)

    def _folder(self) -> Path:
        root = Path(str(self.root)).expanduser()
        folder = root / FOLDER
        if not folder.is_dir() and self.download:
            from torchvision.datasets import CIFAR10

            CIFAR10(str(root), train=True, download=True)
        if not all((folder / n).is_file() for n in [*TRAIN_FILES, "test_batch"]):
            raise missing_data_error(
                "cifar10", self.root,
                f"{FOLDER}/ with data_batch_1..5, test_batch and batches.meta", URL
                + " (or set dataset.download=true)")
        return folder

    def load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        folder = self._folder()
        parts = [read_batch(folder / n) for n in TRAIN_FILES]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        x_test, y_test = read_batch(folder / "test_batch")
        self.class_names = self._class_names(folder)
        idx = split_indices(y, self.val_ratio, 0.0, self.split_seed)
        out = {s: (torch.from_numpy(x[idx[s]]), torch.from_numpy(y[idx[s]]))
               for s in ("train", "val")}
        out["test"] = (torch.from_numpy(x_test), torch.from_numpy(y_test))
        return out

    @staticmethod
    def _class_names(folder: Path) -> list[str]:
        meta = folder / "batches.meta"
        if meta.is_file():
            with open(meta, "rb") as f:
                return list(pickle.load(f, encoding="latin1")["label_names"])
        return [str(i) for i in range(10)]
