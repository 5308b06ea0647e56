"""Turns a hardware preset (config) into Trainer arguments, checking that the devices exist."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from effbench import schema
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


def plan_precision(requested: str, accelerator: str, required: str | None, explicit: bool,
                   who: str) -> str:
    """The precision that will run. A technique that needs one (fake quantization in fp32)
    gets it instead of the preset's; a user's explicit other choice is refused, not ignored."""
    resolved = resolve_precision(requested, accelerator)
    if required is None or resolved == required:
        return resolved
    if explicit:
        raise EffbenchError(f"{who} trains in {required} precision, so trainer.precision="
                            f"{requested} cannot take effect; remove trainer.precision=… .")
    return required


def trainer_kwargs(hardware: DictConfig, trainer: DictConfig, required_precision: str | None = None,
                   explicit_precision: bool = False, who: str = "this strategy") -> dict[str, Any]:
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
        "precision": plan_precision(str(trainer.precision), accelerator, required_precision,
                                    explicit_precision, who),
    }


@dataclass(frozen=True)
class HardwarePlan:
    """Everything about the machine a run uses, resolved once before anything is built; the
    techniques, the system and the Trainer read it instead of patching configs at run time."""

    accelerator: str
    devices: Any
    strategy: str
    precision: str
    num_nodes: int
    world_size: int
    torch_device: torch.device
    channels_last: bool
    lr_scale: float
    cpu_threads: int
    # In-memory uint8 images moved to the GPU once, up to this share of its memory (0: never;
    # effbench.resident), instead of a host-to-device copy of every batch.
    data_on_device_share: float = 0.0
    # hardware.compile: the torch.compile mode the backbone and the head run in (in place,
    # nn.Module.compile: state_dict keys unchanged), or None: eager.
    compile_mode: str | None = None

    def trainer_args(self) -> dict[str, Any]:
        return {"accelerator": self.accelerator, "devices": self.devices,
                "strategy": self.strategy, "precision": self.precision}


def world_size(accelerator: str, devices: Any, num_nodes: int) -> int:
    """Processes of the run: devices per node (``auto``: every GPU, or one CPU process) × nodes."""
    wanted = _wanted_devices(devices)
    if wanted is None:
        wanted = torch.cuda.device_count() if accelerator == "gpu" else 1
    return max(1, wanted) * max(1, num_nodes)


def resolve_plan(hardware: DictConfig, trainer: DictConfig, required_precision: str | None = None,
                 explicit_precision: bool = False, who: str = "this strategy") -> HardwarePlan:
    """The hardware plan: preset + trainer.* overrides + a technique's precision requirement."""
    args = trainer_kwargs(hardware, trainer, required_precision, explicit_precision, who)
    nodes = int(trainer.get("num_nodes") or 1)
    world = world_size(args["accelerator"], args["devices"], nodes)
    threads = apply_cpu_threads(hardware, args)
    gpu_probe_for(torch_device(args["accelerator"]))
    # hardware.lr_scaling=linear: lr × world size (the effective batch grows with it).
    scale = float(world) if hardware.lr_scaling == "linear" else 1.0
    return HardwarePlan(accelerator=args["accelerator"], devices=args["devices"],
                        strategy=args["strategy"], precision=args["precision"], num_nodes=nodes,
                        world_size=world, torch_device=torch_device(args["accelerator"]),
                        channels_last=bool(hardware.channels_last), lr_scale=scale,
                        cpu_threads=threads,
                        data_on_device_share=data_on_device_share(hardware, args["accelerator"]),
                        compile_mode=compile_mode(hardware))


# Lightning sets this on import (lightning_fabric/__init__.py) so that asking whether CUDA exists
# never initialises CUDA in a process that may later fork GPU workers.
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def gpu_probe_for(device: torch.device) -> None:
    """How torch answers "is there a GPU?" in this process: the CUDA runtime (asked once, cached)
    on a CPU plan, NVML (Lightning's choice) on any other.

    torch's Adam/AdamW ask on every optimizer step (``Optimizer._accelerator_graph_capture_health_
    check`` → ``torch.cuda.is_available``) and the NVML answer is not cached: a ``dlopen`` of
    libnvidia-ml per step (on a machine with GPUs, an ``nvmlInit`` as well). On the 2-core CPU that
    was 0.28 ms a step, 10 % of a cached-feature head's training (0.517 → 0.461 s). A CPU plan
    forks nothing that uses CUDA, so the reason for NVML does not apply to it."""
    if device.type == "cpu":
        os.environ.pop(NVML_CHECK, None)
    else:
        os.environ[NVML_CHECK] = "1"


def compile_mode(hardware: DictConfig) -> str | None:
    """``hardware.compile``: false → None (eager), true → torch.compile's ``default`` mode, or
    the mode named; anything else is refused (schema.py's field, the one list of choices)."""
    wanted = hardware.get("compile", False)
    field = schema.BY_KEY["hardware.compile"]
    if not field.ok(wanted):
        raise EffbenchError(f"invalid value hardware.compile={wanted!r}: {field.fix}.")
    if wanted is False:
        return None
    return "default" if wanted is True else str(wanted)


def data_on_device_share(hardware: DictConfig, accelerator: str) -> float:
    """``hardware.data_on_device``: ``auto`` keeps in-memory images on a GPU when they take at
    most a quarter of its memory, ``true`` up to 90 %, ``false`` never; always 0 on CPU."""
    wanted = hardware.get("data_on_device", "auto")
    shares = {"auto": 0.25, True: 0.9, False: 0.0}
    if wanted not in shares:
        raise EffbenchError(f"invalid value hardware.data_on_device={wanted!r}: use auto, true or "
                            "false.")
    return shares[wanted] if accelerator in ("gpu", "cuda") else 0.0


def apply_cpu_threads(hardware: DictConfig, plan: dict[str, Any]) -> int:
    """torch's intra-op threads for this process. ``auto``: the usable cores divided among the
    processes of this machine (DDP ranks on CPU), so ranks do not fight over the same cores —
    oversubscription made a 2-core run 5× slower. A number: exactly that many."""
    wanted = hardware.get("cpu_threads", "auto")
    if wanted in (None, "auto"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        ranks = _wanted_devices(plan.get("devices")) or 1 if plan["accelerator"] == "cpu" else 1
        threads = max(1, cores // max(1, ranks))
    elif isinstance(wanted, int) and not isinstance(wanted, bool) and wanted >= 1:
        threads = wanted
    else:
        raise EffbenchError(f"invalid value hardware.cpu_threads={wanted!r}: use auto or a "
                            "number of threads such as 2.")
    torch.set_num_threads(threads)
    return threads


def torch_device(accelerator: str) -> torch.device:
    """The torch device a Lightning accelerator name means (for loops outside the Trainer)."""
    return torch.device({"gpu": "cuda", "cuda": "cuda", "mps": "mps"}.get(accelerator, "cpu"))


def device_name(accelerator: str) -> str:
    if accelerator == "gpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform

    return platform.processor() or platform.machine() or "cpu"
