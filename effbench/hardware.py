"""Turns a hardware preset (config) into Trainer arguments, checking that the devices exist."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from effbench.errors import EffbenchError

GPU_ACCELERATORS = ("gpu", "cuda")


def _wanted_devices(devices: Any) -> int | None:
    """How many devices a ``devices`` value asks for (None: whatever is there)."""
    if devices in (None, "auto", -1, "-1"):
        return None
    if isinstance(devices, (list, tuple)) or hasattr(devices, "__len__") and not isinstance(
            devices, str):
        return len(devices)
    try:
        return int(devices)
    except (TypeError, ValueError) as err:
        raise EffbenchError(f"trainer.devices={devices!r} is not a number of devices; use an "
                            "integer like 1 or 2, or auto.") from err


def resolve_accelerator(name: str, preset: str, wanted: int | None) -> str:
    """'auto' picks CUDA when present; an explicit GPU preset without GPUs is an error."""
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "auto":
        return "gpu" if found else "cpu"
    if name in GPU_ACCELERATORS and found < (wanted or 1):
        what = f"{found} CUDA GPU(s)" + (
            f" ({', '.join(torch.cuda.get_device_name(i) for i in range(found))})" if found else
            " (this machine is CPU-only)")
        raise EffbenchError(f"hardware={preset} needs {wanted or 1} CUDA GPU(s) but found {what}; "
                            "use hardware=cpu or hardware=auto, or fewer trainer.devices.")
    return "gpu" if name in GPU_ACCELERATORS else name


def resolve_precision(precision: str, accelerator: str) -> str:
    """'auto': bf16 mixed where the GPU supports it, else fp16 mixed; full fp32 on CPU."""
    if precision != "auto":
        return str(precision)
    if accelerator != "gpu":
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def trainer_kwargs(hardware: DictConfig, trainer: DictConfig) -> dict[str, Any]:
    """Trainer arguments for this machine; ``trainer.*`` values override the preset's."""
    wanted = _wanted_devices(trainer.devices)
    accelerator = resolve_accelerator(hardware.accelerator, hardware.name, wanted)
    if accelerator == "cpu" and wanted and wanted > 1 and trainer.strategy in ("auto", None):
        raise EffbenchError(f"trainer.devices={wanted} on CPU needs trainer.strategy=ddp "
                            "(gloo processes); add it or use trainer.devices=1.")
    return {
        "accelerator": accelerator,
        "devices": trainer.devices if trainer.devices not in (None,) else "auto",
        "strategy": trainer.strategy or "auto",
        "precision": resolve_precision(trainer.precision, accelerator),
    }


def device_name(accelerator: str) -> str:
    if accelerator == "gpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform

    return platform.processor() or platform.machine() or "cpu"
