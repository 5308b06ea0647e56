"""``finetune``: the baseline — every parameter of the (pretrained) backbone and head trains.

Nothing to change around the shared fit: Adam (or SGD/AdamW), ReduceLROnPlateau and early stopping
on the validation loss, the best checkpoint is tested (the CheXNet study's recipe).
"""

from __future__ import annotations

from effbench.technique import Technique, register


@register
class Finetune(Technique):
    """Full fine-tuning; the reference every other technique is compared against."""

    name = "finetune"
