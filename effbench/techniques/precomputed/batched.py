"""K heads trained together as one batched model over one pass of the cached features.

A linear-evaluation grid in the manner of DINOv2's (many classifiers on the same frozen features,
one data pass): every step gathers each head's own mini-batch, runs all heads with batched matmuls
(``torch.baddbmm``) and one BatchNorm call over the heads' channels side by side, sums the heads'
losses and back-propagates once. Each head keeps its own optimiser and plateau schedule (its job's
recipe: lr, weight decay), its own dropout rate and ambiguity weight, its own early stopping and
best-epoch weights — exactly what :func:`.head_training.train_head` does for one.

Why hand-written instead of ``torch.func.stack_module_state`` + ``vmap``: a batched job must give
the numbers of the sequential job with the same seed, so each head must draw its own shuffle and
dropout masks from its own seeded generator (the sequential job draws dropout from the global RNG
right after seeding it) and update its own BatchNorm running statistics. vmap's randomness modes
cannot reproduce per-head generator streams and it does not update unbatched running statistics in
place; stacking the heads' own parameters every step (``torch.stack`` keeps the gradient path to
each head's leaves) costs a few small copies and keeps each head's optimiser untouched.

Supported heads: ``linear`` and ``mlp`` (Linear → BatchNorm1d → ReLU → Dropout → Linear) of one
shape per group; :func:`not_batchable` says why anything else is not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from effbench.metrics import build_metrics
from effbench.techniques.precomputed.ambiguity import ambiguity_weights
from effbench.techniques.precomputed.cache import digest
from effbench.techniques.precomputed.head_training import (
    EpochState,
    HeadResult,
    HeadTraining,
    Split,
    scores,
    split_optimizers,
)
from effbench.techniques.precomputed.heads import HeadDropout, uniform_dropout

MLP = (nn.Linear, nn.BatchNorm1d, nn.ReLU, HeadDropout, nn.Linear)


@dataclass
class Pretrained:
    """A head trained in a batched group, waiting for its job (``hydra/launcher=batched_heads``):
    its best weights, its result, the rows to log and its share of the group."""

    state: dict[str, torch.Tensor]
    result: HeadResult
    rows: list[tuple[dict[str, float], int]]
    group: dict[str, Any]


# Heads trained ahead by the batched launcher, by :func:`job_key` of their job's config; a job
# takes (and removes) its own.
PRETRAINED: dict[str, Pretrained] = {}


def job_key(cfg: DictConfig) -> str:
    """A job's identity: its whole config as its task function receives it (unresolved)."""
    return digest(OmegaConf.to_yaml(cfg))


@dataclass
class HeadJob:
    """One head of the group: its module, loss, optimiser(s), training settings and logger."""

    head: nn.Module
    loss_fn: nn.Module
    optimizers: Any
    cfg: HeadTraining
    log: Callable[[dict[str, float], int], None]


def _kind(head: nn.Module) -> str | None:
    if isinstance(head, nn.Linear):
        return "linear"
    if isinstance(head, nn.Sequential) and tuple(type(m) for m in head) == MLP:
        return "mlp"
    return None


def _shapes(head: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in head.state_dict().values()]


def not_batchable(jobs: list[HeadJob]) -> str | None:
    """Why these heads cannot train as one batched model (None: they can)."""
    kinds = {_kind(j.head) for j in jobs}
    if None in kinds or len(kinds) > 1:
        return "the heads are not all linear or all mlp heads"
    if len({tuple(_shapes(j.head)) for j in jobs}) > 1:
        return "the heads differ in shape (strategy.precomputed.hidden)"
    if len({(j.cfg.epochs, j.cfg.batch_size) for j in jobs}) > 1:
        return "the heads differ in epochs or batch size"
    if kinds == {"mlp"} and len({(j.head[1].momentum, j.head[1].eps) for j in jobs}) > 1:
        return "the heads' BatchNorm settings differ"
    return None


def _linear(x: torch.Tensor, layers: list[nn.Linear]) -> torch.Tensor:
    """(A, B, in) → (A, B, out) through each head's own Linear (weights stacked per call). A
    batch all heads share, (B, in), goes through one matmul with the heads' weights side by side
    (heads with the same seed draw the same batches: the usual lr / dropout grid)."""
    if x.dim() == 2:
        weight = torch.cat([m.weight for m in layers])
        bias = torch.cat([m.bias for m in layers])
        out = torch.addmm(bias, x, weight.t())
        return out.view(len(x), len(layers), -1).transpose(0, 1)
    weight = torch.stack([m.weight for m in layers])
    bias = torch.stack([m.bias for m in layers])
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def _batchnorm(z: torch.Tensor, layers: list[nn.BatchNorm1d], training: bool) -> torch.Tensor:
    """Each head's BatchNorm1d on its own (B, H) slice, as one call over (B, A·H) channels; the
    running statistics are updated in the concatenation and copied back to each head."""
    a, b, h = z.shape
    flat = z.transpose(0, 1).reshape(b, a * h)
    mean = torch.cat([m.running_mean for m in layers])
    var = torch.cat([m.running_var for m in layers])
    momentum = layers[0].momentum
    if training:
        for m in layers:
            m.num_batches_tracked.add_(1)
        if momentum is None:  # cumulative average, as BatchNorm1d does
            momentum = 1.0 / float(layers[0].num_batches_tracked)
    out = F.batch_norm(flat, mean, var, torch.cat([m.weight for m in layers]),
                       torch.cat([m.bias for m in layers]), training, momentum or 0.0,
                       layers[0].eps)
    if training:
        for i, m in enumerate(layers):
            m.running_mean.copy_(mean[i * h:(i + 1) * h])
            m.running_var.copy_(var[i * h:(i + 1) * h])
    return out.reshape(b, a, h).transpose(0, 1)


def _dropout(z: torch.Tensor, rates: list[float], states: list[torch.Tensor]) -> torch.Tensor:
    """Each head's dropout (:func:`.heads.uniform_dropout`, as its ``HeadDropout``) drawn from its
    own RNG stream: the device's default generator is set to the head's state for its call and the
    advanced state kept, so the masks are those its sequential job draws (which seeds the global
    RNG, then draws only dropout from it)."""
    gen = default_generator(z.device)
    saved, out = gen.get_state(), []
    try:
        for i, (zi, p) in enumerate(zip(z, rates)):
            gen.set_state(states[i])
            out.append(uniform_dropout(zi, p))
            states[i] = gen.get_state()
    finally:
        gen.set_state(saved)
    return torch.stack(out)


def default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index or torch.cuda.current_device()]
    return torch.default_generator


def seeded_state(seed: int, device: torch.device) -> torch.Tensor:
    """The state of ``device``'s default generator right after ``torch.manual_seed(seed)``."""
    return torch.Generator(device=device).manual_seed(seed).get_state()


def forward(heads: list[nn.Module], x: torch.Tensor, training: bool,
            states: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Logits (A, B, C) of ``heads`` on their batches ``x``: (A, B, D), or (B, D) shared."""
    if _kind(heads[0]) == "linear":
        return _linear(x, heads)
    z = _linear(x, [h[0] for h in heads])
    z = F.relu(_batchnorm(z, [h[1] for h in heads], training))
    if training:
        assert states is not None
        z = _dropout(z, [float(h[3].p) for h in heads], states)
    return _linear(z, [h[4] for h in heads])


def train_heads(jobs: list[HeadJob], train: Split, val: Split, task: str,
                class_names: list[str], device: torch.device) -> list[HeadResult]:
    """Train every job's head together; each result equals its job's :func:`train_head`."""
    why = not_batchable(jobs)
    if why is not None:
        raise ValueError(f"cannot train these heads batched: {why}")
    x, y = train
    n, cfg0 = len(y), jobs[0].cfg
    metrics = build_metrics(task, len(class_names), per_class=False).to(device)  # val rows
    opts = [split_optimizers(j.optimizers) for j in jobs]
    # What the sequential job draws: its shuffle from a generator seeded with its seed, its
    # dropout from the global RNG right after torch.manual_seed(seed).
    perm_gens = [torch.Generator().manual_seed(j.cfg.seed) for j in jobs]
    drop_states = [seeded_state(j.cfg.seed, device) for j in jobs]
    states = [EpochState() for _ in jobs]
    active = list(range(len(jobs)))
    for epoch in range(cfg0.epochs):
        heads = [jobs[i].head for i in active]
        shared_seed = len({jobs[i].cfg.seed for i in active}) == 1
        for h in heads:
            h.train()
        batches = [torch.randperm(n, generator=perm_gens[i]).to(device).split(cfg0.batch_size)
                   for i in active]
        totals = [torch.zeros((), device=device) for _ in active]
        count = 0
        for step in range(len(batches[0])):
            idx = [b[step] for b in batches]
            if len(idx[0]) < 2:  # BatchNorm1d cannot train on a single sample
                continue
            shared = shared_seed or all(torch.equal(i, idx[0]) for i in idx[1:])
            inputs = x[idx[0]] if shared else torch.stack([x[i] for i in idx])
            rng = [drop_states[i] for i in active]
            logits = forward(heads, inputs, True, rng)
            for j, i in enumerate(active):
                drop_states[i] = rng[j]
            losses = []
            for j, i in enumerate(active):
                w = ambiguity_weights(logits[j], task, jobs[i].cfg.alpha)
                losses.append(jobs[i].loss_fn(logits[j], y[idx[j]], sample_weight=w))
            for i in active:
                opts[i][0].zero_grad(set_to_none=True)
            torch.stack(losses).sum().backward()  # heads are independent: each gets its own grad
            for j, i in enumerate(active):
                opts[i][0].step()
                totals[j] += losses[j].detach() * len(idx[j])
            count += len(idx[0])
        val_logits = None
        if len(val[1]):
            for h in heads:
                h.eval()
            with torch.no_grad():
                val_logits = forward(heads, val[0], False)
        still = []
        for j, i in enumerate(active):
            job, state = jobs[i], states[i]
            state.result.images += count
            state.result.epochs = epoch + 1
            row = {"train/loss": float(totals[j] / max(count, 1)), "epoch": epoch}
            if val_logits is not None:
                row.update(scores(val_logits[j], val[1], job.loss_fn, task, metrics,
                                  class_names, "val")[0])
            if not state.end_epoch(job.head, row, job.cfg, opts[i][1], job.log):
                still.append(i)
        active = still
        if not active:
            break
    return [state.finish(job.head) for state, job in zip(states, jobs)]
