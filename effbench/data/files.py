"""Datasets listed as image files: streamed from disk, or served from a pre-resized cache.

A subclass lists its files per split (:meth:`FileListDataModule.list_files`: paths, labels and,
where the data has them, patient ids); this base turns the lists into datasets:

- by default every item is decoded and resized in a DataLoader worker (:class:`ImageFiles`);
- with ``cache_images=true`` every file is decoded once, at the run's resolution, into one uint8
  array ``(N, 3, S, S)`` under ``<cache_dir>/images/``. The array is written to a temporary file and
  renamed, so it is either complete or absent, and it is keyed by the file list (path, size, mtime)
  and the preprocessing, so later epochs and later runs (a whole sweep) read it instead of decoding
  JPEG/PNG again: as an in-memory tensor when it fits ``memory_budget_gb``, else memory-mapped.
  Beside it, ``<key>.json`` records the array's size and CRC-32; an array that does not match
  (truncated, zero-filled by a crash before the disk caught up) is rebuilt, never trained on.

Files that cannot be opened as images are skipped at setup and counted (``skipped_unreadable`` in
:meth:`FileListDataModule.describe`): streamed data opens each file once (header and end, see
:func:`~effbench.data.imagefolder.readable`); the cache builder decodes each file anyway and records
the ones that fail beside the array. A split left with no readable image is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
import zlib
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
from effbench.data.imagefolder import ImageFiles, readable_mask, warn_unreadable
from effbench.errors import EffbenchError
from effbench.predictions import relative_id
from effbench.rundir import publish

log = logging.getLogger(__name__)

# 2: arrays carry a ``<key>.json`` record of their size and checksum (version-1 arrays have none).
CACHE_VERSION = 2
CHUNK = 64 << 20  # bytes read at a time when checksumming an array


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


def crc32_of(path: Path) -> int:
    """CRC-32 of the file: a few seconds for a 17 GB cache (SHA-256 would be 3.5× slower), and
    what it has to catch is truncation and zero-filled blocks, not tampering."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_record(array: Path, record: Path, unreadable: list[int]) -> None:
    """Write the size and checksum of ``array`` and its rows whose file did not decode."""
    body = {"version": CACHE_VERSION, "bytes": array.stat().st_size, "crc32": crc32_of(array),
            "unreadable_rows": unreadable}
    tmp = record.with_name(f".{record.stem}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps(body))
        publish(tmp, record)
    finally:
        tmp.unlink(missing_ok=True)


def verified_record(array: Path, record: Path, shape: tuple[int, ...]) -> dict[str, Any]:
    """The record of ``array`` once the array matches it (size, header, checksum); otherwise a
    ValueError that says what is wrong."""
    try:
        body = json.loads(record.read_text())
        size = array.stat().st_size
    except (OSError, ValueError) as err:
        raise ValueError("it has no readable size/checksum record") from err
    if not isinstance(body, dict) or not isinstance(body.get("unreadable_rows"), list):
        raise ValueError("its size/checksum record is malformed")
    if body.get("bytes") != size:
        raise ValueError(f"it is {size} bytes, its record says {body.get('bytes')}")
    try:
        mapped = np.load(array, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise ValueError(f"its header is unreadable ({type(err).__name__})") from err
    if mapped.shape != shape or mapped.dtype != np.uint8:
        raise ValueError(f"it holds {mapped.dtype} {mapped.shape}, not uint8 {shape}")
    del mapped
    if body.get("crc32") != crc32_of(array):
        raise ValueError("its checksum does not match its record")
    return body


class DecodedOrBlank(Dataset):
    """:class:`ImageFiles` for the cache builder: a file that does not decode gives a blank image
    and ``False`` (its row is recorded as unreadable) instead of stopping the build."""

    def __init__(self, files: list[Path], pre: Preprocessing) -> None:
        self.files = ImageFiles(files, torch.zeros(len(files)), pre)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        try:
            return self.files[i][0], True
        except EffbenchError:
            s = self.files.pre.crop_size
            return torch.zeros(3, s, s, dtype=torch.uint8), False


@dataclass
class CachedImages:
    """A verified cache array and the rows of files that did not decode when it was built."""

    path: Path
    unreadable_rows: list[int]


class ImageCache:
    """Decoded, resized uint8 images of a file list, stored once as ``<key>.npy``."""

    def __init__(self, cache_dir: str | Path, pre: Preprocessing, num_workers: int = 0,
                 batch_size: int = 64) -> None:
        self.folder = Path(cache_dir).expanduser() / "images"
        self.pre, self.num_workers, self.batch_size = pre, int(num_workers), int(batch_size)

    def key(self, files: list[Path]) -> str:
        size = [self.pre.crop_size, self.pre.resize_size]
        size += [self.pre.resize] if self.pre.resize != "crop" else []  # older keys unchanged
        h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "pre": size}).encode())
        for p in files:
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:32]

    def shape(self, files: list[Path]) -> tuple[int, int, int, int]:
        return (len(files), 3, self.pre.crop_size, self.pre.crop_size)

    def ensure(self, files: list[Path]) -> CachedImages:
        """The cache array for ``files`` (in this order), built if it does not exist or does not
        match its size/checksum record."""
        target = self.folder / f"{self.key(files)}.npy"
        record = target.with_suffix(".json")
        found = self._verified(target, record, files, quiet=True)
        if found is not None:
            log.info("image cache: reusing %s (%d images)", target, len(files))
            return found
        self.folder.mkdir(parents=True, exist_ok=True)
        # DDP ranks set up at the same time: one builds, the others wait and reuse (an OS lock, so
        # a killed builder releases it).
        with FileLock(str(target) + ".lock"):
            found = self._verified(target, record, files, quiet=False)
            if found is not None:
                return found
            tmp = target.with_name(f".{target.stem}.{os.getpid()}.{uuid.uuid4().hex}.tmp.npy")
            try:
                unreadable = self._write(files, tmp)
                record.unlink(missing_ok=True)  # the old record never vouches for the new array
                publish(tmp, target)  # atomic: readers see a complete file or none
                write_record(target, record, unreadable)
            finally:
                tmp.unlink(missing_ok=True)
        log.info("image cache: wrote %s (%d images)", target, len(files))
        return CachedImages(target, unreadable)

    def _verified(self, target: Path, record: Path, files: list[Path],
                  quiet: bool) -> CachedImages | None:
        if not target.is_file():
            return None
        try:
            body = verified_record(target, record, self.shape(files))
        except ValueError as err:
            if not quiet:  # said once, by the process that rebuilds it
                log.warning("image cache %s is damaged (%s); rebuilding it", target, err)
            return None
        return CachedImages(target, [int(r) for r in body["unreadable_rows"]])

    def _write(self, files: list[Path], tmp: Path) -> list[int]:
        """Decode ``files`` into the array at ``tmp``; the rows whose file did not decode."""
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=self.shape(files))
        loader = DataLoader(DecodedOrBlank(files, self.pre), batch_size=self.batch_size,
                            num_workers=self.num_workers)
        start, unreadable = 0, []
        for images, ok in loader:  # decoding runs in the loader's workers
            out[start:start + len(images)] = images.numpy()
            unreadable += [start + i for i, good in enumerate(ok.tolist()) if not good]
            start += len(images)
        out.flush()
        del out
        return unreadable


class FileListDataModule(ImageDataModule):
    """Base of the datasets that live as image files on disk (see the module docstring)."""

    def __init__(self, cache_images: bool = False, cache_dir: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cache_images, self.cache_dir = bool(cache_images), cache_dir
        self.groups: dict[str, list[str]] = {}
        self.unreadable: list[Path] = []

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
        if self.cache_images:
            # The builder decodes every file anyway: it records the ones that fail, and a run
            # reusing the array skips them without opening any file.
            files, cached = self._cache(lists)
            bad = {files[r] for r in cached.unreadable_rows}
            masks = {s: [p not in bad for p in fl.paths] for s, fl in lists.items()}
        else:
            # Opened (not decoded) once here, so no loader worker meets a file that does not open.
            masks = {s: readable_mask(fl.paths) for s, fl in lists.items()}
        lists = self._drop_unreadable(lists, masks)
        # Stable sample ids (paths relative to the root) for <run>/predictions.npz.
        self.sample_ids = {s: [relative_id(p, self.root_path) for p in fl.paths]
                           for s, fl in lists.items()}
        self.groups = {s: fl.groups for s, fl in lists.items() if fl.groups is not None}
        if self.cache_images:
            return self._from_cache(lists, files, cached.path)
        return {s: (ImageFiles(fl.paths, fl.labels, self.preprocessing), fl.labels)
                for s, fl in lists.items()}

    def _drop_unreadable(self, lists: dict[str, FileList],
                         masks: dict[str, list[bool]]) -> dict[str, FileList]:
        self.unreadable = [p for s, fl in lists.items() for p, ok in zip(fl.paths, masks[s])
                           if not ok]
        warn_unreadable(self.unreadable, self.root_path)
        for split, fl in lists.items():
            if len(fl) and not any(masks[split]):
                raise EffbenchError(
                    f"all {len(fl)} images of the {split} split under dataset.root={self.root} "
                    f"are unreadable (e.g. {fl.paths[0]}); re-download the dataset.")
        return {s: fl if all(masks[s]) else fl.take(np.flatnonzero(masks[s]))
                for s, fl in lists.items()}

    def _cache(self, lists: dict[str, FileList]) -> tuple[list[Path], CachedImages]:
        if not self.cache_dir:
            raise EffbenchError("dataset.cache_images=true needs a cache folder; set "
                                "dataset.cache_dir (or cache_dir / EFFBENCH_CACHE_DIR).")
        # One array for all splits (sorted paths), so a different split of the same files reuses it.
        files = sorted({p for fl in lists.values() for p in fl.paths})
        cache = ImageCache(self.cache_dir, self.preprocessing, self.num_workers)
        return files, cache.ensure(files)

    def _from_cache(self, lists: dict[str, FileList], files: list[Path],
                    path: Path) -> dict[str, tuple[Any, torch.Tensor]]:
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
                "skipped_unreadable": len(self.unreadable), **self.options()}
