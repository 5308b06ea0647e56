"""``label_smoothing``: the training loss is computed against smoothed targets (Szegedy et al.
2016, "Rethinking the Inception Architecture"; Composer's ``LabelSmoothing``).

Single-label: the one-hot target becomes ``(1 - ε)·onehot + ε/C`` (a probability target ``t``,
as mixup hands it, ``(1 - ε)·t + ε/C``); multi-label: each 0/1 label
becomes ``(1 - ε)·y + ε/2``. Only training sees the smoothed targets: validation (the loss that
picks the best checkpoint and stops early) and testing compare against the true labels, so
metrics stay comparable with the baseline's. The run's own loss (class weights, CheXNet's
weighted BCE, sample weights) is kept: smoothing changes its target, not the loss.

Written by hand: the glue is one target transform around the run's loss, which both torch's
``cross_entropy`` (probability targets) and ``binary_cross_entropy_with_logits`` accept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from effbench.errors import EffbenchError
from effbench.task import is_multilabel
from effbench.technique import Technique, register

if TYPE_CHECKING:
    from effbench.context import RunContext


class SmoothedLoss(nn.Module):
    """``loss`` against smoothed targets while training; the true targets otherwise."""

    def __init__(self, loss: nn.Module, smoothing: float, num_classes: int,
                 multilabel: bool) -> None:
        super().__init__()
        self.loss, self.smoothing = loss, smoothing
        self.num_classes, self.multilabel = num_classes, multilabel

    def smooth(self, target: torch.Tensor) -> torch.Tensor:
        eps = self.smoothing
        if self.multilabel:
            return target.float() * (1 - eps) + eps / 2
        # Class indices (N,), or already probabilities (N, C): a technique acting on the batch
        # (mixup) hands soft targets; smoothing is linear, so either order of the two is one.
        probs = target.float() if target.ndim == 2 else \
            F.one_hot(target.long(), self.num_classes).float()
        return probs * (1 - eps) + eps / self.num_classes

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                sample_weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            target = self.smooth(target).to(logits.dtype)
        return self.loss(logits, target, sample_weight)


@register
class LabelSmoothing(Technique):
    """Smoothed targets in the training loss (see the module docstring)."""

    name = "label_smoothing"
    order = 60
    acts_on = frozenset({"loss"})

    def __init__(self, name: str = "label_smoothing", smoothing: float = 0.1) -> None:
        super().__init__(name)
        if isinstance(smoothing, bool) or not isinstance(smoothing, int | float) \
                or not 0 < smoothing < 1:
            raise EffbenchError(f"strategy.{self.name}.smoothing={smoothing!r} must be a fraction "
                                "in (0, 1), e.g. 0.1.")
        self.smoothing = float(smoothing)

    def configure_model(self, ctx: RunContext) -> None:
        dm = ctx.datamodule
        ctx.system.loss_fn = SmoothedLoss(ctx.system.loss_fn, self.smoothing, dm.num_classes,
                                          multilabel=is_multilabel(dm.task))

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        return {"applies_to": "training loss (validation and test use the true labels)"}

    def headline(self, summary: dict[str, Any]) -> str | None:
        return f"training targets smoothed by ε={self.smoothing:g}"
