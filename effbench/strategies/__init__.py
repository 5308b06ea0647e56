"""Strategies: one file per technique, each a subclass of :class:`Strategy`."""

from effbench.strategies.base import Strategy

__all__ = ["Strategy"]
