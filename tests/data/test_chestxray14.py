"""ChestX-ray14: CSV labels → 14-label vectors, official lists, patient-level validation split."""

from __future__ import annotations

import csv

import pytest
import torch

from effbench.data.chestxray14 import LABELS, ChestXray14DataModule
from effbench.errors import EffbenchError
from tests.conftest import load_summary, run_preset_job
from tests.data.fakes import write_chestxray14
from tests.data.helpers import make


def _csv(root) -> dict[str, dict]:
    with open(root / "Data_Entry_2017.csv", newline="") as f:
        return {r["Image Index"]: r for r in csv.DictReader(f)}


@pytest.mark.parametrize("layout", ["flat", "split"])
def test_multilabel_vectors_and_official_split(tmp_path, layout) -> None:
    root = write_chestxray14(tmp_path / "cxr", layout=layout)
    dm = make(ChestXray14DataModule, root, val_ratio=0.25)
    assert dm.task == "multilabel" and dm.class_names == list(LABELS)
    rows = _csv(root)
    for ds in dm.datasets.values():
        for path, y in zip(ds.paths, ds.labels):
            findings = rows[path.name]["Finding Labels"].split("|")
            expected = [float(name in findings) for name in LABELS]
            assert y.tolist() == expected  # "No Finding" → all zeros
    zeros = [n for n, r in rows.items() if r["Finding Labels"] == "No Finding"]
    assert zeros and all(len(r["Finding Labels"].split("|")) <= 3 for r in rows.values())
    test_names = (root / "test_list.txt").read_text().split()
    assert [p.name for p in dm.datasets["test"].paths] == test_names
    tv = (root / "train_val_list.txt").read_text().split()
    assert sorted(p.name for s in ("train", "val") for p in dm.datasets[s].paths) == sorted(tv)


def test_no_patient_in_two_splits(tmp_path) -> None:
    root = write_chestxray14(tmp_path / "cxr", patients=40)
    dm = make(ChestXray14DataModule, root, val_ratio=0.2)
    rows = _csv(root)
    patients = {s: {rows[p.name]["Patient ID"] for p in ds.paths}
                for s, ds in dm.datasets.items()}
    assert patients["val"] and not patients["train"] & patients["val"]
    assert not (patients["train"] | patients["val"]) & patients["test"]
    assert set(dm.groups["train"]) == patients["train"]


def test_single_label_is_a_binary_task(tmp_path) -> None:
    root = write_chestxray14(tmp_path / "cxr")
    dm = make(ChestXray14DataModule, root, labels=["Pneumonia"])
    assert dm.task == "multiclass" and dm.class_names == ["No Pneumonia", "Pneumonia"]
    rows = _csv(root)
    ds = dm.datasets["train"]
    assert [int(y) for y in ds.labels] == [
        int("Pneumonia" in rows[p.name]["Finding Labels"]) for p in ds.paths]
    assert dm.labels["train"].dtype == torch.int64 and dm.labels["train"].sum() > 0


def test_label_subset(tmp_path) -> None:
    dm = make(ChestXray14DataModule, write_chestxray14(tmp_path / "cxr"),
              labels=["Effusion", "Hernia"])
    assert dm.class_names == ["Effusion", "Hernia"] and dm.labels["train"].shape[1] == 2


def test_images_missing_from_disk_are_skipped(tmp_path, caplog) -> None:
    root = write_chestxray14(tmp_path / "cxr")
    victim = (root / "test_list.txt").read_text().split()[0]
    (root / "images" / victim).unlink()
    dm = make(ChestXray14DataModule, root)
    assert victim not in {p.name for p in dm.datasets["test"].paths}
    assert "1 images of the split lists are missing" in caplog.text


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"labels": ["Covid"]}, "dataset.labels entry 'Covid'"),
])
def test_bad_options(tmp_path, kwargs, match) -> None:
    with pytest.raises(EffbenchError, match=match):
        ChestXray14DataModule(name="chestxray14", root=str(tmp_path), **kwargs)


def test_missing_data_names_the_files(tmp_path) -> None:
    with pytest.raises(EffbenchError, match="Data_Entry_2017.csv.*test_list.txt.*nihcc"):
        make(ChestXray14DataModule, tmp_path)


def test_run_reports_auroc_per_pathology(tmp_path) -> None:
    """A whole run: weighted BCE trains, the summary names every pathology's AUROC."""
    root = write_chestxray14(tmp_path / "cxr")
    summary = run_preset_job(tmp_path, ["dataset=chestxray14", f"dataset.root={root}",
                                        "backbone=small_cnn", "trainer.max_epochs=1"])
    assert summary["status"] == "completed", summary["error"]
    on_disk = load_summary(tmp_path / "run")
    assert list(on_disk["per_class"]["test/auroc_per_class"]) == list(LABELS)
    assert on_disk["data"]["patients"]["val"] > 0
