"""MedMNIST: the .npz keys and shapes → in-memory tensors, multiclass or multilabel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from effbench.data.base import TensorImages
from effbench.data.medmnist import MedMNISTDataModule
from effbench.errors import EffbenchError
from tests.data.fakes import write_medmnist
from tests.data.helpers import make


def test_multiclass_rgb(tmp_path) -> None:
    root = write_medmnist(tmp_path / "medmnist")
    dm = make(MedMNISTDataModule, root, flag="pathmnist")
    assert dm.task == "multiclass" and len(dm.class_names) == 9 and dm.class_names[0] == "adipose"
    assert {s: len(y) for s, y in dm.labels.items()} == {"train": 40, "val": 12, "test": 12}
    ds = dm.datasets["train"]
    assert isinstance(ds, TensorImages)  # in memory, batched fetch
    assert ds.images.shape == (40, 3, 32, 32) and ds.images.dtype == torch.uint8
    raw = np.load(root / "pathmnist.npz")
    assert dm.labels["train"].tolist() == raw["train_labels"][:, 0].tolist()


def test_multilabel_grey(tmp_path) -> None:
    root = write_medmnist(tmp_path / "m", flag="chestmnist", classes=14, multilabel=True, rgb=False)
    dm = make(MedMNISTDataModule, root / "chestmnist.npz", flag="chestmnist")
    assert dm.task == "multilabel" and len(dm.class_names) == 14
    y = dm.labels["test"]
    assert y.dtype == torch.float32 and y.shape == (12, 14)
    assert y.tolist() == np.load(root / "chestmnist.npz")["test_labels"].astype(float).tolist()
    x = dm.datasets["test"].images
    assert x.shape == (12, 3, 32, 32) and torch.equal(x[:, 0], x[:, 1])  # grey → 3 channels


def test_size_variant_file_name(tmp_path) -> None:
    root = write_medmnist(tmp_path / "m", flag="breastmnist_64", classes=2)
    dm = make(MedMNISTDataModule, root, flag="breastmnist", size=64)
    assert dm.class_names == ["malignant", "normal, benign"]


def test_multiclass_on_vector_labels_is_an_error(tmp_path) -> None:
    root = write_medmnist(tmp_path / "m", flag="chestmnist", classes=14, multilabel=True)
    with pytest.raises(EffbenchError, match="dataset.task=multilabel"):
        make(MedMNISTDataModule, root, flag="chestmnist", task="multiclass")


def test_missing_file_and_keys(tmp_path) -> None:
    with pytest.raises(EffbenchError, match="pathmnist.npz with train_images.*medmnist.com"):
        make(MedMNISTDataModule, tmp_path)
    np.savez(tmp_path / "pathmnist.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(EffbenchError, match="train_labels"):
        make(MedMNISTDataModule, tmp_path)
