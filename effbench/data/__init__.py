"""Datasets: one file per family, all built on :class:`effbench.data.base.ImageDataModule`."""
