"""The pre-resized image cache and the patient-level split shared by the file datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import effbench.data.imagefolder as imagefolder
from effbench.data.brain_mri import BrainMRIDataModule
from effbench.data.files import MemmapImages, group_split
from effbench.errors import EffbenchError
from tests.data.fakes import write_brain_mri
from tests.data.helpers import make


def _all(ds) -> torch.Tensor:
    return torch.stack([ds[i][0] for i in range(len(ds))])


def test_second_run_reads_the_cache_without_decoding(tmp_path, monkeypatch) -> None:
    root = write_brain_mri(tmp_path / "mri")
    cache = tmp_path / "cache"
    streamed = make(BrainMRIDataModule, root)
    first = make(BrainMRIDataModule, root, cache_images=True, cache_dir=str(cache))
    files = list((cache / "images").iterdir())
    files = [p for p in files if p.suffix == ".npy"]
    assert len(files) == 1 and not list(cache.rglob("*.tmp*"))  # written once, no temp file left
    for split in ("train", "val", "test"):  # cached pixels are the decoded-and-resized ones
        assert torch.equal(first.datasets[split].images, _all(streamed.datasets[split]))

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded again")

    monkeypatch.setattr(imagefolder.Image, "open", no_decoding)
    second = make(BrainMRIDataModule, root, cache_images=True, cache_dir=str(cache),
                  val_ratio=0.3)  # another split of the same files reuses the same array
    assert sorted((cache / "images").glob("*.npy")) == files
    assert sum(len(y) for y in second.labels.values()) == 30
    assert second.datasets["train"].images.shape[1:] == (3, 32, 32)


def test_large_cache_is_memory_mapped(tmp_path) -> None:
    root = write_brain_mri(tmp_path / "mri")
    streamed = make(BrainMRIDataModule, root)
    dm = make(BrainMRIDataModule, root, cache_images=True, cache_dir=str(tmp_path / "c"),
              memory_budget_gb=1e-9)
    ds = dm.datasets["test"]
    assert isinstance(ds, MemmapImages)
    assert torch.equal(_all(ds), _all(streamed.datasets["test"]))
    batch, _ = next(iter(dm.loader("test")))
    assert batch.shape == (len(ds), 3, 32, 32)


def test_changed_file_or_size_builds_a_new_cache(tmp_path) -> None:
    root = write_brain_mri(tmp_path / "mri")
    cache = tmp_path / "c"
    make(BrainMRIDataModule, root, cache_images=True, cache_dir=str(cache))
    some = next((root / "Brain_Cancer raw MRI data" / "Brain_Cancer" / "brain_menin").iterdir())
    Image.new("L", (20, 20), 255).save(some)
    make(BrainMRIDataModule, root, cache_images=True, cache_dir=str(cache))
    assert len(list((cache / "images").glob("*.npy"))) == 2


def test_cache_needs_a_folder(tmp_path) -> None:
    with pytest.raises(EffbenchError, match="dataset.cache_dir"):
        make(BrainMRIDataModule, write_brain_mri(tmp_path / "mri"), cache_images=True,
             cache_dir=None)


def test_group_split_keeps_groups_whole() -> None:
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 50, 400)
    strata = groups % 3
    idx = group_split(strata, groups, 0.15, 0.15, seed=0)
    seen = [set(groups[i]) for i in idx.values()]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert sum(len(i) for i in idx.values()) == 400
    assert 0.05 < len(idx["test"]) / 400 < 0.3


def test_a_cache_being_built_elsewhere_is_waited_for(tmp_path, monkeypatch) -> None:
    """DDP ranks start together: while one holds the build lock, the others wait and reuse."""
    import threading

    from filelock import FileLock

    from effbench.data.files import ImageCache, write_record
    from tests.data.helpers import PRE

    files = sorted(write_brain_mri(tmp_path / "mri", per_class=2).rglob("*.jpg"))
    cache = ImageCache(tmp_path / "c", PRE)
    target = cache.folder / f"{cache.key(files)}.npy"
    cache.folder.mkdir(parents=True)

    def no_second_build(*args, **kwargs):
        raise AssertionError("built twice")

    monkeypatch.setattr(ImageCache, "_write", no_second_build)
    other_rank = FileLock(str(target) + ".lock")
    other_rank.acquire()
    result: dict = {}
    waiter = threading.Thread(target=lambda: result.setdefault("path", cache.ensure(files)))
    waiter.start()
    np.save(target, np.zeros((len(files), 3, 32, 32), np.uint8))  # the other rank finishes
    write_record(target, target.with_suffix(".json"), [])
    other_rank.release()
    waiter.join(60)
    assert result["path"].path == target
