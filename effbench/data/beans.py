"""Beans (AI-Lab-Makerere): bean-leaf photos in 3 classes with an official train/val/test split.

On disk: ``<root>/train/ validation/ test/``, each holding ``angular_leaf_spot/ bean_rust/
healthy/`` folders of 500×500 JPEGs (1,034 / 133 / 128 images). With ``source=huggingface`` the
Hugging Face copy is read through the ``datasets`` package instead (optional dependency, needs the
network or its local cache).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms.v2 import functional as TF

from effbench.data.base import missing_data_error, resize_crop
from effbench.data.files import FileList, FileListDataModule
from effbench.data.imagefolder import scan_classes
from effbench.errors import EffbenchError

CLASSES = ("angular_leaf_spot", "bean_rust", "healthy")
SPLIT_DIRS = {"train": ("train",), "val": ("validation", "val"), "test": ("test",)}
HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}
LAYOUT = ("train/ validation/ test/, each with angular_leaf_spot/ bean_rust/ healthy/ folders of "
          "JPEGs")
WHERE = ("https://huggingface.co/datasets/AI-Lab-Makerere/beans (or "
         "https://github.com/AI-Lab-Makerere/ibean), or set dataset.source=huggingface")


class BeansDataModule(FileListDataModule):
    """``source``: ``folder`` (the extracted tree under ``root``) or ``huggingface``."""

    def __init__(self, source: str = "folder", hf_name: str = "AI-Lab-Makerere/beans",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.source, self.hf_name = source, hf_name
        loaders: dict[str, Callable[[], dict]] = {"folder": super().load,
                                                  "huggingface": self._load_hf}
        if source not in loaders:
            raise EffbenchError(f"unknown dataset.source={source!r}: use folder or huggingface.")
        self._loader = loaders[source]

    def options(self) -> dict[str, Any]:
        return {"source": self.source}

    def load(self) -> dict[str, tuple[Any, torch.Tensor]]:
        return self._loader()

    def _split_dir(self, split: str) -> Path:
        for name in SPLIT_DIRS[split]:
            if (self.root_path / name).is_dir():
                return self.root_path / name
        raise missing_data_error(self.name, self.root, LAYOUT, WHERE)

    def list_files(self) -> dict[str, FileList]:
        self.class_names = list(CLASSES)
        index = {c: i for i, c in enumerate(CLASSES)}
        out = {}
        for split in SPLIT_DIRS:
            found, _ = scan_classes(self._split_dir(split))
            unknown = sorted(set(found) - set(CLASSES))
            if unknown or not found:
                raise missing_data_error(self.name, self.root, LAYOUT, WHERE + f" (found class "
                                         f"folders {sorted(found)} under {split})")
            paths = [p for c in CLASSES for p in found.get(c, [])]
            labels = [index[c] for c in CLASSES for _ in found.get(c, [])]
            out[split] = FileList(paths, torch.tensor(labels, dtype=torch.int64))
        return out

    def _load_hf(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        try:
            import datasets
        except ImportError as err:
            raise EffbenchError("dataset.source=huggingface needs the 'datasets' package; "
                                "pip install datasets, or use dataset.source=folder.") from err
        try:
            ds = datasets.load_dataset(self.hf_name)
        except Exception as err:  # noqa: BLE001 - offline, missing, renamed: one clear sentence
            raise EffbenchError(f"could not load {self.hf_name!r} from Hugging Face ({err}); "
                                "download the folders and use dataset.source=folder.") from err
        self.class_names = list(ds["train"].features["labels"].names)
        return {split: self._hf_split(ds[name]) for split, name in HF_SPLITS.items()}

    def _hf_split(self, split: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # Resize while converting: 1,295 full 500×500 images would take ~1 GB as uint8.
        images = [resize_crop(TF.pil_to_tensor(item["image"].convert("RGB"))[None],
                              self.preprocessing)[0] for item in split]
        labels = torch.tensor([int(item["labels"]) for item in split], dtype=torch.int64)
        return torch.stack(images), labels
