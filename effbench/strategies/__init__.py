"""Techniques: one file per technique, each a subclass of :class:`Technique`; several stack."""

from effbench.strategies.base import Technique

__all__ = ["Technique"]
