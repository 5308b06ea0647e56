"""``<run>/predictions.npz``: the test-set predictions of every completed run, for paired tests.

One numpy ``.npz`` archive without pickled objects (read it with
``np.load(path, allow_pickle=False)``), one row per test sample in the order of the test split:

- ``ids``: str ``(N,)``, a stable id per sample: its file path relative to ``dataset.root`` for
  datasets of image files, its position in the test split (``"0"``, ``"1"``, …) for datasets held
  in memory (digits, synthetic, MedMNIST, CIFAR-10);
- ``labels``: int64 ``(N,)`` class indices, or ``(N, C)`` 0/1 for multilabel data;
- ``probs``: float32 ``(N, C)``, the tested model's softmax (multiclass) or per-label sigmoid
  (multilabel);
- ``int8_probs``: float32 ``(N, C)``, only where a technique converted the model to int8: the
  int8 model's, on the same samples;
- ``class_names``: str ``(C,)``; ``task``: str; ``test_ids_sha256``: str (below).

The summary records it under ``predictions``: ``file``, ``sha256`` (of the file), ``rows``,
``arrays`` and ``test_ids_sha256``, a SHA-256 of the ordered ids and labels — for in-memory
datasets, whose ids are positions, also of the options that define the split (dataset, split
seed, ratios, sample cap, generator options) — so two runs can be checked to have been tested on
the same images in the same order before their predictions are paired.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from effbench.rundir import write_bytes_atomic

if TYPE_CHECKING:
    import torch
# No torch at import: effbench-compare reads these files and stays light.

FILE = "predictions.npz"


def from_logits(logits: torch.Tensor, labels: torch.Tensor, task: str) -> dict[str, torch.Tensor]:
    """The ``test_predictions`` of a system: probabilities and labels on the CPU."""
    from effbench.metrics import probabilities

    return {"probs": probabilities(logits.detach().float(), task).cpu(),
            "labels": labels.detach().cpu()}


def sample_ids(dm: Any, split: str = "test") -> list[str]:
    """Ids of a split's samples: relative file paths where the datamodule knows the files
    (``sample_ids`` set by the file datasets, or image-file datasets reached through subsets),
    else positions."""
    known = (getattr(dm, "sample_ids", None) or {}).get(split)
    if known is not None:
        return [str(i) for i in known]
    paths = _paths(dm.datasets.get(split)) if getattr(dm, "datasets", None) else None
    if paths is not None:
        root = Path(str(dm.root)).expanduser() if getattr(dm, "root", None) else None
        return [relative_id(p, root) for p in paths]
    return [str(i) for i in range(len(dm.labels[split]))]


def relative_id(path: str | os.PathLike, root: Path | None) -> str:
    """The path relative to the dataset root (POSIX separators), the path itself outside it."""
    p = Path(path)
    if root is not None:
        try:
            return p.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            pass
    return p.as_posix()


def _paths(ds: Any) -> list[Path] | None:
    if hasattr(ds, "indices") and hasattr(ds, "dataset"):  # a torch Subset
        inner = _paths(ds.dataset)
        return [inner[i] for i in ds.indices] if inner is not None else None
    paths = getattr(ds, "paths", None)
    return list(paths) if isinstance(paths, list) else None


def by_position(dm: Any) -> bool:
    """Whether the ids are positions (no file names known): then the split's options count."""
    ids = sample_ids(dm)
    return ids == [str(i) for i in range(len(ids))]


def split_identity(dm: Any) -> dict[str, Any]:
    """What defines an in-memory test split: the datamodule's cache key without the
    preprocessing (a resized copy of the same images is the same test set)."""
    key = dict(dm.cache_key)
    key.pop("preprocessing", None)
    return key


def ids_fingerprint(ids: list[str], labels: np.ndarray, identity: dict[str, Any] | None) -> str:
    h = hashlib.sha256()
    h.update("\n".join(ids).encode())
    h.update(np.ascontiguousarray(labels.astype(np.int64)).tobytes())
    if identity is not None:
        h.update(json.dumps(identity, sort_keys=True, default=str).encode())
    return h.hexdigest()


def write(run_dir: Path, system: Any, dm: Any) -> dict[str, Any]:
    """Write ``predictions.npz`` (atomically) from ``system.test_predictions``; the summary's
    record, or ``{"error": why}`` — a run's results never fail for want of this file."""
    preds = getattr(system, "test_predictions", None)
    if not preds:
        return {"error": "the test step recorded no predictions"}
    try:
        return _write(Path(run_dir), preds, dm)
    except Exception as err:  # noqa: BLE001 - recorded in the summary, the run's results stay
        return {"error": f"{type(err).__name__}: {err}"}


def _write(run_dir: Path, preds: dict[str, torch.Tensor], dm: Any) -> dict[str, Any]:
    split_labels = dm.labels["test"].numpy()
    # The first n of the split: fewer with trainer.limit_test_batches; rows past the split are
    # the distributed sampler's padding (repeats of the first samples).
    n = min(len(preds["probs"]), len(split_labels))
    probs = preds["probs"][:n].float().numpy()
    labels_int = preds["labels"][:n].numpy().astype(np.int64)
    ids = sample_ids(dm)[:n]
    if not np.array_equal(labels_int, split_labels[:n].astype(np.int64)):
        return {"error": "the tested labels are not the test split's in its order, so the "
                         "predictions cannot be given sample ids"}
    fingerprint = ids_fingerprint(ids, labels_int, split_identity(dm) if by_position(dm)
                                  else None)
    arrays = {"ids": np.array(ids, dtype=str), "labels": labels_int,
              "probs": probs.astype(np.float32),
              "class_names": np.array(list(dm.class_names), dtype=str),
              "task": np.array(str(dm.task)), "test_ids_sha256": np.array(fingerprint)}
    if "int8_probs" in preds:
        arrays["int8_probs"] = preds["int8_probs"].float().numpy()[:n].astype(np.float32)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    data = buf.getvalue()
    write_bytes_atomic(run_dir / FILE, data)
    return {"file": FILE, "sha256": hashlib.sha256(data).hexdigest(), "rows": n,
            "test_split": int(len(split_labels)), "arrays": sorted(arrays),
            "test_ids_sha256": fingerprint}


@dataclass
class Predictions:
    """One run's ``predictions.npz`` as read back (:func:`read`)."""

    ids: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    task: str
    class_names: list[str]
    ids_sha256: str
    sha256: str
    int8_probs: np.ndarray | None = None


class PredictionsError(ValueError):
    """Why a run's predictions cannot be used (one clause, e.g. "it has no predictions.npz")."""


def read(run_dir: str | os.PathLike, expected_sha256: str | None = None) -> Predictions:
    """The run's predictions; :class:`PredictionsError` saying why not (missing file, a file
    that does not match the summary's sha256, an unreadable archive)."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        raise PredictionsError(f"{path.parent.name} has no {FILE} (a run from before effbench "
                               "kept predictions, or its test step did not run)")
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if expected_sha256 and sha != expected_sha256:
        raise PredictionsError(f"{path} does not match the sha256 its summary recorded")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return Predictions(ids=arrays["ids"], labels=arrays["labels"], probs=arrays["probs"],
                           task=str(arrays["task"]),
                           class_names=[str(c) for c in arrays["class_names"]],
                           ids_sha256=str(arrays["test_ids_sha256"]), sha256=sha,
                           int8_probs=arrays.get("int8_probs"))
    except (OSError, ValueError, KeyError) as err:
        raise PredictionsError(f"{path} is not a readable predictions file ({err})") from None


def max_abs_diff(run_dir: str | os.PathLike, probs: np.ndarray | None, int8: bool = False
                 ) -> dict[str, Any]:
    """``effbench-eval``: how far re-computed probabilities are from the stored ones (over the
    rows both have: the run may have tested fewer, with trainer.limit_test_batches)."""
    try:
        stored = read(run_dir)
    except PredictionsError as err:
        return {"error": str(err)}
    ref = stored.int8_probs if int8 and stored.int8_probs is not None else stored.probs
    if probs is None or probs.ndim != 2 or probs.shape[1] != ref.shape[1]:
        return {"error": "the re-computed probabilities do not have the stored ones' classes"}
    n = min(len(ref), len(probs))
    diff = float(np.abs(ref[:n] - probs[:n]).max()) if n else 0.0
    return {"max_abs_prob_diff": diff, "rows": n,
            "array": "int8_probs" if ref is stored.int8_probs else "probs"}
