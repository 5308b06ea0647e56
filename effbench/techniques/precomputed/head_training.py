"""Training the head on cached features: tensor ops only, no images, no Lightning loop.

Why a hand-written loop instead of ``Trainer.fit``: one step of a small head on a feature batch
takes microseconds, so Lightning's per-step and per-epoch machinery (hooks, logging, callbacks)
would dominate the job and every job of a sweep would pay it. The loop below keeps the same
semantics as the finetune system — its optimiser and lr schedule (from
``ClassifierSystem.configure_optimizers``: ReduceLROnPlateau stepped once per epoch, a cosine after
every optimizer step), an unweighted ``val/loss`` with the same torchmetrics,
early stopping on ``val/loss`` and the best-val-loss weights kept for the test — and logs every
epoch to the run's CSV/TensorBoard loggers so learning curves exist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from effbench.errors import EffbenchError
from effbench.metrics import build_metrics, split_scalars
from effbench.recipe import PendingSchedule
from effbench.task import is_multilabel
from effbench.techniques.precomputed.ambiguity import ambiguity_weights

Split = tuple[torch.Tensor, torch.Tensor]


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Temporarily use ``n`` intra-op CPU threads (None: leave as is).

    A head step is a few small matmuls: on CPU, OpenMP's fork/join per op costs more than the
    work, and on a shared or oversubscribed machine a descheduled worker thread stalls every op
    (measured on a loaded 2-core box: 10 epochs of the MLP head on digits took 34 s with 2
    threads, 2.9 s with 1)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# What ``strategy.precomputed.head_threads: auto`` gives a head on a CPU: one thread. A head step
# is two small matmuls and a dozen element-wise ops on a 64 × 512 batch; a second OpenMP thread
# halves the matmuls, but every op then waits on its fork/join, and a descheduled worker stalls
# them all. Measured on the 2-core AMD EPYC, 10 epochs of the default MLP head on digits: quiet,
# 2 threads 0.376 s and 1 thread 0.443 s (medians of 12 interleaved pairs), so the default (null)
# keeps the hardware plan's threads; while another job used the cores, 2.15–2.89 s with 2 threads
# and 1.08 s with 1. A number sets it.
AUTO_HEAD_THREADS = 1


def head_threads(value: int | str | None) -> int | None:
    """The CPU threads ``strategy.precomputed.head_threads=value`` trains a head with (None:
    leave torch's); a sentence naming the value when it is none of auto, null or a count ≥ 1."""
    if value is None:
        return None
    if value == "auto":
        return AUTO_HEAD_THREADS
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise EffbenchError(f"invalid value strategy.precomputed.head_threads={value!r}: use null "
                        "(hardware.cpu_threads), a thread count such as 2, or auto (one thread "
                        "on a CPU).")


@dataclass
class HeadTraining:
    """How to train: epochs, batch size, ambiguity α, early-stopping patience, keep-best, seed."""

    epochs: int
    batch_size: int
    alpha: float = 0.0
    patience: int | None = None
    keep_best: bool = True
    seed: int = 0


@dataclass
class HeadResult:
    epochs: int = 0
    stopped_early: bool = False
    images: int = 0
    best: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


def _evaluate(head: nn.Module, loss_fn: nn.Module, data: Split, task: str, metrics,
              class_names: list[str], prefix: str) -> tuple[dict[str, float], dict]:
    x, y = data
    with torch.no_grad():
        logits = head(x)
    return scores(logits, y, loss_fn, task, metrics, class_names, prefix)


def scores(logits: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, task: str, metrics,
           class_names: list[str], prefix: str) -> tuple[dict[str, float], dict]:
    """Loss and torchmetrics of ``logits`` against ``y`` under ``prefix`` (metrics reset after)."""
    with torch.no_grad():
        loss = float(loss_fn(logits, y))
    metrics.update(logits.float(), y.long() if is_multilabel(task) else y)
    scalars, per_class = split_scalars(metrics.compute(), prefix, class_names)
    metrics.reset()
    return {**scalars, f"{prefix}/loss": loss}, per_class


@dataclass
class EpochState:
    """One head's bookkeeping across epochs: its result, best weights and patience count."""

    result: HeadResult = field(default_factory=HeadResult)
    best_state: dict[str, torch.Tensor] | None = None
    waited: int = 0

    def end_epoch(self, head: nn.Module, row: dict[str, float], cfg: HeadTraining,
                  sched: Any, log: Callable[[dict[str, float], int], None]) -> bool:
        """Log the epoch, keep the best-val-loss weights, step a plateau schedule; True when
        early stopping ends this head's training."""
        log(row, int(row["epoch"]))
        result = self.result
        result.history.append(row)
        monitor = row.get("val/loss", row["train/loss"])
        if not result.best or monitor < result.best.get("val/loss", result.best["train/loss"]):
            result.best, self.waited = row, 0
            if cfg.keep_best:
                self.best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        else:
            self.waited += 1
        if sched is not None:
            sched.step(monitor)
        if cfg.patience is not None and self.waited >= cfg.patience:
            result.stopped_early = True
            return True
        return False

    def finish(self, head: nn.Module) -> HeadResult:
        if self.best_state is not None:
            head.load_state_dict(self.best_state)
        head.eval()
        return self.result


def head_steps(n: int, batch_size: int) -> int:
    """Optimizer steps per epoch of the head loops on ``n`` vectors: every batch but a last one of
    a single vector, which they skip."""
    full, rest = divmod(n, batch_size)
    return full + (rest >= 2)


def bind_schedule(optimizers: dict | torch.optim.Optimizer, epochs: int, per_epoch: int,
                  ) -> dict | torch.optim.Optimizer:
    """``configure_optimizers``' answer for a head loop of ``epochs`` × ``per_epoch`` optimizer
    steps. A per-step schedule (cosine) is built for them here (recipe.PendingSchedule) and the
    optimizer's post-step hook steps it after every step, as Lightning steps ``interval: step``:
    every loop that steps the optimizer (train_head, batched.train_heads) steps it alike. Anything
    else (ReduceLROnPlateau, stepped by ``end_epoch``) is returned as it is."""
    if not isinstance(optimizers, dict) or not isinstance(optimizers["lr_scheduler"],
                                                           PendingSchedule):
        return optimizers
    opt = optimizers["optimizer"]
    sched = optimizers["lr_scheduler"].build(opt, (epochs * per_epoch, per_epoch))["scheduler"]
    opt.register_step_post_hook(lambda *_: sched.step())
    return opt


def split_optimizers(optimizers: dict | torch.optim.Optimizer,
                     ) -> tuple[torch.optim.Optimizer, Any]:
    """(optimizer, plateau scheduler or None) from ``configure_optimizers``' answer, once
    :func:`bind_schedule` has bound any per-step schedule to the optimizer."""
    if isinstance(optimizers, dict):
        entry = optimizers["lr_scheduler"]
        if isinstance(entry, PendingSchedule) or entry.get("interval", "epoch") != "epoch":
            raise ValueError("a per-step schedule must be bound first (bind_schedule); stepped "
                             "once per epoch it would follow the wrong curve")
        return optimizers["optimizer"], entry["scheduler"]
    return optimizers, None


def train_head(head: nn.Module, loss_fn: nn.Module, optimizers: dict | torch.optim.Optimizer,
               train: Split, val: Split, task: str, class_names: list[str], cfg: HeadTraining,
               log: Callable[[dict[str, float], int], None]) -> HeadResult:
    """Mini-batch training of ``head`` on ``train`` features (already on the device)."""
    x, y = train
    bound = bind_schedule(optimizers, cfg.epochs, head_steps(len(y), cfg.batch_size))
    opt, sched = split_optimizers(bound)
    metrics = build_metrics(task, len(class_names), per_class=False).to(train[0].device)
    gen = torch.Generator().manual_seed(cfg.seed)
    n, state = len(y), EpochState()
    for epoch in range(cfg.epochs):
        head.train()
        total, count = torch.zeros((), device=x.device), 0
        # The epoch's order gathered once; its batches are then views (one gather, not one per
        # step: the same vectors in the same order).
        perm = torch.randperm(n, generator=gen).to(x.device)
        for xb, yb in zip(x[perm].split(cfg.batch_size), y[perm].split(cfg.batch_size)):
            if len(yb) < 2:  # BatchNorm1d cannot train on a single sample
                continue
            logits = head(xb)
            w = ambiguity_weights(logits, task, cfg.alpha)
            loss = loss_fn(logits, yb, sample_weight=w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(yb)
            count += len(yb)
        state.result.images += count
        state.result.epochs = epoch + 1
        row = {"train/loss": float(total / max(count, 1)), "epoch": epoch}
        if len(val[1]):
            head.eval()
            scalars, _ = _evaluate(head, loss_fn, val, task, metrics, class_names, "val")
            row.update(scalars)
        if state.end_epoch(head, row, cfg, sched, log):
            break
    return state.finish(head)


def evaluate_head(head: nn.Module, loss_fn: nn.Module, test: Split, task: str,
              class_names: list[str]) -> dict:
    """Test metrics of ``head`` on cached test features, in ``ClassifierSystem.test_results``'
    form (``{"scalars": ..., "per_class": ...}``)."""
    metrics = build_metrics(task, len(class_names)).to(test[0].device)
    head.eval()
    scalars, per_class = _evaluate(head, loss_fn, test, task, metrics, class_names, "test")
    scalars.pop("test/loss")
    return {"scalars": scalars, "per_class": per_class}
