"""Bad data gives a run one clear outcome: unreadable images are skipped and counted, data a
classifier cannot learn from is one sentence, and a damaged image cache is rebuilt."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import effbench.data.imagefolder as imagefolder
from effbench.data.brain_mri import BrainMRIDataModule
from effbench.data.imagefolder import ImageFolderDataModule, readable
from effbench.errors import EffbenchError
from effbench.techniques.precomputed.cache import FeatureCache
from tests.conftest import FAST, run_cli
from tests.data.fakes import write_brain_mri
from tests.data.helpers import PRE, make

QUICK = ["backbone=small_cnn", "trainer.max_epochs=1", "tracking.energy=false", *FAST]


def write_tree(folder: Path, classes: dict[str, int]) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for c, n in classes.items():
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            path = folder / c / f"{c}_{i}.{'png' if i % 2 else 'jpg'}"
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
            paths.append(path)
    return paths


def spoil(folder: Path) -> list[Path]:
    """Three kinds of unreadable .jpg: garbage, empty, cut off half-way."""
    garbage, empty, cut = folder / "garbage.jpg", folder / "empty.jpg", folder / "cut.jpg"
    garbage.write_bytes(os.urandom(2000))
    empty.write_bytes(b"")
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(cut, quality=95)
    cut.write_bytes(cut.read_bytes()[:400])
    return [garbage, empty, cut]


def summary_of(cwd: Path) -> dict:
    [path] = sorted((cwd / "outputs").rglob("summary.json"))
    return json.loads(path.read_text())


# -- unreadable images ---------------------------------------------------------------------------
def test_readable_tells_good_from_bad(tmp_path: Path) -> None:
    good = write_tree(tmp_path / "ok", {"a": 4})
    bad = spoil(tmp_path)
    padded = tmp_path / "padded.jpg"  # bytes after the end marker: still a good JPEG
    padded.write_bytes(good[0].read_bytes() + b"\0" * 100)
    assert all(readable(p) for p in [*good, padded])
    assert not any(readable(p) for p in bad)


def test_imagefolder_cli_skips_and_counts_unreadable(tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_tree(root, {"cat": 12, "dog": 12})
    spoil(root / "dog")
    res = run_cli(["dataset=imagefolder", f"dataset.root={root}", *QUICK], cwd=tmp_path)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    summary = summary_of(tmp_path)
    assert summary["status"] == "completed"
    assert summary["data"]["skipped_unreadable"] == 3
    assert sum(summary["data"]["sizes"].values()) == 24


def test_imagefolder_split_with_only_unreadable_files(tmp_path: Path) -> None:
    write_tree(tmp_path / "train", {"a": 4, "b": 4})
    (tmp_path / "val" / "a").mkdir(parents=True)
    spoil(tmp_path / "val" / "a")
    dm = ImageFolderDataModule(name="imagefolder", root=str(tmp_path)).configure(PRE)
    with pytest.raises(EffbenchError, match=r"all 3 image files under .*val are unreadable"):
        dm.setup()


def _mri_with_bad_file(tmp_path: Path) -> tuple[Path, Path]:
    root = write_brain_mri(tmp_path / "mri")
    bad = next((root / "Brain_Cancer raw MRI data" / "Brain_Cancer" / "brain_menin").iterdir())
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    return root, bad


def test_file_dataset_skips_unreadable_when_streaming(tmp_path: Path) -> None:
    root, bad = _mri_with_bad_file(tmp_path)
    dm = make(BrainMRIDataModule, root)
    assert dm.unreadable == [bad] and dm.describe()["skipped_unreadable"] == 1
    assert sum(len(y) for y in dm.labels.values()) == 29
    for split in dm.datasets:  # every remaining item decodes
        assert all(dm.datasets[split][i][0].dtype == torch.uint8
                   for i in range(len(dm.datasets[split])))


def test_cache_builder_records_undecodable_files(tmp_path: Path, monkeypatch) -> None:
    root = write_brain_mri(tmp_path / "mri")
    folder = root / "Brain_Cancer raw MRI data" / "Brain_Cancer" / "brain_glioma"
    damaged = sorted(folder.iterdir())[3]  # opens and ends well, its pixel data does not decode
    data = bytearray(damaged.read_bytes())
    sos = data.index(b"\xff\xda")
    data[sos + 2:sos + 40] = b"\xff" * 38
    damaged.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    first = make(BrainMRIDataModule, root, cache_images=True, cache_dir=str(cache))
    assert first.unreadable == [damaged]

    def no_opening(*args, **kwargs):
        raise AssertionError("a file was opened again")

    monkeypatch.setattr(imagefolder.Image, "open", no_opening)
    second = make(BrainMRIDataModule, root, cache_images=True, cache_dir=str(cache))
    assert second.unreadable == [damaged] and second.describe()["skipped_unreadable"] == 1
    for split in first.labels:
        assert torch.equal(first.datasets[split].images, second.datasets[split].images)


# -- data a classifier cannot learn from ---------------------------------------------------------
@pytest.mark.parametrize("case", ["one_folder", "one_class", "no_train"])
def test_unlearnable_data_is_one_sentence(tmp_path: Path, case: str) -> None:
    if case == "one_folder":
        write_tree(tmp_path / "images", {"cat": 6})
        args, expected = ["dataset=imagefolder", f"dataset.root={tmp_path / 'images'}"], (
            "one class folder", "'cat'", "at least 2")
    elif case == "one_class":
        args, expected = ["dataset=synthetic", "dataset.num_classes=1"], (
            "dataset.num_classes=1", "dataset.num_classes=2 or more")
    else:
        args, expected = ["dataset=synthetic", "dataset.num_train=0"], (
            "dataset.num_train=0", "dataset.num_train=1 or more")
    res = run_cli([*args, *QUICK], cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert all(e in out for e in expected), out[-2000:]
    assert "Traceback" not in out
    error = summary_of(tmp_path)["error"]
    assert all(e in error for e in expected) and not re.search(r"\.\s+[A-Z]", error)


# -- the pre-resized image cache -----------------------------------------------------------------
def _cache_array(cache: Path) -> Path:
    [array] = (cache / "images").glob("*.npy")
    return array


def test_damaged_cache_is_rebuilt_cli(tmp_path: Path) -> None:
    root = write_brain_mri(tmp_path / "mri")
    cache = tmp_path / "cache"
    args = ["dataset=brain_mri", f"dataset.root={root}", "dataset.cache_images=true",
            f"dataset.cache_dir={cache}", *QUICK]
    results = []
    for damage in (None, "zero", "truncate"):
        if damage == "zero":
            array = _cache_array(cache)
            array.write_bytes(b"\0" * array.stat().st_size)
        elif damage == "truncate":
            array = _cache_array(cache)
            array.write_bytes(array.read_bytes()[:-1000])
        cwd = tmp_path / f"run_{damage}"
        cwd.mkdir()
        res = run_cli(args, cwd=cwd)
        assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
        if damage:
            assert "rebuilding it" in res.stdout + res.stderr
        results.append(summary_of(cwd))
    assert results[0]["metrics"] and all(r["metrics"] == results[0]["metrics"] for r in results)
    assert np.load(_cache_array(cache)).any()


@pytest.mark.parametrize("damage", ["zero_pixels", "zero_all", "truncate", "no_record",
                                    "bad_record"])
def test_damaged_cache_is_never_used(tmp_path: Path, damage: str) -> None:
    root = write_brain_mri(tmp_path / "mri")
    cache = tmp_path / "cache"
    first = make(BrainMRIDataModule, root, cache_images=True, cache_dir=str(cache))
    array = _cache_array(cache)
    record = array.with_suffix(".json")
    data = bytearray(array.read_bytes())
    if damage == "zero_pixels":  # the header survives, the pixels do not
        data[200:] = bytes(len(data) - 200)
        array.write_bytes(bytes(data))
    elif damage == "zero_all":
        array.write_bytes(bytes(len(data)))
    elif damage == "truncate":
        array.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "no_record":
        record.unlink()
    else:
        record.write_text("{")
    second = make(BrainMRIDataModule, root, cache_images=True, cache_dir=str(cache))
    for split in first.labels:
        assert torch.equal(first.datasets[split].images, second.datasets[split].images)
    assert json.loads(record.read_text())["bytes"] == array.stat().st_size


# -- file permissions ----------------------------------------------------------------------------
def test_caches_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o002)
    try:
        make(BrainMRIDataModule, write_brain_mri(tmp_path / "mri"), cache_images=True,
             cache_dir=str(tmp_path / "c"))
        features = FeatureCache(tmp_path / "c").store("k", {"x": torch.zeros(2)})
    finally:
        os.umask(old)
    array = _cache_array(tmp_path / "c")
    for path in (array, array.with_suffix(".json"), features):
        assert stat.S_IMODE(path.stat().st_mode) == 0o664, path


def test_class_too_small_to_split_is_one_sentence(tmp_path: Path) -> None:
    write_tree(tmp_path, {"a": 8, "b": 1})
    dm = ImageFolderDataModule(name="imagefolder", root=str(tmp_path)).configure(PRE)
    with pytest.raises(EffbenchError, match="smallest class: 1.*dataset.val_ratio"):
        dm.setup()
