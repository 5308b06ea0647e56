"""The decode-free index of the feature cache: find a job's cached entries from its config alone.

The content keys of :func:`.cache.feature_keys` need the decoded labels and the
built backbone's weights, so computing them costs what a cache hit should save. The job that
computes (or first meets) an entry therefore also writes an index entry under a *lookup key* that
is cheap to compute before anything is built, and that still changes whenever the content would:

- the dataset's options (``cfg.dataset`` resolved, minus options that cannot change a pixel:
  loader workers, pinned memory, memory budget, eval batch size, image-cache folder) and a
  fingerprint of its source files: path, size and modification time of every file under
  ``dataset.root`` (or of the bundled file, e.g. scikit-learn's digits), as the image cache keys
  its arrays (``effbench.data.files``);
- the backbone's options (``cfg.backbone`` minus its ``head``, which precomputed replaces) and its
  weights: the seed for random initialisation (``run()`` seeds, then builds the backbone first),
  the library versions for ``imagenet``, path + size + modification time for a weights file;
- the BN-adaptation settings, :data:`.cache.EXTRACTOR_VERSION`, the versions of
  torch / torchvision / timm and the size + modification time of the code that makes the pixels
  and the features (``effbench/data``, ``effbench/backbones``, extraction and BN adaptation):
  an edited file misses instead of trusting an entry made by other code.

Size + modification time stand in for content (hashing every image would be the decode the index
avoids); anything that cannot be fingerprinted this way (a missing root) gives no lookup key, and
the job takes the ordinary path, whose content keys are exact.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from effbench.techniques.precomputed.cache import EXTRACTOR_VERSION, digest

# Dataset options that change how images are served, never which pixels the backbone sees.
SERVING_ONLY = ("num_workers", "pin_memory", "memory_budget_gb", "eval_batch_size", "cache_dir")
_PACKAGE = Path(__file__).resolve().parents[2]  # effbench/
# The code between a file on disk and a feature vector.
_HERE = Path(__file__).resolve().parent.relative_to(_PACKAGE)
CODE = ("data", "backbones", *(str(_HERE / f) for f in ("extract.py", "bn_adapt.py", "cache.py",
                                                         "lookup.py")))


def _stat(path: Path, rel_to: Path | None = None) -> list[Any]:
    st = path.stat()
    return [str(path.relative_to(rel_to) if rel_to else path), st.st_size, st.st_mtime_ns]


def files_fingerprint(paths: list[Path]) -> list[Any] | None:
    """``[path, size, mtime]`` of each file, and of every file under each folder (sorted walk);
    None when a path does not exist."""
    out: list[Any] = []
    for path in paths:
        path = Path(path).expanduser().resolve()
        if path.is_file():
            out.append(_stat(path))
        elif path.is_dir():
            for folder, dirs, files in os.walk(path):
                dirs.sort()
                out.extend(_stat(Path(folder) / f, path) for f in sorted(files))
            out.append(str(path))
        else:
            return None
    return out


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__}
    for pkg in ("torchvision", "timm"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def code_fingerprint() -> list[Any]:
    paths = [_PACKAGE / p for p in CODE]
    return files_fingerprint(paths) or []


def weights_part(weights: Any, seed: int) -> dict[str, Any] | None:
    """What fixes the backbone's initial weights (None: a weights file that is not there)."""
    spec = None if weights is None or str(weights).strip().lower() in ("", "null", "none") \
        else str(weights)
    if spec is None:
        return {"random_init_seed": int(seed)}
    if spec.lower() == "imagenet":
        return {"imagenet": True}  # the library versions (in the key) fix the published weights
    files = files_fingerprint([Path(spec)])
    return {"file": files} if files else None


def lookup_parts(cfg: DictConfig, dataset_files: list[Path], dataset_class: type,
                 bn_settings: dict[str, Any]) -> dict[str, Any] | None:
    """Everything the lookup key is made of; None when some part cannot be fingerprinted."""
    data = OmegaConf.to_container(cfg.dataset, resolve=True)
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    assert isinstance(data, dict) and isinstance(backbone, dict)
    for key in SERVING_ONLY:
        data.pop(key, None)
    backbone.pop("head", None)
    files = files_fingerprint([*dataset_files, Path(inspect.getfile(dataset_class))])
    weights = weights_part(backbone.get("weights"), int(cfg.seed))
    if files is None or weights is None:
        return None
    return {"version": EXTRACTOR_VERSION, "dataset": data, "files": files, "backbone": backbone,
            "weights": weights, "bn_adapt": bn_settings, "versions": _versions(),
            "code": code_fingerprint()}


def lookup_key(parts: dict[str, Any]) -> str:
    return digest({**parts, "entry": "index"})[:32]
