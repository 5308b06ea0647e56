"""The tiny configuration the tests run: generated data small enough for a run in seconds."""

from __future__ import annotations

# No bar in captured output, no energy tracker (codecarbon's start-up costs more than the run).
QUIET = ["trainer.enable_progress_bar=false", "tracking.energy=false"]
# 64 / 32 / 32 generated images (4 classes, synthetic's default).
DATA = ["dataset=synthetic", "dataset.num_train=64", "dataset.num_val=32", "dataset.num_test=32"]


def tiny(epochs: int = 1, quiet: bool = True) -> list[str]:
    """The tiny data for ``epochs`` epochs (``quiet=False`` keeps the energy tracker)."""
    return [*DATA, f"trainer.max_epochs={epochs}",
            *(QUIET if quiet else ["trainer.enable_progress_bar=false"])]
