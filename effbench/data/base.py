"""The datamodule every dataset family builds on.

Images travel as ``uint8`` tensors ``(N, 3, H, W)``. Resizing/cropping to the backbone's expected
size happens once (for in-memory datasets, at setup) or in loader workers (for datasets streamed
from disk); normalisation and flip augmentation run as batched tensor ops on the device in
``on_after_batch_transfer``, so the training loop never does per-sample PIL work for small datasets.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2 import functional as TF

from effbench.backbones.base import Preprocessing
from effbench.errors import EffbenchError
from effbench.task import MULTICLASS, is_multilabel

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def keep_batch(batch: Any) -> Any:
    """Collate for :class:`TensorImages`: ``__getitems__`` already returns a stacked batch."""
    return batch


class TensorImages(Dataset):
    """Images and labels held in memory; a batch is fetched with one fancy-index, not per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    def __getitems__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(idx)
        return self.images[index], self.labels[index]


RESIZE_MODES = ("crop", "whole")


def resize_crop(images: torch.Tensor, pre: Preprocessing, chunk: int = 1024) -> torch.Tensor:
    """Resize the short side to ``pre.resize_size``, centre-crop ``pre.crop_size`` (uint8); with
    ``pre.resize == "whole"`` the whole image to ``crop_size`` × ``crop_size`` (aspect squashed)."""
    out = []
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk]
        if x.shape[-2:] != (pre.crop_size, pre.crop_size):
            if pre.resize == "whole":
                x = TF.resize(x, [pre.crop_size, pre.crop_size], antialias=True)
            else:
                x = TF.resize(x, [pre.resize_size], antialias=True)
                x = TF.center_crop(x, [pre.crop_size, pre.crop_size])
        out.append(x.contiguous())
    return torch.cat(out) if out else images


def random_crop_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-image random crop of the zero-padded (normalised: mean-colour) batch back to its size,
    as one gather on the device; torchvision's RandomCrop works per sample, this stays batched."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
    rows = (dy + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (dx + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    chans = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, chans, rows, cols]


def to_three_channels(images: torch.Tensor) -> torch.Tensor:
    """Grey images become 3 identical channels so every backbone (and its weights) applies."""
    return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images


def split_indices(labels: np.ndarray, val_ratio: float, test_ratio: float, seed: int,
                  stratify: bool = True) -> dict[str, np.ndarray]:
    """Seeded (stratified for single-label data) train/val/test split of ``range(len(labels))``."""
    idx = np.arange(len(labels))
    strat = labels if stratify and labels.ndim == 1 else None
    rest, test = _take(idx, test_ratio, seed, strat)
    strat_rest = strat[rest] if strat is not None else None
    val_share = val_ratio / max(1e-12, 1.0 - test_ratio)
    train, val = _take(rest, val_share, seed + 1, strat_rest)
    return {"train": train, "val": val, "test": test}


def _take(idx: np.ndarray, ratio: float, seed: int,
          strat: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if ratio <= 0:
        return idx, idx[:0]
    try:
        keep, taken = train_test_split(idx, test_size=ratio, random_state=seed, stratify=strat)
    except ValueError as err:  # sklearn: a class too small to be in both parts, or no data
        counts = np.unique(strat, return_counts=True)[1] if strat is not None else [len(idx)]
        raise EffbenchError(
            f"cannot split {len(idx)} images (smallest class: {min(counts, default=0)}) to hold "
            f"out a {ratio:.0%} share with every class in both parts; add images to the small "
            "classes or lower dataset.val_ratio / dataset.test_ratio.") from err
    return np.sort(keep), np.sort(taken)


class EpochShuffle(Sampler[int]):
    """A shuffle that is a function of (seed, epoch) only. Lightning calls ``set_epoch`` before
    each training epoch; torch's RandomSampler instead draws from the global RNG when its iterator
    starts, which on a resumed run happens before anything can reseed it, so the first resumed
    epoch would see another order than the uninterrupted run."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())


class ImageDataModule(pl.LightningDataModule):
    """Base datamodule: subclasses implement :meth:`load` returning the three splits.

    ``load`` returns ``{split: (images, labels)}`` where ``images`` is a uint8 tensor (in-memory
    datasets, any size: resized here once) or a ``Dataset`` that yields already-resized uint8 images
    (streamed datasets), and ``labels`` is an int64 tensor (multiclass) or a float ``(N, C)`` tensor
    (multilabel).
    """

    task: str = MULTICLASS

    def __init__(self, name: str, root: str | None = None, image_size: int | None = None,
                 batch_size: int = 64, eval_batch_size: int | None = None, num_workers: int = 0,
                 pin_memory: bool = False, val_ratio: float = 0.15, test_ratio: float = 0.15,
                 split_seed: int = 0, augment_flip: bool = False, max_samples: int | None = None,
                 memory_budget_gb: float = 4.0, augment_crop_pad: int = 0,
                 resize: str = "crop") -> None:
        super().__init__()
        if resize not in RESIZE_MODES:
            raise EffbenchError(f"invalid value dataset.resize={resize!r}: use crop (short side "
                                "resized, centre crop: torchvision's evaluation transform) or "
                                "whole (the whole image resized to a square, as Keras does).")
        self.resize = resize
        self.name, self.root, self.image_size = name, root, image_size
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.val_ratio, self.test_ratio, self.split_seed = val_ratio, test_ratio, int(split_seed)
        self.augment_flip, self.max_samples = bool(augment_flip), max_samples
        self.memory_budget_gb = float(memory_budget_gb)
        # Random crop after zero-padding by this many pixels (CIFAR-style augmentation); 0 = off.
        self.augment_crop_pad = int(augment_crop_pad)
        # A strategy may choose which training images an epoch sees (e.g. a subset A of it);
        # when set, the train loader iterates this sampler instead of shuffling the whole split.
        self.train_sampler: Sampler | None = None
        # The run's seed (set by the pipeline): with the epoch it fixes each epoch's shuffle.
        self.shuffle_seed = 0
        self.preprocessing: Preprocessing | None = None
        self.class_names: list[str] = []
        self.datasets: dict[str, Dataset] = {}
        self.labels: dict[str, torch.Tensor] = {}
        self._resize_on_device = False
        self._mean = self._std = None

    # -- to implement -------------------------------------------------------------------------
    def load(self) -> dict[str, tuple[torch.Tensor | Dataset, torch.Tensor]]:
        raise NotImplementedError

    # -- public ---------------------------------------------------------------------------------
    def configure(self, preprocessing: Preprocessing) -> ImageDataModule:
        """Fix the backbone's preprocessing (``dataset.image_size`` already applied) and how
        images are fitted to it (``dataset.resize``)."""
        self.preprocessing = preprocessing.with_resize(self.resize)
        return self

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def cache_key(self) -> dict:
        """What identifies this data + preprocessing (used by caches of derived data)."""
        return {"dataset": self.name, "root": str(self.root), "task": self.task,
                "split_seed": self.split_seed, "val_ratio": self.val_ratio,
                "test_ratio": self.test_ratio, "max_samples": self.max_samples,
                "sizes": {s: len(self.labels[s]) for s in self.labels},
                "preprocessing": self.preprocessing.as_dict() if self.preprocessing else None}

    def source_files(self) -> list[Path]:
        """The files (or folders) the images are read from, for a decode-free fingerprint of the
        data (a feature cache's index); generated data has none (its options say it all)."""
        return [Path(str(self.root)).expanduser()] if self.root else []

    def restore_labels(self, labels: dict[str, torch.Tensor], class_names: list[str]) -> None:
        """Labels and class names from a cache of derived data, without decoding an image:
        :meth:`describe` and :meth:`class_counts` answer; a loader still decodes on first use."""
        self.labels, self.class_names = dict(labels), list(class_names)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.preprocessing is None:
            raise RuntimeError("call configure(preprocessing) before setup()")
        loaded = self.load()
        self._check_trainable(loaded)
        for split, (images, labels) in loaded.items():
            images, labels = self._limit(images, labels)
            self.labels[split] = labels
            self.datasets[split] = self._as_dataset(images, labels)
        pre = self.preprocessing
        self._mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(pre.std).view(1, 3, 1, 1)
        sizes = {s: len(v) for s, v in self.labels.items()}
        log.info("dataset %s: %s, %d classes, splits %s", self.name, self.task, self.num_classes,
                 sizes)

    def _check_trainable(self, loaded: dict[str, tuple[Any, torch.Tensor]]) -> None:
        # A backstop for every family (they check their own options first, more precisely):
        # one class or no training images would otherwise fail deep inside the loss or Trainer.
        if not is_multilabel(self.task) and self.num_classes < 2:
            raise EffbenchError(
                f"dataset '{self.name}' at dataset.root={self.root} has {self.num_classes} "
                f"class(es) {self.class_names}; a classifier needs at least 2: point "
                "dataset.root at data with 2 or more classes.")
        if "train" not in loaded or len(loaded["train"][1]) == 0:
            raise EffbenchError(f"dataset '{self.name}' at dataset.root={self.root} has no "
                                "training images; point dataset.root at a copy that has them.")

    def _limit(self, images: Any, labels: torch.Tensor) -> tuple[Any, torch.Tensor]:
        # ``max_samples`` caps every split (first n of a seeded permutation) for quick trials.
        if not self.max_samples or len(labels) <= self.max_samples:
            return images, labels
        keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(
            self.split_seed))[: int(self.max_samples)].sort().values
        if isinstance(images, torch.Tensor):
            return images[keep], labels[keep]
        return torch.utils.data.Subset(images, keep.tolist()), labels[keep]

    def _as_dataset(self, images: Any, labels: torch.Tensor) -> Dataset:
        if not isinstance(images, torch.Tensor):
            return images
        images = to_three_channels(images)
        pre = self.preprocessing
        target_bytes = len(images) * 3 * pre.crop_size ** 2
        if target_bytes > self.memory_budget_gb * 2**30:
            # Too large to keep resized in RAM: keep native size, resize each batch on the device.
            self._resize_on_device = True
        else:
            images = resize_crop(images, pre)
        return TensorImages(images, labels)

    def normalize(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        """uint8 batch on any device → normalised float batch (flip-augmented when training)."""
        if self._resize_on_device:
            images = resize_crop(images, self.preprocessing)
        x = images.float().div_(255.0)
        x = (x - self._mean.to(x.device)) / self._std.to(x.device)
        if train and self.augment_flip:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if train and self.augment_crop_pad > 0:
            x = random_crop_pad(x, self.augment_crop_pad)
        return x

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        training = self.trainer is not None and self.trainer.training
        return self.normalize(x, train=training), y

    def loader(self, split: str, shuffle: bool | None = None, batch_size: int | None = None,
               **kwargs: Any) -> DataLoader:
        """A DataLoader over ``split``; in-memory splits fetch whole batches at once."""
        self.setup()
        ds = self.datasets[split]
        in_memory = isinstance(ds, TensorImages)
        shuffle = split == "train" if shuffle is None else shuffle
        bs = batch_size or (self.batch_size if split == "train" else self.eval_batch_size)
        workers = 0 if in_memory else self.num_workers
        opts = dict(batch_size=bs, shuffle=shuffle, num_workers=workers,
                    pin_memory=self.pin_memory, persistent_workers=workers > 0,
                    collate_fn=keep_batch if in_memory else None)
        if split == "train" and self.train_sampler is not None and "sampler" not in kwargs:
            opts.update(shuffle=False, sampler=self.train_sampler)
        elif shuffle and "sampler" not in kwargs:
            opts.update(shuffle=False, sampler=EpochShuffle(len(ds), self.shuffle_seed))
        opts.update(kwargs)
        return DataLoader(ds, **opts)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def class_counts(self, split: str = "train") -> torch.Tensor:
        """Samples per class (multiclass) or positives per label (multilabel)."""
        y = self.labels[split]
        if is_multilabel(self.task):
            return y.sum(0)
        return torch.bincount(y, minlength=self.num_classes).float()

    def describe(self) -> dict:
        return {"name": self.name, "task": self.task, "num_classes": self.num_classes,
                "class_names": self.class_names,
                "sizes": {s: len(v) for s, v in self.labels.items()}}


def missing_data_error(name: str, root: Any, layout: str, where: str) -> EffbenchError:
    """The one sentence for a dataset that is not on disk."""
    return EffbenchError(
        f"dataset '{name}' not found at dataset.root={root}: expected {layout}; "
        f"download it from {where} or point dataset.root at your copy."
    )
