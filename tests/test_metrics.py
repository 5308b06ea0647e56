"""effbench.metrics: the one collection of torchmetrics every loop reports."""

from __future__ import annotations

import pytest
import torch

from effbench.metrics import build_metrics


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_a_validation_row_has_the_full_collections_scalars_and_no_vectors(task: str) -> None:
    """``per_class=False`` (each epoch's validation row) computes the scalars the full collection
    computes, to the bit, and leaves out only the per-class vectors nobody logs per epoch."""
    torch.manual_seed(0)
    logits = torch.randn(60, 5)
    y = torch.randint(0, 2, (60, 5)) if task == "multilabel" else torch.randint(0, 5, (60,))
    full, row = build_metrics(task, 5), build_metrics(task, 5, per_class=False)
    full.update(logits, y)
    row.update(logits, y)
    everything, scalars = full.compute(), row.compute()
    assert set(everything) == {"acc", "f1_macro", "acc_per_class", "auroc_macro",
                               "auroc_per_class"}
    assert set(scalars) == {"acc", "f1_macro", "auroc_macro"}
    assert all(torch.equal(scalars[k], everything[k]) for k in scalars)
    assert everything["acc_per_class"].shape == everything["auroc_per_class"].shape == (5,)
