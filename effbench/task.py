"""What a dataset asks of a model: one label per image (``multiclass``) or any number of the
classes at once (``multilabel``, as ChestX-ray14's pathologies). A datamodule's ``task`` says which;
everything that depends on it (loss, metrics, probabilities, the headline metric, compare's
statistics) asks :func:`is_multilabel` here, and nowhere else spells the names."""

from __future__ import annotations

MULTICLASS = "multiclass"
MULTILABEL = "multilabel"
TASKS = (MULTICLASS, MULTILABEL)


def is_multilabel(task: object) -> bool:
    return task == MULTILABEL


def task_of(multilabel: bool) -> str:
    return MULTILABEL if multilabel else MULTICLASS
