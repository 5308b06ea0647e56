"""scikit-learn's bundled 8×8 digits (1,797 images, 10 classes): the offline default dataset."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from effbench.data.base import ImageDataModule, split_indices


class DigitsDataModule(ImageDataModule):
    """No official split: a stratified, seeded train/val/test split (ratios configurable)."""

    def source_files(self) -> list[Path]:
        return [Path(str(files("sklearn.datasets.data") / "digits.csv.gz"))]

    def load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        bunch = load_digits()
        # Pixel values are 0..16; scale to the uint8 range every loader uses.
        images = torch.from_numpy(np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8))
        images = images.unsqueeze(1)
        labels = torch.from_numpy(bunch.target.astype(np.int64))
        self.class_names = [str(c) for c in range(10)]
        idx = split_indices(bunch.target, self.val_ratio, self.test_ratio, self.split_seed)
        return {s: (images[i], labels[i]) for s, i in idx.items()}
