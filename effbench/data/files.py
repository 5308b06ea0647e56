"""Datasets listed as image files: streamed from disk, or served from a pre-resized cache.

A subclass lists its files per split (:meth:`FileListDataModule.list_files`: paths, labels and,
where the data has them, patient ids); this base turns the lists into datasets:

- by default every item is decoded and resized in a DataLoader worker (:class:`ImageFiles`);
- with ``cache_images=true`` every file is decoded once, at the run's resolution, into one uint8
  array ``(N, 3, S, S)`` under ``<cache_dir>/images/``. The array is written to a temporary file and
  renamed, so it is either complete or absent, and it is keyed by the file list (path, size, mtime)
  and the preprocessing, so later epochs and later runs (a whole sweep) read it instead of decoding
  JPEG/PNG again: as an in-memory tensor when it fits ``memory_budget_gb``, else memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from sklearn.model_selection import StratifiedGroupKFold
from torch.utils.data import DataLoader, Dataset

from effbench.backbones.base import Preprocessing
from effbench.data.base import ImageDataModule
from effbench.data.imagefolder import ImageFiles
from effbench.errors import EffbenchError

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass
class FileList:
    """One split's files: paths, labels (int64 or float ``(N, C)``) and optional patient ids."""

    paths: list[Path]
    labels: torch.Tensor
    groups: list[str] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, idx: np.ndarray | torch.Tensor) -> FileList:
        idx = [int(i) for i in idx]
        groups = [self.groups[i] for i in idx] if self.groups is not None else None
        return FileList([self.paths[i] for i in idx], self.labels[torch.as_tensor(idx,
                        dtype=torch.int64)], groups)


def group_split(strata: np.ndarray, groups: np.ndarray, val_ratio: float, test_ratio: float,
                seed: int) -> dict[str, np.ndarray]:
    """Seeded train/val/test split where every group (patient) lands in exactly one split; the
    splits keep the proportions of ``strata`` (one label per sample) as far as groups allow."""
    idx = np.arange(len(strata))
    rest, test = _group_take(idx, strata, groups, test_ratio, seed)
    val_share = val_ratio / max(1e-12, 1.0 - test_ratio)
    train, val = _group_take(rest, strata[rest], groups[rest], val_share, seed + 1)
    return {"train": train, "val": val, "test": test}


def _group_take(idx: np.ndarray, strata: np.ndarray, groups: np.ndarray, ratio: float,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    if ratio <= 0 or len(idx) == 0:
        return idx, idx[:0]
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise EffbenchError(f"cannot split {n_groups} patient(s) into train/val/test; the data "
                            "needs at least 2 patients per split, or set dataset.val_ratio=0.")
    # One fold of a stratified group k-fold holds out ~1/k of the patients, stratified by label.
    # (sklearn refuses more folds than the largest class has samples: tiny data gets fewer folds.)
    largest = int(np.unique(strata, return_counts=True)[1].max())
    folds = int(max(2, min(n_groups, largest, round(1.0 / ratio))))
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    keep, taken = next(cv.split(idx, strata, groups))
    return np.sort(idx[keep]), np.sort(idx[taken])


def cap(files: FileList, max_samples: int | None, seed: int) -> FileList:
    """The first ``max_samples`` of a seeded permutation (same rule as ``ImageDataModule``), applied
    before caching so a quick trial does not decode the whole dataset."""
    if not max_samples or len(files) <= max_samples:
        return files
    keep = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))
    return files.take(keep[: int(max_samples)].sort().values)


class MemmapImages(Dataset):
    """Rows of a cached ``.npy`` array, memory-mapped lazily in each loader worker."""

    def __init__(self, path: Path, rows: np.ndarray, labels: torch.Tensor) -> None:
        self.path, self.rows, self.labels = path, rows, labels
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        # Workers re-open the map instead of receiving a pickled copy of the array.
        return {**self.__dict__, "_array": None}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return torch.from_numpy(np.array(self._array[self.rows[i]])), self.labels[i]


class ImageCache:
    """Decoded, resized uint8 images of a file list, stored once as ``<key>.npy``."""

    def __init__(self, cache_dir: str | Path, pre: Preprocessing, num_workers: int = 0,
                 batch_size: int = 64) -> None:
        self.folder = Path(cache_dir).expanduser() / "images"
        self.pre, self.num_workers, self.batch_size = pre, int(num_workers), int(batch_size)

    def key(self, files: list[Path]) -> str:
        h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "pre": [self.pre.crop_size,
                                       self.pre.resize_size]}).encode())
        for p in files:
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:32]

    def ensure(self, files: list[Path]) -> Path:
        """Path of the cache array for ``files`` (in this order), built if it does not exist."""
        target = self.folder / f"{self.key(files)}.npy"
        if target.is_file():
            log.info("image cache: reusing %s (%d images)", target, len(files))
            return target
        self.folder.mkdir(parents=True, exist_ok=True)
        # DDP ranks set up at the same time: one builds, the others wait and reuse (an OS lock, so
        # a killed builder releases it).
        with FileLock(str(target) + ".lock"):
            if target.is_file():
                return target
            tmp = target.with_name(f".{target.stem}.{os.getpid()}.{uuid.uuid4().hex}.tmp.npy")
            try:
                self._write(files, tmp)
                os.replace(tmp, target)  # atomic: readers see a complete file or none
            finally:
                tmp.unlink(missing_ok=True)
        log.info("image cache: wrote %s (%d images)", target, len(files))
        return target

    def _write(self, files: list[Path], tmp: Path) -> None:
        s = self.pre.crop_size
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                        shape=(len(files), 3, s, s))
        loader = DataLoader(ImageFiles(files, torch.zeros(len(files)), self.pre),
                            batch_size=self.batch_size, num_workers=self.num_workers)
        start = 0
        for images, _ in loader:  # decoding runs in the loader's workers
            out[start:start + len(images)] = images.numpy()
            start += len(images)
        out.flush()
        del out


class FileListDataModule(ImageDataModule):
    """Base of the datasets that live as image files on disk (see the module docstring)."""

    def __init__(self, cache_images: bool = False, cache_dir: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cache_images, self.cache_dir = bool(cache_images), cache_dir
        self.groups: dict[str, list[str]] = {}

    # -- to implement -------------------------------------------------------------------------
    def list_files(self) -> dict[str, FileList]:
        """``{split: FileList}``; also sets ``self.class_names`` (and ``self.task``)."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    @property
    def root_path(self) -> Path:
        return Path(str(self.root)).expanduser()

    def load(self) -> dict[str, tuple[Dataset | torch.Tensor, torch.Tensor]]:
        lists = {s: cap(fl, self.max_samples, self.split_seed)
                 for s, fl in self.list_files().items()}
        self.groups = {s: fl.groups for s, fl in lists.items() if fl.groups is not None}
        if self.cache_images:
            return self._from_cache(lists)
        return {s: (ImageFiles(fl.paths, fl.labels, self.preprocessing), fl.labels)
                for s, fl in lists.items()}

    def _from_cache(self, lists: dict[str, FileList]) -> dict[str, tuple[Any, torch.Tensor]]:
        if not self.cache_dir:
            raise EffbenchError("dataset.cache_images=true needs a cache folder; set "
                                "dataset.cache_dir (or cache_dir / EFFBENCH_CACHE_DIR).")
        # One array for all splits (sorted paths), so a different split of the same files reuses it.
        files = sorted({p for fl in lists.values() for p in fl.paths})
        cache = ImageCache(self.cache_dir, self.preprocessing, self.num_workers)
        path = cache.ensure(files)
        row = {p: i for i, p in enumerate(files)}
        in_ram = len(files) * 3 * self.preprocessing.crop_size ** 2 <= self.memory_budget_gb * 2**30
        array = np.load(path, mmap_mode="r")
        out: dict[str, tuple[Any, torch.Tensor]] = {}
        for split, fl in lists.items():
            rows = np.fromiter((row[p] for p in fl.paths), dtype=np.int64, count=len(fl))
            images = (torch.from_numpy(np.ascontiguousarray(array[rows])) if in_ram
                      else MemmapImages(path, rows, fl.labels))
            out[split] = (images, fl.labels)
        return out

    @property
    def cache_key(self) -> dict:
        return {**super().cache_key, "options": self.options()}

    def options(self) -> dict[str, Any]:
        """Dataset-specific choices that change labels or files (part of ``cache_key``)."""
        return {}

    def describe(self) -> dict:
        patients = {s: len(set(g)) for s, g in self.groups.items()}
        return {**super().describe(), **({"patients": patients} if patients else {}),
                **self.options()}
