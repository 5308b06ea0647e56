"""Losses: cross-entropy (optionally class-weighted) and CheXNet's class-weighted BCE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effbench.task import is_multilabel


class WeightedBCE(nn.Module):
    """Per-label weighted BCE as in CheXNet: w₊ = |N|/(|P|+|N|) on positives, w₋ = |P|/(|P|+|N|)
    on negatives, computed per class from the training labels (rare positives weigh more)."""

    def __init__(self, positives: torch.Tensor, total: int) -> None:
        super().__init__()
        p = positives.float()
        n = total - p
        self.register_buffer("w_pos", n / total)
        self.register_buffer("w_neg", p / total)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                sample_weight: torch.Tensor | None = None) -> torch.Tensor:
        target = target.float()
        weight = target * self.w_pos + (1 - target) * self.w_neg
        loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
        loss = loss.mean(dim=1)
        return _reduce(loss, sample_weight)


class CrossEntropy(nn.Module):
    def __init__(self, class_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("class_weight", class_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                sample_weight: torch.Tensor | None = None) -> torch.Tensor:
        loss = F.cross_entropy(logits, target, weight=self.class_weight, reduction="none")
        return _reduce(loss, sample_weight)


def _reduce(loss: torch.Tensor, sample_weight: torch.Tensor | None) -> torch.Tensor:
    if sample_weight is None:
        return loss.mean()
    # Normalised so the weights change the relative emphasis, not the loss scale.
    return (loss * sample_weight).sum() / sample_weight.sum().clamp_min(1e-12)


def build_loss(task: str, class_counts: torch.Tensor, total: int,
               class_weights: bool = False) -> nn.Module:
    """Weighted BCE for multilabel; CE (inverse-frequency class weights if asked) otherwise."""
    if is_multilabel(task):
        return WeightedBCE(class_counts, total)
    if not class_weights:
        return CrossEntropy()
    w = total / (len(class_counts) * class_counts.clamp_min(1))
    return CrossEntropy(w)
