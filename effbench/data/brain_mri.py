"""Brain Cancer - MRI dataset (Rahman, 2024): ~6,056 JPEGs in 3 class folders, no official split.

On disk: ``brain_glioma/ brain_menin/ brain_tumor/`` folders, either directly under ``root`` or
inside the download's wrapper folders (e.g. ``Brain_Cancer raw MRI data/Brain_Cancer/``). The split
is stratified and seeded by ``dataset.split_seed`` with ``val_ratio`` / ``test_ratio``, so every
strategy and seed of a comparison sees the same images.
"""

from __future__ import annotations

from pathlib import Path

import torch

from effbench.data.base import missing_data_error, split_indices
from effbench.data.files import FileList, FileListDataModule
from effbench.data.imagefolder import scan_classes

CLASSES = ("brain_glioma", "brain_menin", "brain_tumor")
LAYOUT = "brain_glioma/ brain_menin/ brain_tumor/ folders of JPEGs"
WHERE = ("Kaggle or Mendeley Data ('Brain Cancer - MRI dataset', Md Mizanur Rahman, 2024); "
         "unzip it under dataset.root")
SEARCH_DEPTH = 3


def find_class_root(root: Path, classes: tuple[str, ...], depth: int = SEARCH_DEPTH) -> Path | None:
    """The shallowest folder under ``root`` holding all ``classes`` as sub-folders."""
    level = [root] if root.is_dir() else []
    for _ in range(depth + 1):
        for folder in level:
            if all((folder / c).is_dir() for c in classes):
                return folder
        level = sorted(p for f in level for p in f.iterdir() if p.is_dir())
    return None


class BrainMRIDataModule(FileListDataModule):
    def list_files(self) -> dict[str, FileList]:
        folder = find_class_root(self.root_path, CLASSES)
        if folder is None:
            raise missing_data_error(self.name, self.root, LAYOUT, WHERE)
        found, _ = scan_classes(folder)
        self.class_names = list(CLASSES)
        paths = [p for c in CLASSES for p in found.get(c, [])]
        labels = torch.tensor([i for i, c in enumerate(CLASSES) for _ in found.get(c, [])],
                              dtype=torch.int64)
        if not paths:
            raise missing_data_error(self.name, self.root, LAYOUT + " (the folders are empty)",
                                     WHERE)
        idx = split_indices(labels.numpy(), self.val_ratio, self.test_ratio, self.split_seed)
        return {s: FileList(paths, labels).take(i) for s, i in idx.items()}
