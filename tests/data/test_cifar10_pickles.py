"""CIFAR-10 pickles are read with an unpickler that loads numpy arrays and nothing else."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from effbench.data.cifar10 import FOLDER, Cifar10DataModule, read_batch
from effbench.errors import EffbenchError
from tests.conftest import FAST, run_cli
from tests.data.fakes import write_cifar10
from tests.data.helpers import PRE

CLI = ["dataset=cifar10", "backbone=small_cnn", "trainer.max_epochs=1", "tracking.energy=false",
       *FAST]


class RunsCommand:
    """What an attacker would put in ``data_batch_1``: unpickling it runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class TouchesFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _craft(root: Path, payload: type, name: str = "data_batch_1") -> tuple[Path, Path]:
    write_cifar10(root)
    marker = root / "PWNED"
    path = root / FOLDER / name
    with open(path, "wb") as f:
        pickle.dump({"data": payload(marker), "labels": [0]}, f, protocol=2)
    return path, marker


def test_real_format_loads(tmp_path: Path) -> None:
    """The fake is written as the official Python-2 pickles are (numpy.core globals, py2 str)."""
    write_cifar10(tmp_path, per_batch=10)
    dm = Cifar10DataModule(name="cifar10", root=str(tmp_path), val_ratio=0.2).configure(PRE)
    dm.setup()
    assert dm.class_names[:2] == ["airplane", "automobile"]
    assert {s: len(y) for s, y in dm.labels.items()} == {"train": 40, "val": 10, "test": 10}


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_python3_copies_load(tmp_path: Path, protocol: int) -> None:
    """Re-pickled copies (bytes as _codecs.encode, protocol 5's _frombuffer) still load."""
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    path = tmp_path / "batch"
    with open(path, "wb") as f:
        pickle.dump({b"data": data, b"labels": [3, 4], b"batch_label": b"x"}, f, protocol=protocol)
    x, y = read_batch(path)
    assert np.array_equal(x.reshape(2, 3072), data) and y.tolist() == [3, 4]


@pytest.mark.parametrize("payload", [RunsCommand, TouchesFile])
@pytest.mark.parametrize("name", ["data_batch_1", "batches.meta"])
def test_crafted_pickle_is_refused_before_it_runs(tmp_path: Path, payload: type,
                                                  name: str) -> None:
    path, marker = _craft(tmp_path, payload, name)
    dm = Cifar10DataModule(name="cifar10", root=str(tmp_path)).configure(PRE)
    with pytest.raises(EffbenchError, match="not a CIFAR-10 batch file.*never runs") as err:
        dm.setup()
    assert str(path) in str(err.value) and not marker.exists()


def test_crafted_pickle_cli(tmp_path: Path) -> None:
    path, marker = _craft(tmp_path / "data", RunsCommand)
    res = run_cli([*CLI, f"dataset.root={tmp_path / 'data'}"], cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert str(path) in out and "posix.system" in out and "Traceback" not in out
    assert not marker.exists()


def test_truncated_pickle_cli(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "data")
    path = tmp_path / "data" / FOLDER / "data_batch_3"
    path.write_bytes(path.read_bytes()[:5000])  # a download cut off mid-array
    res = run_cli([*CLI, f"dataset.root={tmp_path / 'data'}"], cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert f"{path} is truncated or corrupt" in out and "download it again" in out
    assert "Traceback" not in out


@pytest.mark.parametrize("content", [b"", b"garbage", pickle.dumps([1, 2, 3]),
                                     pickle.dumps({"data": "not pixels", "labels": [1]})])
def test_not_a_batch_names_the_file(tmp_path: Path, content: bytes) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / FOLDER / "test_batch"
    path.write_bytes(content)
    dm = Cifar10DataModule(name="cifar10", root=str(tmp_path)).configure(PRE)
    with pytest.raises(EffbenchError, match="re-download|download it again") as err:
        dm.setup()
    assert str(path) in str(err.value)
