"""Beans: the official folders decode to the 3 classes and the official split sizes."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from PIL import Image

from effbench.data.beans import CLASSES, BeansDataModule
from effbench.errors import EffbenchError
from tests.data.fakes import write_beans
from tests.data.helpers import make


def test_folders_decode_labels_and_official_split(tmp_path) -> None:
    root = write_beans(tmp_path / "beans", {"train": 5, "validation": 2, "test": 3})
    dm = make(BeansDataModule, root)
    assert dm.class_names == list(CLASSES)
    assert {s: len(y) for s, y in dm.labels.items()} == {"train": 15, "val": 6, "test": 9}
    ds = dm.datasets["val"]
    for i, path in enumerate(ds.paths):  # label = the class folder the file sits in
        assert dm.class_names[int(ds.labels[i])] == path.parent.name
        assert path.parts[-3] == "validation"
    x, _ = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8


def test_missing_data_names_the_tree_and_the_source(tmp_path) -> None:
    with pytest.raises(EffbenchError, match="validation/.*angular_leaf_spot.*huggingface.co"):
        make(BeansDataModule, tmp_path / "nowhere")


def test_unknown_class_folder_is_an_error(tmp_path) -> None:
    root = write_beans(tmp_path / "beans")
    (root / "train" / "tomato").mkdir()
    Image.new("RGB", (8, 8)).save(root / "train" / "tomato" / "a.jpg")
    with pytest.raises(EffbenchError, match="tomato"):
        make(BeansDataModule, root)


def test_unknown_source_is_an_error(tmp_path) -> None:
    with pytest.raises(EffbenchError, match="dataset.source='kaggle'"):
        BeansDataModule(name="beans", root=str(tmp_path), source="kaggle")


def _fake_hf(split_sizes: dict[str, int]) -> types.ModuleType:
    """A stand-in for ``datasets.load_dataset('AI-Lab-Makerere/beans')`` (same fields)."""

    class Split(list):
        features = {"labels": types.SimpleNamespace(names=list(CLASSES))}

    def load_dataset(name: str) -> dict:
        assert name == "AI-Lab-Makerere/beans"
        return {s: Split({"image": Image.new("RGB", (50, 40), (i * 40, 0, 0)), "labels": i % 3}
                         for i in range(n)) for s, n in split_sizes.items()}

    return types.SimpleNamespace(load_dataset=load_dataset)


def test_huggingface_source(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets",
                        _fake_hf({"train": 6, "validation": 3, "test": 3}))
    dm = make(BeansDataModule, tmp_path, source="huggingface")
    assert {s: len(y) for s, y in dm.labels.items()} == {"train": 6, "val": 3, "test": 3}
    assert dm.class_names == list(CLASSES)
    assert dm.datasets["train"].images.shape == (6, 3, 32, 32)  # resized while loading
    assert dm.labels["train"].tolist() == [0, 1, 2, 0, 1, 2]


def test_huggingface_source_without_the_package(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import raises ImportError
    with pytest.raises(EffbenchError, match="pip install datasets"):
        make(BeansDataModule, tmp_path, source="huggingface")
