"""Tiny datasets in each real on-disk format (file names, CSV columns, split lists, npz keys).

Images are small (16 px) and carry a class-dependent colour so a model could learn them; every
writer returns the root to pass as ``dataset.root`` and is deterministic.
"""

from __future__ import annotations

import csv
import pickle
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from effbench.data.beans import CLASSES as BEAN_CLASSES
from effbench.data.brain_mri import CLASSES as MRI_CLASSES
from effbench.data.chestxray14 import LABELS as CHEST_LABELS

SIZE = 16


def _image(path: Path, label: int, seed: int, mode: str = "RGB", size: int = SIZE) -> None:
    rng = np.random.default_rng(seed)
    base = np.array([60 + 60 * (label % 3), 40 * (label % 5), 200 - 30 * (label % 4)], np.uint8)
    pixels = np.clip(base + rng.integers(-20, 20, (size, size + 4, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(pixels)
    img.convert(mode).save(path)


def write_beans(root: Path, per_class: dict[str, int] | None = None) -> Path:
    """``train/ validation/ test/`` × the 3 class folders of JPEGs (HF/GitHub naming)."""
    per_class = per_class or {"train": 4, "validation": 2, "test": 2}
    for split, n in per_class.items():
        for label, cls in enumerate(BEAN_CLASSES):
            for i in range(n):
                name = f"{cls}_{split}.{i}.jpg"
                _image(root / split / cls / name, label, zlib.crc32(name.encode()))
    return root


def write_brain_mri(root: Path, per_class: int = 10) -> Path:
    """The Kaggle zip's wrapper folders around ``brain_glioma/ brain_menin/ brain_tumor/``."""
    folder = root / "Brain_Cancer raw MRI data" / "Brain_Cancer"
    for label, cls in enumerate(MRI_CLASSES):
        for i in range(per_class):
            _image(folder / cls / f"{cls}_{i + 1:04d}.jpg", label, i, mode="L")
    (folder / "README.txt").write_text("not an image")
    return root


# (kind, tumour-type code, folder name) of the 8 BreaKHis tumour types.
BREAKHIS_TYPES = [("B", "A", "adenosis"), ("B", "F", "fibroadenoma"),
                  ("B", "PT", "phyllodes_tumor"), ("B", "TA", "tubular_adenoma"),
                  ("M", "DC", "ductal_carcinoma"), ("M", "LC", "lobular_carcinoma"),
                  ("M", "MC", "mucinous_carcinoma"), ("M", "PC", "papillary_carcinoma")]


def write_breakhis(root: Path, patients_per_type: int = 3, images_per_mag: int = 1,
                   mags: tuple[str, ...] = ("40", "100", "200", "400")) -> Path:
    """``BreaKHis_v1/histology_slides/breast/<kind>/SOB/<type>/SOB_<K>_<T>_<yy>-<slide>/<mag>X/``."""
    breast = root / "BreaKHis_v1" / "histology_slides" / "breast"
    for t, (kind, code, folder) in enumerate(BREAKHIS_TYPES):
        kind_dir = breast / ("benign" if kind == "B" else "malignant") / "SOB" / folder
        for p in range(patients_per_type):
            slide = f"{10000 + 100 * t + p}{'AB' if p % 2 else ''}"
            slide_dir = kind_dir / f"SOB_{kind}_{code}_14-{slide}"
            for mag in mags:
                for seq in range(1, images_per_mag + 1):
                    name = f"SOB_{kind}_{code}-14-{slide}-{mag}-{seq:03d}.png"
                    _image(slide_dir / f"{mag}X" / name, t, zlib.crc32(name.encode()))
    (breast / "benign" / "SOB" / "Thumbs.db").write_bytes(b"\0")
    return root


def write_chestxray14(root: Path, patients: int = 24, per_patient: int = 2,
                      layout: str = "flat") -> Path:
    """``Data_Entry_2017.csv`` + split lists + PNGs in ``images/`` (flat) or ``images_00X/images/``
    (split). Labels cycle through 'No Finding', single and ``|``-joined findings."""
    rows, names = [], []
    for pid in range(1, patients + 1):
        for follow in range(per_patient):
            name = f"{pid:08d}_{follow:03d}.png"
            k = (pid * 7 + follow) % 5
            findings = ("No Finding" if k == 0 else
                        "|".join(CHEST_LABELS[(pid + j) % 14] for j in range(k % 3 + 1)))
            rows.append([name, findings, follow, pid, 40 + pid % 30, "MF"[pid % 2], "PA",
                         2500, 2048, 0.143, 0.143])
            names.append(name)
            folder = (root / "images" if layout == "flat"
                      else root / f"images_{1 + pid % 2:03d}" / "images")
            _image(folder / name, k, pid, mode="L")
    with open(root / "Data_Entry_2017.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                    "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
                    "OriginalImagePixelSpacing[x", "y]"])
        w.writerows(rows)
    # Official lists are patient-disjoint: the last quarter of the patients is the test set.
    cut = patients - patients // 4
    test = [n for n in names if int(n[:8]) > cut]
    (root / "train_val_list.txt").write_text("\n".join(n for n in names if n not in test) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    return root


def write_medmnist(root: Path, flag: str = "pathmnist", classes: int = 9, multilabel: bool = False,
                   rgb: bool = True, sizes: tuple[int, int, int] = (40, 12, 12)) -> Path:
    """``<root>/<flag>.npz`` with the MedMNIST keys and shapes."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes):
        shape = (n, 28, 28, 3) if rgb else (n, 28, 28)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.integers(0, 2, (n, classes), dtype=np.uint8) if multilabel
                                     else (np.arange(n) % classes).astype(np.uint8)[:, None])
    root.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(root / f"{flag}.npz", **arrays)
    return root


class Py2Pickler(pickle._Pickler):
    """Writes pickles as Python 2's cPickle did for the official CIFAR-10 files: byte strings as
    py2 ``str`` opcodes and numpy's globals under their old ``numpy.core`` names."""

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file) -> None:
        super().__init__(file, protocol=2)

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        head = (pickle.SHORT_BINSTRING + bytes([n]) if n < 256
                else pickle.BINSTRING + struct.pack("<i", n))
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[type] = save_global


def write_cifar10(root: Path, per_batch: int = 20) -> Path:
    """``cifar-10-batches-py/`` with 5 train pickles, ``test_batch`` and ``batches.meta``, written
    in the official archive's Python-2 pickle format (bytes keys and strings, uint8 arrays)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"batch_label": name.encode(), b"labels": [i % 10 for i in range(per_batch)],
                 b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            Py2Pickler(f).dump(entry)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        Py2Pickler(f).dump({b"label_names": names, b"num_cases_per_batch": per_batch,
                            b"num_vis": 3072})
    return root


# dataset name → writer; datasets that need no files (digits, synthetic) are absent.
WRITERS: dict[str, Callable[[Path], Path]] = {
    "beans": write_beans, "brain_mri": write_brain_mri, "breakhis": write_breakhis,
    "chestxray14": write_chestxray14, "medmnist": write_medmnist, "cifar10": write_cifar10,
}
