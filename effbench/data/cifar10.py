"""CIFAR-10 from the real ``cifar-10-batches-py`` pickles.

The pickles are read directly (so a local copy, or test files written in that format, load without
torchvision's md5 check); when they are missing and ``download`` is true, torchvision fetches and
extracts the official archive first.

A pickle can name any importable callable and have it called while loading, so a crafted
``data_batch_1`` could run a shell command. :class:`BatchUnpickler` therefore resolves only the few
globals that the real files (Python-2 pickles of dicts, lists, strings, ints and numpy arrays) and
re-pickled Python-3 copies of them use; anything else stops the run before it is called.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from effbench.data.base import ImageDataModule, missing_data_error, split_indices
from effbench.errors import EffbenchError

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

# (module, name) of every global a CIFAR-10 pickle may load. numpy 2 renamed numpy.core to
# numpy._core (the real files say numpy.core); protocol-2 pickles written by Python 3 spell bytes
# as _codecs.encode(str, "latin1"); protocol 5 rebuilds arrays with _frombuffer.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}
# What a truncated or garbled pickle raises while being read.
CORRUPT_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
                  AttributeError, OverflowError, MemoryError)


class BatchUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS` and refuses everything else."""

    def __init__(self, file: io.BufferedReader, path: Path) -> None:
        super().__init__(file, encoding="latin1")  # py2 str → str, as numpy's own loader does
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise EffbenchError(
                f"{self.path} is not a CIFAR-10 batch file: it asks to load '{module}.{name}', "
                "which effbench never runs; delete it and re-download the dataset.")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.removeprefix("numpy.core.")  # no deprecation warning
        return super().find_class(module, name)


def load_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR-10 pickle as a dict with str keys, read with :class:`BatchUnpickler`."""
    try:
        with open(path, "rb") as f:
            entry = BatchUnpickler(f, path).load()
    except CORRUPT_ERRORS as err:
        raise EffbenchError(
            f"{path} is truncated or corrupt ({type(err).__name__}); delete the {FOLDER} folder "
            "and download it again (dataset.download=true fetches it).") from err
    if not isinstance(entry, dict):
        raise EffbenchError(f"{path} is not a CIFAR-10 batch file (it holds a "
                            f"{type(entry).__name__}, not a dict); re-download the dataset.")
    # Python-2 pickles decode to str keys with latin1; tolerate bytes keys from other writers too.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickle → (N, 3, 32, 32) uint8 images and int64 labels."""
    entry = load_pickle(path)
    data, labels = entry.get("data"), entry.get("labels", entry.get("fine_labels"))
    try:
        data = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise EffbenchError(f"{path} is not a CIFAR-10 batch file (its 'data' is not N×3072 "
                            "uint8 pixels or its 'labels' are missing); re-download the "
                            "dataset.") from err
    if len(data) != len(labels):
        raise EffbenchError(f"{path} holds {len(data)} images but {len(labels)} labels; "
                            "re-download the dataset.")
    return data, labels


VAL_FROM = ("train", "test")


class Cifar10DataModule(ImageDataModule):
    """Official train/test split. Validation is carved (stratified, ``val_ratio``) from train, or,
    with ``val_from=test``, is the official 10,000-image test set (the data-subsampling study's
    protocol: all 50,000 images train, and the figure reported is the best validation accuracy
    over epochs — then test metrics are not independent of model selection, and say so)."""

    def __init__(self, download: bool = False, val_from: str = "train", **kwargs) -> None:
        kwargs.setdefault("test_ratio", 0.0)
        super().__init__(**kwargs)
        self.download = bool(download)
        if val_from not in VAL_FROM:
            raise EffbenchError(f"invalid value dataset.val_from={val_from!r}: use train (carve "
                                "dataset.val_ratio from train) or test (the official test set).")
        self.val_from = val_from

    def describe(self) -> dict:
        return {**super().describe(), "val_from": self.val_from,
                **({"note": "validation = the official test set (the study's protocol): test "
                            "metrics are not independent of model selection"}
                   if self.val_from == "test" else {})}

    @property
    def cache_key(self) -> dict:
        return {**super().cache_key, "val_from": self.val_from}

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
        test = (torch.from_numpy(x_test), torch.from_numpy(y_test))
        if self.val_from == "test":
            return {"train": (torch.from_numpy(x), torch.from_numpy(y)), "val": test,
                    "test": test}
        idx = split_indices(y, self.val_ratio, 0.0, self.split_seed)
        out = {s: (torch.from_numpy(x[idx[s]]), torch.from_numpy(y[idx[s]]))
               for s in ("train", "val")}
        out["test"] = test
        return out

    @staticmethod
    def _class_names(folder: Path) -> list[str]:
        meta = folder / "batches.meta"
        if not meta.is_file():
            return [str(i) for i in range(10)]
        names = load_pickle(meta).get("label_names")
        if not isinstance(names, list) or len(names) != 10:
            raise EffbenchError(f"{meta} has no list of 10 'label_names'; re-download the "
                                "dataset (or delete batches.meta to use the names 0..9).")
        return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
