"""Building a configured datamodule of a dataset family on generated files."""

from __future__ import annotations

from typing import Any

from effbench.backbones.base import Preprocessing
from effbench.data.base import ImageDataModule

PRE = Preprocessing(32, 32)


def make(cls: type[ImageDataModule], root: Any, **kwargs: Any) -> ImageDataModule:
    """``cls`` on ``root``, configured at 32 px and set up (no workers)."""
    dm = cls(name=kwargs.pop("name", cls.__name__), root=str(root), **kwargs).configure(PRE)
    dm.setup()
    return dm
