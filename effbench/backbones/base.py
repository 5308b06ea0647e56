"""The backbone contract: a plain ``nn.Module`` of ordered stages ending in a feature vector."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """What the backbone's weights expect: images are resized (short side) to ``resize_size``,
    centre-cropped to ``crop_size`` and normalised with ``mean``/``std`` (3 channels, [0, 1])."""

    crop_size: int
    resize_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def with_size(self, image_size: int | None) -> Preprocessing:
        """``dataset.image_size`` overrides the size: resize straight to it, no crop margin."""
        if image_size is None:
            return self
        return Preprocessing(int(image_size), int(image_size), self.mean, self.std)

    def as_dict(self) -> dict:
        return {"crop_size": self.crop_size, "resize_size": self.resize_size,
                "mean": list(self.mean), "std": list(self.std)}


class Backbone(nn.Module):
    """Ordered ``stages`` (stage 0 is the stem; the last stage ends with pooling + flatten) whose
    composition maps a normalised ``(N, 3, H, W)`` batch to ``(N, feature_dim)`` features.

    The stages together hold every parameter of the backbone exactly once, so strategies can freeze,
    prune or quantise "the first k stages" of any architecture. ``frozen_prefix`` stages run without
    autograd, so a frozen prefix keeps no activations for backward (the freeze strategy sets it).
    """

    def __init__(self, name: str, stages: list[nn.Module], feature_dim: int,
                 preprocessing: Preprocessing, weights: str | None = None) -> None:
        super().__init__()
        self.name = name
        self.stages = nn.ModuleList(stages)
        self.feature_dim = int(feature_dim)
        self.preprocessing = preprocessing
        self.weights = weights
        self.frozen_prefix = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.frozen_prefix
        if k:
            with torch.no_grad():
                for stage in self.stages[:k]:
                    x = stage(x)
        for stage in self.stages[k:]:
            x = stage(x)
        return x
