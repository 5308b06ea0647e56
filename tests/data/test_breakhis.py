"""BreaKHis: labels and patients parsed from the real file names; patient-level split."""

from __future__ import annotations

import pytest

from effbench.data.breakhis import FILE_RE, TUMOUR_TYPES, BreakHisDataModule
from effbench.errors import EffbenchError
from tests.data.fakes import write_breakhis
from tests.data.helpers import make


@pytest.fixture
def root(tmp_path):
    return write_breakhis(tmp_path / "breakhis", patients_per_type=3)


def _patient(path) -> str:
    m = FILE_RE.match(path.name)
    return f"{m['year']}-{m['slide']}"


def test_binary_labels_follow_benign_malignant_folders(root) -> None:
    dm = make(BreakHisDataModule, root)
    assert dm.class_names == ["benign", "malignant"]
    assert sum(len(y) for y in dm.labels.values()) == 8 * 3 * 4  # types × patients × mags
    for ds in dm.datasets.values():
        for path, y in zip(ds.paths, ds.labels):
            assert dm.class_names[int(y)] in path.parts  # .../breast/<benign|malignant>/SOB/...


def test_subtype_labels_are_the_eight_tumour_types(root) -> None:
    dm = make(BreakHisDataModule, root, label="subtype")
    assert dm.class_names == list(TUMOUR_TYPES.values())
    ds = dm.datasets["train"]
    assert all(dm.class_names[int(y)] == p.parts[-4] for p, y in zip(ds.paths, ds.labels))


def test_no_patient_in_two_splits(root) -> None:
    dm = make(BreakHisDataModule, root, val_ratio=0.2, test_ratio=0.2, label="subtype")
    patients = {s: {_patient(p) for p in ds.paths} for s, ds in dm.datasets.items()}
    assert patients["train"] and patients["val"] and patients["test"]
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert sum(map(len, patients.values())) == 24
    assert dm.describe()["patients"] == {s: len(p) for s, p in patients.items()}
    # the recorded groups are the parsed patients
    assert set(dm.groups["val"]) == patients["val"]


@pytest.mark.parametrize("mag", ["40X", "400", ["100X", "200X"]])
def test_magnification_filter(root, mag) -> None:
    dm = make(BreakHisDataModule, root, magnification=mag)
    wanted = {m.upper().rstrip("X") for m in ([mag] if isinstance(mag, str) else mag)}
    paths = [p for ds in dm.datasets.values() for p in ds.paths]
    assert len(paths) == 24 * len(wanted)
    assert {FILE_RE.match(p.name)["mag"] for p in paths} == wanted


@pytest.mark.parametrize(("key", "value"), [("magnification", "20X"), ("label", "grade")])
def test_bad_options_are_errors(tmp_path, key, value) -> None:
    with pytest.raises(EffbenchError, match=f"dataset.{key}='{value}'"):
        BreakHisDataModule(name="breakhis", root=str(tmp_path), **{key: value})


def test_missing_data_names_the_tree(tmp_path) -> None:
    with pytest.raises(EffbenchError, match="BreaKHis_v1/histology_slides/breast.*ufpr"):
        make(BreakHisDataModule, tmp_path)
