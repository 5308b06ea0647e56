"""Size and latency measurements shared by the techniques that compress a model and
``scripts/bench_compression.py``.

The dense size is ``effbench.summary.state_dict_bytes`` (``torch.save`` of the state dict, what
``summary["model"]["size_bytes"]`` records). A pruned model only gets smaller on disk once it is
compressed, so ``zipped_state_dict_bytes`` deflates the same bytes, as TensorFlow's pruning guide
(the CheXNet study's tool) measures it: zeros compress away, the remaining fp32 values barely do.
"""

from __future__ import annotations

import io
import statistics
import time
import zlib
from collections.abc import Callable

import torch
from torch import nn

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
                   min_run_time: float = 1.0, warmup: int = 3, min_calls: int = 5,
                   progress: str | None = None) -> float:
    """Median wall time of one ``fn(x)`` call in ms under ``no_grad``; ``progress``: the label of
    a progress bar over the measuring time (none if None).

    Hand-written rather than ``torch.utils.benchmark.Timer``: the median of single calls shrugs off
    the other processes of a shared machine, where Timer's block means absorbed their bursts.
    """
    from tqdm.auto import tqdm

    times: list[float] = []
    bar = tqdm(total=round(float(min_run_time), 2), desc=progress, disable=progress is None,
               leave=False, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s")
    with torch.no_grad(), bar:
        for _ in range(warmup):  # first-call allocations, oneDNN primitive creation
            fn(x)
        begin = time.perf_counter()
        deadline = begin + min_run_time
        while len(times) < min_calls or time.perf_counter() < deadline:
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
            bar.update(min(time.perf_counter() - begin, bar.total) - bar.n)
    return statistics.median(times) * 1e3
