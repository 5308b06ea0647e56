"""NIH ChestX-ray14: 112,120 frontal X-rays of 30,805 patients, 14 pathology labels.

On disk under ``root``: ``Data_Entry_2017.csv`` (columns ``Image Index, Finding Labels, Follow-up #,
Patient ID, …``; labels joined by ``|``, ``No Finding`` for none), the official
``train_val_list.txt`` / ``test_list.txt`` and the PNGs in ``images/`` or in the split
``images_001/images/ … images_012/images/`` layout. Multilabel (``No Finding`` = all zeros,
trained with the class-weighted BCE of CheXNet); ``labels`` keeps a subset, and a single kept label
becomes a binary task (e.g. ``[Pneumonia]``, the original CheXNet). The validation split is carved
from train_val by patient, so no patient is in two splits; lists that share a patient are refused.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from effbench.data.base import missing_data_error
from effbench.data.files import FileList, FileListDataModule, group_split
from effbench.errors import EffbenchError
from effbench.task import is_multilabel, task_of

log = logging.getLogger(__name__)

LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
          "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
          "Pleural_Thickening", "Hernia")
NO_FINDING = "No Finding"
CSV_NAMES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
LISTS = {"train_val": "train_val_list.txt", "test": "test_list.txt"}
LAYOUT = ("Data_Entry_2017.csv, train_val_list.txt, test_list.txt and the PNGs in images/ "
          "(or images_001/images/ … images_012/images/)")
WHERE = "https://nihcc.app.box.com/v/ChestXray-NIHCC"


def image_index(root: Path) -> dict[str, Path]:
    """``{file name: path}`` over ``images/``, every ``images_XXX/images/`` and ``images_XXX/``."""
    folders = [root / "images", *sorted(root.glob("images_*/images")),
               *sorted(p for p in root.glob("images_*") if p.is_dir())]
    found: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            with os.scandir(folder) as it:  # scandir: 112k entries without a stat per file
                found.update({e.name: Path(e.path) for e in it if e.name.endswith(".png")})
    return found


def check_patient_split(train_val: list[str], test: list[str]) -> None:
    """The study's split is by patient (the official lists are patient-disjoint): a patient whose
    X-rays sit on both sides would be tested on images of someone the model trained on."""
    shared = sorted(set(train_val) & set(test))
    if shared:
        raise EffbenchError(f"{len(shared)} patient(s) (e.g. Patient ID {shared[0]}) appear in "
                            f"both {LISTS['train_val']} and {LISTS['test']}; the split must be by "
                            "patient, so use the official lists or move each patient's images to "
                            "one of them.")


class ChestXray14DataModule(FileListDataModule):
    def __init__(self, labels: list[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("test_ratio", 0.0)
        super().__init__(**kwargs)
        keep = list(labels) if labels else list(LABELS)
        unknown = [x for x in keep if x not in LABELS]
        if unknown:
            raise EffbenchError(f"unknown dataset.labels entry {unknown[0]!r}: use names from "
                                f"{', '.join(LABELS)}.")
        self.keep = keep
        # One kept label → a 2-class task (CheXNet's pneumonia detector); 2+ → multilabel.
        self.task = task_of(len(keep) > 1)

    def options(self) -> dict[str, Any]:
        return {"labels": self.keep}

    def _read_csv(self) -> list[dict[str, str]]:
        path = next((self.root_path / n for n in CSV_NAMES if (self.root_path / n).is_file()),
                    None)
        if path is None:
            raise missing_data_error(self.name, self.root, LAYOUT, WHERE)
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        missing = [c for c in COLUMNS if rows and c not in rows[0]]
        if not rows or missing:
            raise EffbenchError(f"{path} lacks the columns {', '.join(missing or COLUMNS)}; use "
                                "the official Data_Entry_2017.csv.")
        return rows

    def _read_list(self, key: str) -> list[str]:
        path = self.root_path / LISTS[key]
        if not path.is_file():
            raise missing_data_error(self.name, self.root, LAYOUT, WHERE)
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]

    def _label_vector(self, findings: str) -> list[float]:
        names = [x.strip() for x in findings.split("|") if x.strip() and x.strip() != NO_FINDING]
        unknown = [x for x in names if x not in LABELS]
        if unknown:
            raise EffbenchError(f"unknown finding {unknown[0]!r} in Data_Entry_2017.csv; use the "
                                "official file (labels: " + ", ".join(LABELS) + ").")
        return [1.0 if x in names else 0.0 for x in self.keep]

    def list_files(self) -> dict[str, FileList]:
        rows = {r["Image Index"]: r for r in self._read_csv()}
        images = image_index(self.root_path)
        if not images:
            raise missing_data_error(self.name, self.root, LAYOUT, WHERE)
        split_lists = {k: self._read_list(k) for k in LISTS}
        absent = sum(n not in images or n not in rows for names in split_lists.values()
                     for n in names)
        if absent:
            log.warning("chestxray14: %d images of the split lists are missing on disk or in the "
                        "CSV and are skipped", absent)
        full = {k: self._file_list([n for n in names if n in images and n in rows], rows, images)
                for k, names in split_lists.items()}
        self.class_names = ([f"No {self.keep[0]}", self.keep[0]] if not is_multilabel(self.task)
                            else list(self.keep))
        tv = full["train_val"]
        check_patient_split(tv.groups, full["test"].groups)
        any_finding = (tv.labels.view(len(tv), -1).sum(1) > 0).long().numpy()
        idx = group_split(any_finding, np.array(tv.groups), self.val_ratio, 0.0, self.split_seed)
        return {"train": tv.take(idx["train"]), "val": tv.take(idx["val"]), "test": full["test"]}

    def _file_list(self, names: list[str], rows: dict[str, dict], images: dict[str, Path]
                   ) -> FileList:
        vectors = torch.tensor([self._label_vector(rows[n]["Finding Labels"]) for n in names],
                               dtype=torch.float32).view(len(names), len(self.keep))
        labels = vectors[:, 0].long() if not is_multilabel(self.task) else vectors
        return FileList([images[n] for n in names], labels,
                        [rows[n]["Patient ID"].strip() for n in names])
