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

One forward pass, whatever the number of passes: in train mode a BN layer normalises with the
*batch's* statistics, so its running statistics never feed back into the activations, and every
pass over the same batches (one fixed order: ``features.extract.train_batches`` reads the training
split in one seeded shuffle, never in file order; no augmentation; the rest of the network in
eval mode) sees exactly the same batch means and variances. One pass records them (momentum 1
for that pass: the running statistics then are the batch's, read by a forward hook), and the
passes are replayed as the
same update BatchNorm makes, ``r ← (1 − m)·r + m·batch``, on those numbers — the statistics
and the per-pass changes of real passes, up to float rounding, at the cost of one pass. A model
in which some BN layer does not run exactly once per batch (shared layers) takes real passes.
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
    forward_passes: int = 0  # passes actually run through the model (1 when replayed)

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
    """Adapt the BN statistics of ``model`` to ``batches()`` (normalised input batches, the same
    ones in the same order on every call) until the running means settle (see the module
    docstring); returns what happened."""
    layers = batchnorm_layers(model)
    if not layers:
        return BNAdaptResult(skipped="the backbone has no BatchNorm layers; nothing to adapt")
    was_training = model.training
    saved_momentum = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.train()
        if momentum is None:
            m.num_batches_tracked.zero_()  # cumulative average over the new domain only
    try:
        with torch.no_grad():
            recorded = _batch_statistics(model, layers, batches)
            if recorded is None:
                for m in layers:
                    m.momentum = momentum
                return _real_passes(model, layers, batches, threshold, max_passes, momentum)
            return _replayed_passes(layers, *recorded, threshold, max_passes, momentum)
    finally:
        for m, mom in zip(layers, saved_momentum):
            m.momentum = mom
        model.train(was_training)


def _batch_statistics(model: nn.Module, layers: list[_BatchNorm],
                      batches: Callable[[], Iterable[torch.Tensor]],
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """One train-mode pass: every layer's batch mean and (unbiased) variance per batch, as
    ``(means, variances)`` of shape (batches, all layers' channels), plus the running statistics
    before the pass (restored). None when a layer does not run exactly once per batch."""
    start_mean = torch.cat([m.running_mean.detach().clone() for m in layers])
    start_var = torch.cat([m.running_var.detach().clone() for m in layers])
    counts = [m.num_batches_tracked.clone() for m in layers]
    seen: dict[int, list[torch.Tensor]] = {}

    def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        seen.setdefault(id(module), []).extend([module.running_mean.detach().clone(),
                                                module.running_var.detach().clone()])

    hooks = [m.register_forward_hook(record) for m in layers]
    means, variances, ok = [], [], True
    try:
        for m in layers:
            m.momentum = 1.0  # running statistics := the batch's
        for x in batches():
            seen.clear()
            model(x)
            if any(len(seen.get(id(m), [])) != 2 for m in layers):
                ok = False
                break
            means.append(torch.cat([seen[id(m)][0] for m in layers]))
            variances.append(torch.cat([seen[id(m)][1] for m in layers]))
    finally:
        for h in hooks:
            h.remove()
        _assign(layers, start_mean, start_var)
        for m, c in zip(layers, counts):
            m.num_batches_tracked.copy_(c)
    if not ok or not means:
        return None
    return torch.stack(means), torch.stack(variances), start_mean, start_var


def _assign(layers: list[_BatchNorm], mean: torch.Tensor, var: torch.Tensor) -> None:
    start = 0
    for m in layers:
        n = m.running_mean.numel()
        m.running_mean.copy_(mean[start:start + n].view_as(m.running_mean))
        m.running_var.copy_(var[start:start + n].view_as(m.running_var))
        start += n


def _replayed_passes(layers: list[_BatchNorm], means: torch.Tensor, variances: torch.Tensor,
                     mean: torch.Tensor, var: torch.Tensor, threshold: float, max_passes: int,
                     momentum: float | None) -> BNAdaptResult:
    """Passes over the recorded batch statistics, as BatchNorm's own update makes them."""
    result = BNAdaptResult(forward_passes=1)
    count = int(layers[0].num_batches_tracked)
    before = mean.clone()
    while result.passes < max_passes:
        for batch_mean, batch_var in zip(means, variances):
            count += 1
            factor = 1.0 / count if momentum is None else momentum
            mean = (1 - factor) * mean + factor * batch_mean
            var = (1 - factor) * var + factor * batch_var
        result.passes += 1
        result.changes.append(relative_change(mean, before))
        before = mean
        if momentum is None or result.changes[-1] < threshold:
            result.converged = True  # cumulative average: exact after one pass
            break
    _assign(layers, mean, var)
    for m in layers:
        m.num_batches_tracked.add_(result.passes * len(means))
    return result


def _real_passes(model: nn.Module, layers: list[_BatchNorm],
                 batches: Callable[[], Iterable[torch.Tensor]], threshold: float,
                 max_passes: int, momentum: float | None) -> BNAdaptResult:
    result = BNAdaptResult()
    before = _means(layers)
    while result.passes < max_passes:
        for x in batches():
            model(x)
        result.passes += 1
        result.forward_passes += 1
        after = _means(layers)
        result.changes.append(relative_change(after, before))
        before = after
        if momentum is None or result.changes[-1] < threshold:
            result.converged = True  # cumulative average: exact after one pass
            break
    return result
