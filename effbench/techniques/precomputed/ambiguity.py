"""Ambiguity weights for the loss: samples the head is unsure about count more.

Multiclass: with p = softmax(logits) and p₍₁₎ ≥ p₍₂₎ the two largest probabilities,
    ambiguity a = 1 − (p₍₁₎ − p₍₂₎)                        ∈ [0, 1]
Multilabel: per label the "margin" between p = σ(logit) and 1 − p is |2p − 1|; per sample
    a = mean over labels of (1 − |2p − 1|) = mean of (1 − 2·|p − 0.5|)   ∈ [0, 1]
Weight: w = 1 + α·a  (α = ``strategy.precomputed.ambiguity_weight``; α = 0 switches it off: w ≡ 1).

The weights are computed from the detached current logits (they steer, they get no gradient), and
the loss is the weight-normalised mean  L = Σᵢ wᵢ·ℓᵢ / Σᵢ wᵢ  (``effbench.losses._reduce``), so
α changes which samples dominate, not the loss scale or the effective learning rate.
"""

from __future__ import annotations

import torch

from effbench.task import is_multilabel


def ambiguity(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Per-sample ambiguity in [0, 1] (1 = a tie between the top two classes / p = 0.5)."""
    logits = logits.detach().float()
    if is_multilabel(task):
        p = torch.sigmoid(logits)
        return (1.0 - (2.0 * p - 1.0).abs()).mean(dim=1)
    if logits.shape[1] < 2:
        return logits.new_zeros(len(logits))
    top2 = torch.softmax(logits, dim=1).topk(2, dim=1).values
    return 1.0 - (top2[:, 0] - top2[:, 1])


def ambiguity_weights(logits: torch.Tensor, task: str, alpha: float) -> torch.Tensor | None:
    """w = 1 + α·ambiguity; ``None`` (plain mean) when α = 0."""
    if alpha == 0:
        return None
    return 1.0 + alpha * ambiguity(logits, task)
