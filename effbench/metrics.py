"""Classification metrics (torchmetrics) shared by the Lightning system and custom loops."""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelAUROC,
    MultilabelF1Score,
)

from effbench.task import is_multilabel


def build_metrics(task: str, num_classes: int, validate_args: bool = True,
                  per_class: bool = True) -> MetricCollection:
    """acc, macro F1, per-class accuracy and AUROC (macro + per class) for the task.

    ``per_class=False`` leaves out the per-class vectors: a validation row logs scalars only, and
    the per-class AUROC is half of what computing the metrics costs (one ROC curve per class)."""
    v = {"validate_args": validate_args}
    accuracy, f1, auroc = ((MultilabelAccuracy, MultilabelF1Score, MultilabelAUROC)
                           if is_multilabel(task) else
                           (MulticlassAccuracy, MulticlassF1Score, MulticlassAUROC))
    n = num_classes  # num_labels of the multilabel metrics, num_classes of the multiclass ones
    metrics = {
        "acc": accuracy(n, average="micro", **v),
        "f1_macro": f1(n, average="macro", **v),
        "acc_per_class": accuracy(n, average=None, **v),
        "auroc_macro": auroc(n, average="macro", **v),
        "auroc_per_class": auroc(n, average=None, **v),
    }
    if not per_class:
        metrics = {k: m for k, m in metrics.items() if not k.endswith("_per_class")}
    return MetricCollection(metrics)


def split_scalars(values: dict[str, torch.Tensor], prefix: str,
                  class_names: list[str]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Scalars as ``{prefix/name: value}``, vectors as ``{prefix/name: {class: value}}``."""
    scalars, per_class = {}, {}
    for name, v in values.items():
        v = v.detach().float().cpu()
        if v.ndim == 0:
            scalars[f"{prefix}/{name}"] = float(v)
        else:
            per_class[f"{prefix}/{name}"] = {c: float(x) for c, x in zip(class_names, v.tolist())}
    return scalars, per_class


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    return torch.sigmoid(logits) if is_multilabel(task) else torch.softmax(logits, dim=-1)
