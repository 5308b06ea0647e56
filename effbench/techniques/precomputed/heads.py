"""Classifier heads trained on cached features, chosen by ``strategy.precomputed.head``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from effbench.errors import EffbenchError


def mlp_head(in_dim: int, num_classes: int, hidden: int, dropout: float) -> nn.Module:
    """The study's redesigned classifier: Linear → BatchNorm1d → ReLU → Dropout → Linear
    (intermediate normalisation and a non-linearity let it generalise better than one Linear)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Dropout(dropout), nn.Linear(hidden, num_classes))


def linear_head(in_dim: int, num_classes: int, hidden: int, dropout: float) -> nn.Module:
    """One Linear layer (what ``finetune`` puts on the backbone), for comparison."""
    return nn.Linear(in_dim, num_classes)


HEADS: dict[str, Callable[[int, int, int, float], nn.Module]] = {
    "mlp": mlp_head, "linear": linear_head}


def build_head(kind: str, in_dim: int, num_classes: int, hidden: int = 512,
               dropout: float = 0.3) -> nn.Module:
    builder = HEADS.get(kind)
    if builder is None:
        raise EffbenchError(f"Unknown head strategy.precomputed.head={kind!r}; use one of "
                            f"{', '.join(HEADS)}.")
    if not (isinstance(hidden, int) and hidden >= 1):
        raise EffbenchError(f"invalid value strategy.precomputed.hidden={hidden!r}: use a positive "
                            "number "
                            "of hidden units such as strategy.precomputed.hidden=512.")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise EffbenchError(f"invalid value strategy.precomputed.dropout={dropout!r}: use a "
                            "probability in "
                            "[0, 1) such as strategy.precomputed.dropout=0.3.")
    return builder(in_dim, num_classes, hidden, float(dropout))
