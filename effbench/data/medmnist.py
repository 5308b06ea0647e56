"""MedMNIST from a local ``.npz`` (``train_images``, ``train_labels``, ``val_*``, ``test_*``).

``root`` is the ``.npz`` file itself or a folder holding ``<flag>.npz`` (28 px) or
``<flag>_<size>.npz`` (64/128/224 px). Images are ``(N, H, W)`` grey or ``(N, H, W, 3)`` RGB uint8;
labels ``(N, 1)`` are one class per image (multiclass), ``(N, C>1)`` are 0/1 label vectors
(multilabel, e.g. ChestMNIST's 14 findings). Everything lives in memory as tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from effbench.data.base import ImageDataModule, missing_data_error
from effbench.data.chestxray14 import LABELS as CHEST_LABELS
from effbench.errors import EffbenchError
from effbench.task import TASKS as TASK_NAMES
from effbench.task import is_multilabel, task_of

SPLITS = {"train": "train", "val": "val", "test": "test"}
WHERE = "https://medmnist.com (Zenodo; or `pip install medmnist` and its download command)"
# Class names of common flags (MedMNIST v2 INFO); any other flag falls back to class_<i>.
CLASS_NAMES = {
    "chestmnist": [x.lower() for x in CHEST_LABELS],
    "pneumoniamnist": ["normal", "pneumonia"],
    "breastmnist": ["malignant", "normal, benign"],
    "pathmnist": ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                  "normal colon mucosa", "cancer-associated stroma",
                  "colorectal adenocarcinoma epithelium"],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
}
TASKS = ("auto", *TASK_NAMES)


class MedMNISTDataModule(ImageDataModule):
    def __init__(self, flag: str = "pathmnist", size: int | None = None, task: str = "auto",
                 class_names: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if task not in TASKS:
            raise EffbenchError(f"unknown dataset.task={task!r}: use {', '.join(TASKS)}.")
        self.flag, self.size, self.task_option = flag, size, task
        self.names_option = list(class_names) if class_names else None

    @property
    def cache_key(self) -> dict:
        return {**super().cache_key, "medmnist": [self.flag, self.size, self.task]}

    def npz_path(self) -> Path:
        root = Path(str(self.root)).expanduser()
        if root.suffix == ".npz":
            return root
        return root / (f"{self.flag}.npz" if not self.size else f"{self.flag}_{self.size}.npz")

    def load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        path = self.npz_path()
        expected = f"{path.name} with train_images, train_labels, val_*, test_*"
        if not path.is_file():
            raise missing_data_error(self.name, self.root, expected, WHERE)
        with np.load(path) as npz:
            keys = [f"{s}_{k}" for s in SPLITS.values() for k in ("images", "labels")]
            if any(k not in npz.files for k in keys):
                raise missing_data_error(self.name, path, expected, WHERE)
            raw = {s: (npz[f"{name}_images"], npz[f"{name}_labels"]) for s, name in SPLITS.items()}
        width = raw["train"][1].reshape(len(raw["train"][1]), -1).shape[1]
        self.task = self.task_option if self.task_option != "auto" else (
            task_of(width > 1))
        out = {s: (self._images(x), self._labels(y)) for s, (x, y) in raw.items()}
        count = width if is_multilabel(self.task) else int(max(int(y.max()) for _, y in
                                                                out.values())) + 1
        self.class_names = self._names(count)
        return out

    @staticmethod
    def _images(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8))
        # (N, H, W) grey → (N, 1, H, W); (N, H, W, 3) → (N, 3, H, W); base makes grey 3-channel.
        return t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()

    def _labels(self, y: np.ndarray) -> torch.Tensor:
        y = y.reshape(len(y), -1)
        if is_multilabel(self.task):
            return torch.from_numpy(y.astype(np.float32))
        if y.shape[1] != 1:
            raise EffbenchError(f"dataset.task=multiclass needs one label per image, but "
                                f"{self.flag} has {y.shape[1]}; use dataset.task=multilabel.")
        return torch.from_numpy(y[:, 0].astype(np.int64))

    def _names(self, count: int) -> list[str]:
        for names in (self.names_option, CLASS_NAMES.get(self.flag)):
            if names and len(names) == count:
                return list(names)
        return [f"class_{i}" for i in range(count)]
