"""``summary.json``: the stable, documented record of one run (schema below, written atomically)."""

from __future__ import annotations

import io
import json
import math
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from effbench.rundir import write_bytes_atomic

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
        "status": {"enum": ["completed", "failed", "diverged", "running", "interrupted"]},
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
        "objective": {"type": "object", "required": ["metric", "value"]},
        "resumed_from": _str,
        "headline": _str,
        # status diverged: where the loss stopped being a number (system.Diverged)
        "diverged": {"type": "object", "required": ["epoch", "metric"]},
        "non_finite": {"type": "object", "required": ["paths"]},
        # <run>/predictions.npz (effbench.predictions): file, sha256, rows, test_ids_sha256.
        "predictions": {"type": "object"},
    },
}


def write_json_atomic(path: Path, data: dict) -> None:
    """Temp file in the same folder, fsync, rename, folder fsync: readers never see half a file
    (effbench.rundir.write_bytes_atomic). Strict JSON: a NaN or infinite number (a diverged
    loss) is written as null and its place listed under ``non_finite``, since ``NaN`` is not JSON
    and other readers (jq, JavaScript, jsonschema) refuse the whole file."""
    clean, where = finite(data)
    if where and isinstance(clean, dict):
        clean["non_finite"] = {"paths": where, "note": "NaN or infinite values, written as null"}
    text = json.dumps(clean, indent=2, sort_keys=False, allow_nan=False, default=str)
    write_bytes_atomic(Path(path), text.encode())


def finite(value: Any, path: str = "") -> tuple[Any, list[str]]:
    """``value`` with every NaN / ±inf replaced by None (tensors and numpy numbers as plain
    lists and numbers), and the dotted paths of what was replaced."""
    if isinstance(value, torch.Tensor) or (hasattr(value, "tolist") and hasattr(value, "dtype")):
        value = value.tolist()  # a tensor, a numpy array or scalar
    if isinstance(value, Path):
        return str(value), []
    if isinstance(value, float):
        return (value, []) if math.isfinite(value) else (None, [path or "."])
    if isinstance(value, dict):
        out, where = {}, []
        for k, v in value.items():
            out[k], bad = finite(v, f"{path}.{k}" if path else str(k))
            where += bad
        return out, where
    if isinstance(value, (list, tuple)):
        items = [finite(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return [v for v, _ in items], [w for _, bad in items for w in bad]
    return value, []


def git_commit(cwd: str | Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str, cwd: str | Path,
                load_at_start: tuple[float, ...] | None = None) -> dict[str, Any]:
    """Versions, and what makes timings comparable: threads, CPU, load, GPU driver/clocks."""
    import pytorch_lightning
    import torchvision

    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "torchvision": torchvision.__version__, "lightning": pytorch_lightning.__version__,
            "cuda": torch.version.cuda, "device": device, "platform": platform.platform(),
            "hostname": platform.node(), "git_commit": git_commit(cwd),
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "cpu_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "load_avg_start": list(load_at_start) if load_at_start else None,
            "gpu": gpu_facts()}


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def gpu_facts() -> list[dict[str, Any]] | None:
    """Driver and clocks of each GPU (nvidia-smi), None on a machine without one."""
    if not torch.cuda.is_available():
        return None
    query = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return [{"name": torch.cuda.get_device_name(i)} for i in range(torch.cuda.device_count())]
    keys = query.split(",")
    return [dict(zip(keys, (v.strip() for v in line.split(","))))
            for line in out.stdout.strip().splitlines()]


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
