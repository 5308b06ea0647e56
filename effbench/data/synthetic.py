"""Procedurally generated images with class-dependent structure (for tests and benchmarks).

Each class (or label) owns a smooth random pattern; an image is its class pattern (or the sum of its
labels' patterns) at a random contrast plus noise. A model can learn it,
the difficulty is set by ``noise``, and everything is deterministic given ``seed``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effbench.data.base import ImageDataModule
from effbench.errors import EffbenchError
from effbench.task import task_of


class SyntheticDataModule(ImageDataModule):
    def __init__(self, num_train: int = 512, num_val: int = 128, num_test: int = 128,
                 num_classes: int = 4, resolution: int = 32, multilabel: bool = False,
                 noise: float = 0.35, label_prob: float = 0.3, seed: int = 0,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.sizes = {"train": int(num_train), "val": int(num_val), "test": int(num_test)}
        self.classes, self.resolution = int(num_classes), int(resolution)
        self.multilabel, self.noise, self.label_prob = bool(multilabel), float(noise), label_prob
        self.seed = int(seed)
        self.task = task_of(self.multilabel)

    @property
    def cache_key(self) -> dict:
        return {**super().cache_key, "synthetic": [self.sizes, self.classes, self.resolution,
                                                   self.multilabel, self.noise, self.seed]}

    def check(self) -> None:
        """One sentence per value the generator cannot work with (checked at setup, not in
        ``__init__``, so the message is not wrapped in Hydra's instantiation error)."""
        least = 1 if self.multilabel else 2  # one label is a binary task; one class is nothing
        if self.classes < least:
            why = "" if self.multilabel else "a classifier needs at least 2 classes; "
            raise EffbenchError(f"invalid value dataset.num_classes={self.classes}: {why}use "
                                f"dataset.num_classes={least} or more.")
        if self.sizes["train"] < 1:
            raise EffbenchError(f"invalid value dataset.num_train={self.sizes['train']}: use "
                                "dataset.num_train=1 or more (such as 512).")
        for split in ("val", "test"):
            if self.sizes[split] < 1:
                raise EffbenchError(f"invalid value dataset.num_{split}={self.sizes[split]}: use "
                                    f"dataset.num_{split}=1 or more (such as 128).")
        if self.resolution < 1:
            raise EffbenchError(f"invalid value dataset.resolution={self.resolution}: use "
                                "dataset.resolution=1 or more (such as 32).")

    def load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        self.check()
        gen = torch.Generator().manual_seed(self.seed)
        patterns = self._patterns(gen)
        self.class_names = [f"class_{c}" for c in range(self.classes)]
        return {split: self._sample(n, patterns, gen) for split, n in self.sizes.items()}

    def _patterns(self, gen: torch.Generator) -> torch.Tensor:
        coarse = torch.randn(self.classes, 3, 4, 4, generator=gen)
        smooth = F.interpolate(coarse, size=(self.resolution,) * 2, mode="bicubic",
                               align_corners=False)
        return smooth / smooth.flatten(1).std(1).view(-1, 1, 1, 1)

    def _labels(self, n: int, gen: torch.Generator) -> torch.Tensor:
        if not self.multilabel:
            return torch.randint(self.classes, (n,), generator=gen)
        y = (torch.rand(n, self.classes, generator=gen) < self.label_prob).float()
        return y

    def _sample(self, n: int, patterns: torch.Tensor,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        y = self._labels(n, gen)
        weights = y if self.multilabel else F.one_hot(y, self.classes).float()
        contrast = 0.6 + 0.8 * torch.rand(n, 1, generator=gen)
        x = torch.einsum("nc,cdhw->ndhw", weights * contrast, patterns)
        x = x + self.noise * torch.randn(x.shape, generator=gen)
        images = ((x.clamp(-3, 3) + 3) * (255.0 / 6.0)).round().to(torch.uint8)
        return images, y
