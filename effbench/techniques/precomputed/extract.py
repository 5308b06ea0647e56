"""Backbone features of one split, computed once in eval mode (what the cache stores)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from effbench.data.base import ImageDataModule


def adaptation_order(n: int, seed: int) -> list[int]:
    """The order BN adaptation reads the training split in: a permutation fixed by ``seed``.

    Why not file order: datasets list their files class by class (brain_mri, breakhis), and with
    an EMA momentum the running statistics would end as those of the last class (class-pure batches
    also give a per-batch variance of one class, not of the dataset). Shuffled batches each look
    like the dataset. Why one permutation for every pass: the passes then see the same batches,
    which lets ``bn_adapt`` replay them from one recorded forward pass."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()


def train_batches(dm: ImageDataModule, device: torch.device, seed: int,
                  progress: bool = False) -> Iterator[torch.Tensor]:
    """Normalised training batches in the seeded shuffled order of :func:`adaptation_order`, the
    same on every call (BN adaptation's input). A batch of one is skipped: BN in train mode cannot
    take statistics of a single 1×1 feature map."""
    dm.setup()
    order = adaptation_order(len(dm.datasets["train"]), seed)
    loader = dm.loader("train", shuffle=False, sampler=order)
    for x, _ in tqdm(loader, desc="BN adaptation", disable=not progress, leave=False):
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
