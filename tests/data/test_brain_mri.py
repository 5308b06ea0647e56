"""Brain MRI: class folders (inside the download's wrappers) → a stratified, seeded split."""

from __future__ import annotations

import pytest
import torch

from effbench.data.brain_mri import CLASSES, BrainMRIDataModule
from effbench.errors import EffbenchError
from tests.data.fakes import write_brain_mri
from tests.data.helpers import make


def test_stratified_split_of_every_image(tmp_path) -> None:
    root = write_brain_mri(tmp_path / "mri", per_class=10)
    dm = make(BrainMRIDataModule, root, val_ratio=0.2, test_ratio=0.2)
    assert dm.class_names == list(CLASSES)
    sizes = {s: len(y) for s, y in dm.labels.items()}
    assert sizes == {"train": 18, "val": 6, "test": 6}
    for split in ("val", "test"):  # stratified: 2 of each class
        assert torch.bincount(dm.labels[split], minlength=3).tolist() == [2, 2, 2]
    paths = [p for s in ("train", "val", "test") for p in dm.datasets[s].paths]
    assert len(set(paths)) == 30  # every image once; README.txt skipped
    for s in ("train", "val", "test"):
        ds = dm.datasets[s]
        assert all(CLASSES[int(y)] == p.parent.name for p, y in zip(ds.paths, ds.labels))
    x, _ = dm.datasets["train"][0]
    assert x.shape == (3, 32, 32)  # grey JPEGs come out as 3 channels


def test_split_is_fixed_by_split_seed(tmp_path) -> None:
    root = write_brain_mri(tmp_path / "mri")
    a = make(BrainMRIDataModule, root).datasets["test"].paths
    b = make(BrainMRIDataModule, root).datasets["test"].paths
    c = make(BrainMRIDataModule, root, split_seed=1).datasets["test"].paths
    assert a == b and a != c


def test_missing_data_names_the_folders(tmp_path) -> None:
    with pytest.raises(EffbenchError, match="brain_glioma/ brain_menin/ brain_tumor/"):
        make(BrainMRIDataModule, tmp_path)
