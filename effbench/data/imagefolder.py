"""Any ``root/<class>/*.jpg|png`` tree, optionally split into ``train/ val/ test/`` sub-folders.

Images are streamed from disk and decoded (and resized to the backbone's size) in loader workers.
Files that are not images are skipped and counted.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from effbench.backbones.base import Preprocessing
from effbench.data.base import ImageDataModule, missing_data_error, resize_crop, split_indices

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
SPLIT_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


class ImageFiles(Dataset):
    """Decodes one file per item to a resized, centre-cropped uint8 RGB tensor."""

    def __init__(self, paths: list[Path], labels: torch.Tensor, pre: Preprocessing) -> None:
        self.paths, self.labels, self.pre = paths, labels, pre

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.paths[i]) as im:
            x = TF.pil_to_tensor(im.convert("RGB"))
        return resize_crop(x.unsqueeze(0), self.pre)[0], self.labels[i]


def scan_classes(folder: Path) -> tuple[dict[str, list[Path]], int]:
    """``{class: [image paths]}`` under ``folder`` and how many non-image files were skipped."""
    found: dict[str, list[Path]] = {}
    skipped = 0
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        skipped += len(files) - len(images)
        if images:
            found[class_dir.name] = images
    return found, skipped


class ImageFolderDataModule(ImageDataModule):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.skipped_files = 0

    def _split_dirs(self, root: Path) -> dict[str, Path]:
        dirs = {}
        for split, names in SPLIT_NAMES.items():
            for n in names:
                if (root / n).is_dir():
                    dirs[split] = root / n
                    break
        return dirs if "train" in dirs else {}

    def load(self) -> dict[str, tuple[Dataset, torch.Tensor]]:
        root = Path(str(self.root)).expanduser()
        if not root.is_dir():
            raise missing_data_error(self.name, self.root, "<root>/<class>/*.jpg (optionally "
                                     "inside train/ val/ test/)", "your own image collection")
        split_dirs = self._split_dirs(root)
        scans = {s: scan_classes(d) for s, d in split_dirs.items()} or {"all": scan_classes(root)}
        self.skipped_files = sum(n for _, n in scans.values())
        self.class_names = sorted({c for found, _ in scans.values() for c in found})
        if not self.class_names:
            raise missing_data_error(self.name, self.root, "class folders with images",
                                     "your own image collection")
        if self.skipped_files:
            log.warning("imagefolder: skipped %d non-image files under %s", self.skipped_files,
                        root)
        lists = {s: self._flatten(found) for s, (found, _) in scans.items()}
        if "all" in lists:
            lists = self._split(*lists["all"])
        elif "val" not in lists or "test" not in lists:
            lists = self._fill_missing(lists)
        return {s: (ImageFiles(p, y, self.preprocessing), y) for s, (p, y) in lists.items()}

    def _flatten(self, found: dict[str, list[Path]]) -> tuple[list[Path], torch.Tensor]:
        index = {c: i for i, c in enumerate(self.class_names)}
        paths = [p for c in found for p in found[c]]
        labels = torch.tensor([index[c] for c in found for _ in found[c]], dtype=torch.int64)
        return paths, labels

    def _split(self, paths: list[Path], labels: torch.Tensor,
               val_ratio: float | None = None, test_ratio: float | None = None) -> dict:
        val = self.val_ratio if val_ratio is None else val_ratio
        test = self.test_ratio if test_ratio is None else test_ratio
        idx = split_indices(labels.numpy(), val, test, self.split_seed)
        return {s: ([paths[j] for j in i], labels[torch.from_numpy(i)]) for s, i in idx.items()
                if len(i) or s == "train"}

    def _fill_missing(self, lists: dict) -> dict:
        # Only train/ (and maybe one of val/ test/) given: carve the missing split(s) from train.
        val = 0.0 if "val" in lists else self.val_ratio
        test = 0.0 if "test" in lists else self.test_ratio
        carved = self._split(*lists["train"], val_ratio=val, test_ratio=test)
        return {**carved, **{s: v for s, v in lists.items() if s != "train"}}

    def describe(self) -> dict:
        return {**super().describe(), "skipped_files": self.skipped_files}


