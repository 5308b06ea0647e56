"""BreaKHis v1: 7,909 breast-tumour histology PNGs of 82 patients at 4 magnifications.

On disk: ``BreaKHis_v1/histology_slides/breast/{benign,malignant}/SOB/<tumour type>/<slide>/
<40X|100X|200X|400X>/SOB_<B|M>_<type>-<yy>-<slide id>-<mag>-<seq>.png``. Labels, patient and
magnification are parsed from the file names (the folder names are not needed). ``label``:
``binary`` (benign / malignant) or ``subtype`` (the 8 tumour types); ``magnification``: ``all`` or
one or more of ``40X 100X 200X 400X``. The split is by patient (slide), stratified by label, so no
patient's images appear in two splits.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from effbench.data.base import missing_data_error
from effbench.data.files import FileList, FileListDataModule, group_split
from effbench.errors import EffbenchError

FILE_RE = re.compile(r"^SOB_(?P<kind>[BM])_(?P<type>A|F|PT|TA|DC|LC|MC|PC)-(?P<year>\d+)-"
                     r"(?P<slide>[^-]+)-(?P<mag>\d+)-(?P<seq>\d+)\.png$", re.IGNORECASE)
TUMOUR_TYPES = {"A": "adenosis", "F": "fibroadenoma", "PT": "phyllodes_tumor",
                "TA": "tubular_adenoma", "DC": "ductal_carcinoma", "LC": "lobular_carcinoma",
                "MC": "mucinous_carcinoma", "PC": "papillary_carcinoma"}
KINDS = {"B": "benign", "M": "malignant"}
MAGNIFICATIONS = ("40X", "100X", "200X", "400X")
# label mode → (class names, file-name match → class name)
LABELS: dict[str, tuple[list[str], Callable[[re.Match], str]]] = {
    "binary": (list(KINDS.values()), lambda m: KINDS[m["kind"].upper()]),
    "subtype": (list(TUMOUR_TYPES.values()), lambda m: TUMOUR_TYPES[m["type"].upper()]),
}
LAYOUT = ("BreaKHis_v1/histology_slides/breast/{benign,malignant}/SOB/<tumour type>/<slide>/"
          "<40X|100X|200X|400X>/SOB_<B|M>_<type>-<yy>-<slide id>-<mag>-<seq>.png")
WHERE = "https://web.inf.ufpr.br/vri/databases/breast-cancer-histopathological-database-breakhis/"
TREE = ("BreaKHis_v1/histology_slides/breast", "histology_slides/breast", "breast", ".")


class BreakHisDataModule(FileListDataModule):
    def __init__(self, label: str = "binary", magnification: str | list[str] = "all",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if label not in LABELS:
            raise EffbenchError(f"unknown dataset.label={label!r}: use {' or '.join(LABELS)}.")
        self.label = label
        self.magnifications = self._magnifications(magnification)

    @staticmethod
    def _magnifications(value: str | list[str]) -> list[str]:
        values = [value] if isinstance(value, (str, int)) else list(value)
        if [str(v).lower() for v in values] == ["all"]:
            return list(MAGNIFICATIONS)
        mags = [str(v).upper().rstrip("X") + "X" for v in values]
        bad = [v for v, m in zip(values, mags) if m not in MAGNIFICATIONS]
        if bad:
            raise EffbenchError(f"unknown dataset.magnification={bad[0]!r}: use all or one or "
                                f"more of {', '.join(MAGNIFICATIONS)}.")
        return mags

    def options(self) -> dict[str, Any]:
        return {"label": self.label, "magnification": self.magnifications}

    def _breast_dir(self) -> Path:
        for rel in TREE:
            folder = self.root_path / rel
            if (folder / "benign").is_dir() and (folder / "malignant").is_dir():
                return folder
        raise missing_data_error(self.name, self.root, LAYOUT, WHERE)

    def parse(self) -> tuple[list[Path], list[str], list[str]]:
        """(paths, class names, patient ids) of the images at the chosen magnifications."""
        names, to_class = LABELS[self.label]
        paths, classes, patients = [], [], []
        for path in sorted(self._breast_dir().rglob("*.png")):
            m = FILE_RE.match(path.name)
            if m is None or f"{int(m['mag'])}X" not in self.magnifications:
                continue
            paths.append(path)
            classes.append(to_class(m))
            patients.append(f"{m['year']}-{m['slide']}")
        if not paths:
            raise missing_data_error(self.name, self.root, LAYOUT + f" at magnification "
                                     f"{'/'.join(self.magnifications)}", WHERE)
        return paths, classes, patients

    def list_files(self) -> dict[str, FileList]:
        paths, classes, patients = self.parse()
        self.class_names = list(LABELS[self.label][0])
        index = {c: i for i, c in enumerate(self.class_names)}
        labels = np.array([index[c] for c in classes], dtype=np.int64)
        files = FileList(paths, torch.from_numpy(labels), patients)
        idx = group_split(labels, np.array(patients), self.val_ratio, self.test_ratio,
                          self.split_seed)
        return {s: files.take(i) for s, i in idx.items()}
