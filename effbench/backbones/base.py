"""The backbone contract: a plain ``nn.Module`` of ordered stages ending in a feature vector."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IDENTITY_MEAN = (0.0, 0.0, 0.0)
IDENTITY_STD = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class Preprocessing:
    """What the backbone's weights expect: images are resized (short side) to ``resize_size``,
    centre-cropped to ``crop_size`` and normalised with ``mean``/``std`` (3 channels, [0, 1]).

    ``interpolation`` is the resampling the weights were trained with and ``source`` says where
    these numbers come from ("torchvision weights", "timm pretrained_cfg", ...). With
    ``normalize=False`` (``backbone.normalize=false``) ``mean``/``std`` are 0/1: the network gets
    plain [0, 1] inputs, and ``expected_mean``/``expected_std`` keep what the weights would want.
    """

    crop_size: int
    resize_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    source: str = "imagenet default"
    normalize: bool = True
    expected_mean: tuple[float, float, float] | None = None
    expected_std: tuple[float, float, float] | None = None
    # crop: short side to resize_size, centre crop (torchvision's evaluation transform); whole:
    # the whole image resized to crop_size × crop_size, aspect squashed (Keras' image_size).
    resize: str = "crop"

    def with_resize(self, resize: str) -> Preprocessing:
        """``dataset.resize``: how an image becomes the network's square input."""
        return dataclasses.replace(self, resize=str(resize))

    def with_size(self, image_size: int | None) -> Preprocessing:
        """``dataset.image_size`` overrides the size: resize straight to it, no crop margin."""
        if image_size is None:
            return self
        return dataclasses.replace(self, crop_size=int(image_size), resize_size=int(image_size))

    def without_normalization(self) -> Preprocessing:
        """Plain [0, 1] inputs (mean 0, std 1); what the weights expected stays on record."""
        if not self.normalize:
            return self
        return dataclasses.replace(self, mean=IDENTITY_MEAN, std=IDENTITY_STD, normalize=False,
                                   expected_mean=self.mean, expected_std=self.std)

    def as_dict(self) -> dict:
        """What changes the pixels the network sees (part of cache keys; keep it minimal)."""
        out = {"crop_size": self.crop_size, "resize_size": self.resize_size,
               "mean": list(self.mean), "std": list(self.std)}
        # Only when it is not the default: caches built before the option keep their keys.
        return {**out, "resize": self.resize} if self.resize != "crop" else out

    def describe(self) -> dict[str, Any]:
        """The normalisation actually applied, for ``summary.json``: applied mean/std, input
        size, interpolation the weights expect, where the numbers come from, and whether
        normalisation is on (off: the weights' own mean/std are listed as ``expected_*``)."""
        out: dict[str, Any] = {
            "normalize": self.normalize, "mean": list(self.mean), "std": list(self.std),
            "size": self.crop_size, "resize_size": self.resize_size, "resize": self.resize,
            "interpolation": self.interpolation, "source": self.source,
        }
        if not self.normalize:
            out["expected_mean"] = list(self.expected_mean or IDENTITY_MEAN)
            out["expected_std"] = list(self.expected_std or IDENTITY_STD)
        return out


class Backbone(nn.Module):
    """Ordered ``stages`` (stage 0 is the stem; the last stage ends with pooling + flatten) whose
    composition maps a normalised ``(N, 3, H, W)`` batch to ``(N, feature_dim)`` features.

    The stages together hold every parameter of the backbone exactly once, so techniques can act
    on "the first k stages" of any architecture (freezing, removing weights, quantising).
    ``frozen_prefix`` stages run without autograd, so a frozen prefix keeps no activations for
    backward (a technique that freezes sets it).

    ``build_head(num_classes)`` returns the classification head the backbone's config asks for
    (``backbone.head``: a Linear by default, or a Keras-style MLP).
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
        self.head_spec: Any = None  # a heads.HeadSpec; None = a plain Linear
        self.source = "effbench"  # where the architecture comes from: effbench|torchvision|timm
        self.classifier_layers = "keep"

    def build_head(self, num_classes: int) -> nn.Module:
        """A new head ``feature_dim -> num_classes`` as configured by ``backbone.head``."""
        from effbench.backbones.heads import HeadSpec

        spec = self.head_spec if self.head_spec is not None else HeadSpec()
        return spec.build(self.feature_dim, num_classes)

    def describe(self) -> dict[str, Any]:
        """What a run used, for ``summary.json``: source, name, weights, feature size, stages,
        classifier layers, head and the normalisation applied (``Preprocessing.describe``)."""
        from effbench.backbones.heads import HeadSpec

        spec = self.head_spec if self.head_spec is not None else HeadSpec()
        return {"name": self.name, "source": self.source, "weights": self.weights,
                "feature_dim": self.feature_dim, "stages": len(self.stages),
                "classifier_layers": self.classifier_layers, "head": spec.describe(),
                "preprocessing": self.preprocessing.describe()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.frozen_prefix
        if k:
            with torch.no_grad():
                for stage in self.stages[:k]:
                    x = stage(x)
        for stage in self.stages[k:]:
            x = stage(x)
        return x
