"""Backbone features of one split, computed once in eval mode (what the cache stores)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from effbench.data.base import ImageDataModule


def train_batches(dm: ImageDataModule, device: torch.device) -> Iterator[torch.Tensor]:
    """Normalised training batches in a fixed order (BN adaptation's input). A batch of one is
    skipped: BN in train mode cannot take statistics of a single 1×1 feature map."""
    for x, _ in dm.loader("train", shuffle=False):
        if len(x) > 1:
            yield dm.normalize(x.to(device, non_blocking=True))


def extract_features(backbone: nn.Module, dm: ImageDataModule, split: str, device: torch.device,
                     progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, D) float32 on CPU, labels)`` of ``split`` with the backbone in eval mode."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    loader = dm.loader(split, shuffle=False)
    with torch.inference_mode():
        for x, y in tqdm(loader, desc=f"extract {split}", disable=not progress, leave=False):
            x = dm.normalize(x.to(device, non_blocking=True))
            feats.append(backbone(x).float().cpu())
            labels.append(y.cpu())
    backbone.train(was_training)
    dim = getattr(backbone, "feature_dim", 0)
    if not feats:  # an empty split (e.g. dataset.val_ratio=0)
        return torch.zeros(0, dim), dm.labels[split][:0]
    return torch.cat(feats), torch.cat(labels)
