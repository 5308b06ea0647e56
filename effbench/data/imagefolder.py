"""Any ``root/<class>/*.jpg|png`` tree, optionally split into ``train/ val/ test/`` sub-folders.

Images are streamed from disk and decoded (and resized to the backbone's size) in loader workers.
Files that are not images are skipped and counted, and so are image files that cannot be opened
(empty, garbage, truncated): those are found at setup (:func:`readable_mask`), so a bad file never
stops a run from inside a DataLoader worker and every epoch sees the same images.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from effbench.backbones.base import Preprocessing
from effbench.data.base import ImageDataModule, missing_data_error, resize_crop, split_indices
from effbench.errors import EffbenchError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
SPLIT_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
# What a complete file of these formats ends with; a file without it is decoded fully to decide.
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
TAIL_BYTES = 64


def readable(path: Path) -> bool:
    """Whether ``path`` opens as an image. Costs a header parse and a read of the last bytes; only
    a JPEG/PNG missing its end marker (a cut-off download, or trailing padding) is decoded fully."""
    try:
        with Image.open(path) as im:
            marker = END_MARKERS.get(im.format or "")
            if marker is not None:
                with open(path, "rb") as f:
                    f.seek(max(0, os.fstat(f.fileno()).st_size - TAIL_BYTES))
                    complete = marker in f.read()
                if not complete:
                    im.load()
        return True
    except Exception:  # noqa: BLE001 - PIL reports bad files with many error types
        return False


def readable_mask(paths: Sequence[Path]) -> list[bool]:
    """:func:`readable` for each path, in order; threads overlap the file reads (network disks)."""
    if len(paths) < 64:
        return [readable(p) for p in paths]
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(readable, paths, chunksize=64))


def warn_unreadable(paths: Sequence[Path], where: object) -> None:
    if paths:
        shown = ", ".join(str(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
        log.warning("skipped %d unreadable image files under %s: %s", len(paths), where, shown)


class ImageFiles(Dataset):
    """Decodes one file per item to a resized, centre-cropped uint8 RGB tensor."""

    def __init__(self, paths: list[Path], labels: torch.Tensor, pre: Preprocessing) -> None:
        self.paths, self.labels, self.pre = paths, labels, pre

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            with Image.open(self.paths[i]) as im:
                x = TF.pil_to_tensor(im.convert("RGB"))
        except Exception as err:  # noqa: BLE001 - damaged inside, though it passed readable()
            raise EffbenchError(f"image file {self.paths[i]} cannot be decoded "
                                f"({type(err).__name__}: {err}); delete or replace it.") from err
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


def keep_readable(found: dict[str, list[Path]]) -> tuple[dict[str, list[Path]], list[Path]]:
    """``found`` without the files that do not open (a class left with none is dropped), and
    those files."""
    paths = [p for c in found for p in found[c]]
    bad = {p for p, ok in zip(paths, readable_mask(paths)) if not ok}
    kept = {c: [p for p in ps if p not in bad] for c, ps in found.items()}
    return {c: ps for c, ps in kept.items() if ps}, [p for p in paths if p in bad]


class ImageFolderDataModule(ImageDataModule):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.skipped_files = 0
        self.unreadable: list[Path] = []

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
        if self.skipped_files:
            log.warning("imagefolder: skipped %d non-image files under %s", self.skipped_files,
                        root)
        checked = {s: keep_readable(found) for s, (found, _) in scans.items()}
        self.unreadable = [p for _, bad in checked.values() for p in bad]
        warn_unreadable(self.unreadable, root)
        self.class_names = sorted({c for found, _ in checked.values() for c in found})
        self._check(checked, split_dirs, root)
        lists = {s: self._flatten(found) for s, (found, _) in checked.items()}
        if "all" in lists:
            lists = self._split(*lists["all"])
        elif "val" not in lists or "test" not in lists:
            lists = self._fill_missing(lists)
        return {s: (ImageFiles(p, y, self.preprocessing), y) for s, (p, y) in lists.items()}

    def _check(self, checked: dict[str, tuple[dict, list[Path]]], split_dirs: dict[str, Path],
               root: Path) -> None:
        """One sentence for data a classifier cannot be trained on."""
        for split, (found, bad) in checked.items():
            if not found and bad:
                where = split_dirs.get(split, root)
                raise EffbenchError(f"all {len(bad)} image files under {where} are unreadable "
                                    "(e.g. " + str(bad[0]) + "); replace them with images that "
                                    "open, or point dataset.root at a good copy.")
        if not self.class_names:
            raise missing_data_error(self.name, self.root, "class folders with images",
                                     "your own image collection")
        if "train" in checked and not checked["train"][0]:
            raise EffbenchError(f"{split_dirs['train']} holds no images; put a folder of images "
                                "per class there.")
        if len(self.class_names) < 2:
            raise EffbenchError(f"dataset.root={self.root} holds one class folder with images "
                                f"('{self.class_names[0]}'); a classifier needs at least 2: add "
                                "a folder of images per class.")

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
        return {**super().describe(), "skipped_files": self.skipped_files,
                "skipped_unreadable": len(self.unreadable)}


