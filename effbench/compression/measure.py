"""Size and latency measurements shared by ``prune``, ``qat`` and ``scripts/bench_compression.py``.

The dense size is ``effbench.summary.state_dict_bytes`` (``torch.save`` of the state dict, what
``summary["model"]["size_bytes"]`` records). A pruned model only gets smaller on disk once it is
compressed, so ``zipped_state_dict_bytes`` deflates the same bytes, as TensorFlow's pruning guide
(the CheXNet study's tool) measures it: zeros compress away, the remaining fp32 values barely do.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable

import torch
from torch import nn
from torch.utils import benchmark

ZLIB_LEVEL = 6  # zlib's default: the deflate a `.zip`/`gzip` of the checkpoint would get


def _saved(module: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getvalue()


def zipped_state_dict_bytes(module: nn.Module) -> int:
    """Size of the deflated ``torch.save(module.state_dict())``."""
    return len(zlib.compress(_saved(module), ZLIB_LEVEL))


def module_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes held in the module's state dict, by dtype (e.g. ``{"float32": ..., "int8": ...}``)."""
    out: dict[str, int] = {}
    for t in module.state_dict().values():
        if isinstance(t, torch.Tensor):
            key = str(t.dtype).removeprefix("torch.")
            out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out


def cpu_latency_ms(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   min_run_time: float = 1.0) -> float:
    """Median wall time of ``fn(x)`` in ms under ``no_grad`` (``torch.utils.benchmark``: warm-up,
    thread settings and repeats handled by the library)."""
    with torch.no_grad():
        fn(x)  # warm-up: first-call allocations, oneDNN primitive creation
        timer = benchmark.Timer(stmt="fn(x)", globals={"fn": fn, "x": x},
                                num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3
