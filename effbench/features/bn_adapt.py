"""BatchNorm adaptation: forward passes in train mode without gradients until the stats settle.

Only the BatchNorm layers are put in train mode (the rest of the backbone stays in eval mode, so
dropout or stochastic depth do not disturb the statistics). After every pass over the training
images the running means of all BN layers are compared with those before the pass:

    change = ‖μ_after − μ_before‖₂ / ‖μ_before‖₂      (all layers' means concatenated)

and adaptation stops at the first pass with ``change < threshold`` or after ``max_passes``.

A number ``momentum`` is the usual EMA factor (the default, 0.1): every pass moves the statistics
towards the new domain's by a shrinking amount, so the threshold decides how many passes run.
``momentum=None`` uses PyTorch's cumulative average (counters reset first): one pass gives the
exact average over the new domain's batches, and a second pass over the same batches cannot change
it (it only repeated the first, ~1e-7 relative change) — so it stops after one pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass
class BNAdaptResult:
    """What adaptation did: passes run, the relative change after each, and whether it settled."""

    passes: int = 0
    changes: list[float] = field(default_factory=list)
    converged: bool = False
    skipped: str | None = None  # the reason when nothing was adapted

    def as_dict(self) -> dict:
        # JSON has no infinity: the first change from all-zero (fresh) statistics is recorded null.
        d = asdict(self)
        d["changes"] = [c if math.isfinite(c) else None for c in self.changes]
        return d


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """BN layers that keep running statistics (the ones adaptation can move)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The BN buffers (running mean/var, batch counters): all that adaptation changes."""
    names = {id(m) for m in batchnorm_layers(model)}
    return {f"{mod_name}.{buf_name}": buf.detach().cpu().clone()
            for mod_name, mod in model.named_modules() if id(mod) in names
            for buf_name, buf in mod.named_buffers(recurse=False) if buf is not None}


def _means(layers: list[_BatchNorm]) -> torch.Tensor:
    return torch.cat([m.running_mean.detach().float().flatten() for m in layers])


def relative_change(after: torch.Tensor, before: torch.Tensor) -> float:
    """‖after − before‖ / ‖before‖ (infinite when ``before`` is all zeros, e.g. fresh BN layers)."""
    denom = before.norm()
    diff = (after - before).norm()
    if denom == 0:
        return 0.0 if diff == 0 else float("inf")
    return float(diff / denom)


def adapt_batchnorm(model: nn.Module, batches: Callable[[], Iterable[torch.Tensor]],
                    threshold: float, max_passes: int,
                    momentum: float | None = None) -> BNAdaptResult:
    """Run ``batches()`` (a fresh iterable of normalised input batches per pass) through ``model``
    until the running means settle (see the module docstring); returns what happened."""
    layers = batchnorm_layers(model)
    if not layers:
        return BNAdaptResult(skipped="the backbone has no BatchNorm layers; nothing to adapt")
    was_training = model.training
    saved_momentum = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.train()
        m.momentum = momentum
        if momentum is None:
            m.num_batches_tracked.zero_()  # cumulative average over the new domain only
    result = BNAdaptResult()
    before = _means(layers)
    try:
        with torch.no_grad():
            while result.passes < max_passes:
                for x in batches():
                    model(x)
                result.passes += 1
                after = _means(layers)
                result.changes.append(relative_change(after, before))
                before = after
                if momentum is None or result.changes[-1] < threshold:
                    result.converged = True  # cumulative average: exact after one pass
                    break
    finally:
        for m, mom in zip(layers, saved_momentum):
            m.momentum = mom
        model.train(was_training)
    return result
