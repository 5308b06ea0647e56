"""``summary.json``: the stable, documented record of one run (schema below, written atomically)."""

from __future__ import annotations

import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

SCHEMA_VERSION = 1
_num = {"type": ["number", "null"]}
_str = {"type": ["string", "null"]}

# JSON Schema of summary.json. Stable: fields are only ever added. See docs/summary.md.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["schema_version", "status", "error", "run_dir", "choices", "overrides", "metrics",
                 "per_class", "best_val", "epochs", "time_s", "throughput_img_s", "energy",
                 "peak_mem_mb", "model", "data", "hardware", "env", "strategy"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "status": {"enum": ["completed", "failed"]},
        "error": _str,
        "run_dir": {"type": "string"},
        "choices": {"type": "object",
                    "required": ["strategy", "backbone", "dataset", "hardware", "seed"]},
        "overrides": {"type": "array", "items": {"type": "string"}},
        "metrics": {"type": "object", "additionalProperties": _num},
        "per_class": {"type": "object"},
        "best_val": {"type": "object"},
        "epochs": {"type": ["integer", "null"]},
        "time_s": {"type": "object", "required": ["total"], "additionalProperties": _num},
        "throughput_img_s": _num,
        "energy": {"type": "object", "required": ["kwh", "co2_kg"]},
        "peak_mem_mb": _num,
        "model": {"type": "object", "required": ["params_total", "params_trainable", "size_bytes"]},
        "data": {"type": "object"},
        "hardware": {"type": "object"},
        "env": {"type": "object", "required": ["python", "torch", "torchvision", "lightning",
                                               "device", "git_commit"]},
        "strategy": {"type": "object"},
    },
}


def write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=_jsonable)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonable(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def git_commit(cwd: str | Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str, cwd: str | Path) -> dict[str, Any]:
    import pytorch_lightning
    import torchvision

    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "torchvision": torchvision.__version__, "lightning": pytorch_lightning.__version__,
            "cuda": torch.version.cuda, "device": device, "platform": platform.platform(),
            "hostname": platform.node(), "git_commit": git_commit(cwd)}


def peak_memory_mb(accelerator: str) -> float:
    """Peak GPU memory allocated (GPU runs) or the process's peak resident set (CPU runs)."""
    if accelerator == "gpu" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def state_dict_bytes(module: torch.nn.Module) -> int:
    """Size of ``torch.save(module.state_dict())`` — what the model costs on disk."""
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell()


def model_stats(module: torch.nn.Module) -> dict[str, int]:
    params = list(module.parameters())
    return {"params_total": sum(p.numel() for p in params),
            "params_trainable": sum(p.numel() for p in params if p.requires_grad),
            "size_bytes": state_dict_bytes(module)}
