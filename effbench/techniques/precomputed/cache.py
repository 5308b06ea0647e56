"""The content-addressed feature cache shared by every job of a sweep.

An entry is one file ``<cache_dir>/features/<key>.pt`` holding ``{"payload": {...}, "digest": ...}``
where ``digest`` is a SHA-256 over every tensor and value of the payload. The key is a SHA-256 of
everything that determines the content (see :func:`feature_keys`), so a changed input gives a new
key instead of a stale hit, and two jobs that would compute the same thing share one file.

Writes are atomic (temp file in the same folder, fsync, ``os.replace``); a file that cannot be
read, is truncated or whose digest does not match is reported and rebuilt; concurrent jobs (e.g.
Hydra's joblib launcher) serialise on a per-entry-group ``filelock`` so only one computes while the
others wait and then load. Files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import nn

from effbench.rundir import publish

log = logging.getLogger(__name__)

# Bump when extraction or BN adaptation changes what they produce: old entries stop matching.
EXTRACTOR_VERSION = "2"  # 2: adaptation reads a seeded shuffle, entries record their cost


def _update(h: Any, value: Any) -> None:
    """Feed ``value`` (nested dicts/lists of tensors and JSON-able values) into hash ``h``."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(f"K{k}".encode())
            _update(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for v in value:
            _update(h, v)
    else:
        h.update(json.dumps(value, default=str).encode())


def digest(value: Any) -> str:
    """SHA-256 (hex) of nested tensors / JSON-able values."""
    h = hashlib.sha256()
    _update(h, value)
    return h.hexdigest()


def module_digest(module: nn.Module) -> str:
    """Content address of a module's weights and buffers: covers imagenet, random init (the
    seed) and weight files alike, without trusting names or paths."""
    return digest(dict(module.state_dict()))


@dataclass(frozen=True)
class FeatureKeys:
    """The BN-adaptation entry and one features entry per split."""

    bn: str
    splits: dict[str, str]
    parts: dict[str, Any]


def feature_keys(data_key: dict, labels: dict[str, torch.Tensor], backbone: nn.Module,
                 bn_settings: dict[str, Any]) -> FeatureKeys:
    """Keys from: the dataset's ``cache_key`` (name, root, split, sizes, preprocessing), the
    labels of each split, the backbone (name, weights spec, feature size, digest of its weights
    before adaptation), the BN-adaptation settings and :data:`EXTRACTOR_VERSION`."""
    parts = {"version": EXTRACTOR_VERSION, "data": data_key,
             "labels": {s: digest(y) for s, y in labels.items()},
             "backbone": {"name": getattr(backbone, "name", type(backbone).__name__),
                          "weights": getattr(backbone, "weights", None),
                          "feature_dim": getattr(backbone, "feature_dim", None),
                          "digest": module_digest(backbone)},
             "bn_adapt": bn_settings}
    bn = digest({**parts, "entry": "bn"})[:32]
    splits = {s: digest({**parts, "entry": "features", "split": s})[:32] for s in labels}
    return FeatureKeys(bn, splits, parts)


class FeatureCache:
    """Files under ``<root>/features``: :meth:`load` / :meth:`store` payload dicts by key."""

    def __init__(self, root: str | os.PathLike, folder: str = "features") -> None:
        self.dir = Path(root).expanduser() / folder

    def index(self) -> FeatureCache:
        """The decode-free index (``lookup``): small entries in a sub-folder."""
        return FeatureCache(self.dir, "index")

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.pt"

    def lock(self, key: str) -> FileLock:
        """An inter-process lock for entries computed together (BN state + split features)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.dir / f"{key}.lock"))

    def load(self, key: str) -> dict[str, Any] | None:
        """The payload stored under ``key``; None when absent, unreadable or corrupt."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - truncated/corrupt zips raise many error types
            log.warning("feature cache file %s is unreadable (%s); rebuilding it", path,
                        type(err).__name__)
            return None
        if (not isinstance(entry, dict) or not isinstance(entry.get("payload"), dict)
                or entry.get("digest") != digest(entry["payload"])):
            log.warning("feature cache file %s fails its checksum; rebuilding it", path)
            return None
        return entry["payload"]

    def store(self, key: str, payload: dict[str, Any]) -> Path:
        """Write atomically: readers see the old file, nothing, or the complete new one."""
        path = self.path(key)
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"payload": payload, "digest": digest(payload)}, f)
            publish(tmp, path)  # the user's umask instead of mkstemp's 0600, fsync, rename
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path
