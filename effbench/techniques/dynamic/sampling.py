"""Selective-adaptive sampling of the training set (the dynamic-training study, CIFAR-10).

The training split is partitioned into ``A`` (α images, trained on every epoch) and ``B`` (the
rest). After each epoch ``n`` (1-based) the validation accuracy ``acc_n`` decides whether ``A`` is
resampled for the next epoch (the study's Figs. 4-7):

* ``base``: if the change ``Δ = acc_n - acc_{n-1}`` stalls: ``A ← α(1-β₀) of A  ∪  αβ₀ of B``
  (Eq. 1).
* ``adaptive`` (the variant): if ``Δ <= 0``: type-I resample as above from the current ``A``;
  else if ``Δ < δ``: type-II resample from the best set so far ``A*``:
  ``A ← α(1-β_n) of A*  ∪  αβ_n of (all - A*)`` with ``β_n = γⁿ·β₀`` (Eqs. 2-3, n = the epoch).

"Stalls" has two readings in the study (``trigger``): ``abs``, Fig. 5's pseudocode
``abs(currentAcc - priorAcc) < δ`` (a large drop is not a stall), and ``improvement``, the text's
"la mejora del desempeño es menor al umbral δ" (``Δ < δ``: every drop resamples). For the variant,
``abs`` keeps A after a drop of δ or more. ``None`` takes each scheme's own: ``abs`` for the base
scheme (its only formal statement), ``improvement`` for the variant (its text tests "no gain"
first).
δ is in accuracy units: δ = 0.01 is one percentage point.

``B`` is always the complement of the set being resampled (Fig. 7: ``setDifference(setTotal, ·)``),
so the new ``A`` has exactly α distinct images, ``round(α·β)`` of them new. ``A*`` is the set that
gave the highest validation accuracy so far. Nothing here iterates the full training set: the
sampler yields only ``A`` (sharded across DDP ranks), so epoch time scales with α.

Hand-written because no library implements this rule; the randomness is a ``torch.Generator``
seeded by the run's seed, identical on every rank, and saved in the checkpoint.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DistributedSampler

from effbench.errors import EffbenchError

KEEP, TYPE_I, TYPE_II = 0, 1, 2
TRIGGERS = ("abs", "improvement")
DEFAULT_TRIGGER = {"base": "abs", "adaptive": "improvement"}


@dataclass(frozen=True)
class Decision:
    """What to do after an epoch: ``kind`` (KEEP / TYPE_I / TYPE_II) and the β to use."""

    kind: int
    beta: float = 0.0


NO_RESAMPLE = Decision(KEEP)


def stalled(s: SubsetSchedule, change: float) -> bool:
    """The resampling test: ``|Δ| < δ`` (trigger=abs) or ``Δ < δ`` (trigger=improvement)."""
    return (abs(change) if s.trigger == "abs" else change) < s.delta


def base_rule(s: SubsetSchedule, acc: float, prior: float, n: int) -> Decision:
    """Fig. 4-a: resample from the current A when the accuracy stalls (``stalled``)."""
    return Decision(TYPE_I, s.beta0) if stalled(s, acc - prior) else NO_RESAMPLE


def adaptive_rule(s: SubsetSchedule, acc: float, prior: float, n: int) -> Decision:
    """Fig. 4-b: no gain → type I from A; a gain below δ → type II from A* with β = γⁿβ₀.
    With trigger=abs a drop of δ or more is not a stall: A is kept."""
    if not stalled(s, acc - prior):
        return NO_RESAMPLE
    if acc <= prior:
        return Decision(TYPE_I, s.beta_at(n) if s.decay_all else s.beta0)
    if acc - prior < s.delta:
        return Decision(TYPE_II, s.beta_at(n))
    return NO_RESAMPLE


RULES: dict[str, Callable[[SubsetSchedule, float, float, int], Decision]] = {
    "base": base_rule,
    "adaptive": adaptive_rule,
}


def resolve_alpha(alpha: float | int, n_total: int) -> int:
    """α as given (a fraction ≤ 1 of the training split, or a whole count > 1) → a count."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise EffbenchError(f"invalid value strategy.dynamic.alpha={alpha!r}: use a fraction in "
                            "(0, 1] "
                            "such as 0.5, or a number of images such as 25000.")
    if alpha <= 1:
        return max(1, round(alpha * n_total))
    if alpha != int(alpha) or alpha > n_total:
        raise EffbenchError(f"invalid value strategy.dynamic.alpha={alpha!r}: a count must be a "
                            "whole "
                            f"number of images ≤ the training split's {n_total}, or use a "
                            "fraction ≤ 1.")
    return int(alpha)


def _checksum(indices: torch.Tensor) -> int:
    """A short fingerprint of a set (for the per-epoch history and resume checks)."""
    return zlib.crc32(indices.to(torch.int64).numpy().tobytes())


class SubsetSchedule:
    """Owns A, A*, β and the decision rule; ``step(acc)`` after every epoch."""

    def __init__(self, n_total: int, alpha: int, beta: float, delta: float, gamma: float,
                 variant: str = "base", resample: bool = True, decay_all: bool = False,
                 seed: int = 0, trigger: str | None = None) -> None:
        _check(variant, beta, delta, gamma, trigger)
        self.n_total, self.alpha, self.variant = int(n_total), int(alpha), variant
        self.trigger = trigger or DEFAULT_TRIGGER[variant]
        self.beta0, self.delta, self.gamma = float(beta), float(delta), float(gamma)
        self.resample, self.decay_all = bool(resample), bool(decay_all)
        # Resampling is a no-op when A is the whole split (alpha=1.0: the full-set control).
        self.active = self.resample and self.alpha < self.n_total
        if self.active and round(self.alpha * self.beta0) > self.n_total - self.alpha:
            raise EffbenchError(
                f"strategy.dynamic.alpha={self.alpha} with strategy.dynamic.beta={self.beta0} "
                "would draw "
                f"{round(self.alpha * self.beta0)} new images but only {self.n_total - self.alpha} "
                "are outside A; lower strategy.dynamic.beta or strategy.dynamic.alpha.")
        self.generator = torch.Generator().manual_seed(int(seed))
        self.subset = self._draw(torch.arange(self.n_total), self.alpha)
        self.best_subset = self.subset.clone()
        self.best_acc: float | None = None
        self.prior_acc: float | None = None
        self.seen = torch.zeros(self.n_total, dtype=torch.bool)
        self.epoch = 0  # the 1-based epoch n of the last decision (0: none yet)
        self.history: list[dict[str, Any]] = []

    # -- the rule -------------------------------------------------------------------------------
    def beta_at(self, n: int) -> float:
        """β in force at epoch n: γⁿ·β₀ for the variant (Eq. 3), β₀ for the base scheme."""
        return self.gamma ** n * self.beta0 if self.variant == "adaptive" else self.beta0

    def complement(self, subset: torch.Tensor) -> torch.Tensor:
        """B for ``subset``: every training index not in it (sorted)."""
        mask = torch.ones(self.n_total, dtype=torch.bool)
        mask[subset] = False
        return mask.nonzero().flatten()

    def step(self, acc: float, n: int | None = None) -> dict[str, Any]:
        """Record epoch n's accuracy (A was its training set), then maybe resample A.

        ``n`` is the 1-based epoch (default: the one after the last decision); epochs without a
        validation run simply have no decision.
        """
        self.epoch = n = self.epoch + 1 if n is None else int(n)
        trained = self.subset
        self.seen[trained] = True
        if self.best_acc is None or acc > self.best_acc:
            self.best_acc, self.best_subset = acc, trained.clone()
        decision = NO_RESAMPLE
        if self.active and self.prior_acc is not None:
            decision = RULES[self.variant](self, acc, self.prior_acc, n)
        replaced = 0
        if decision.kind != KEEP:
            source = self.best_subset if decision.kind == TYPE_II else trained
            self.subset, replaced = self.resample_from(source, decision.beta)
        change = None if self.prior_acc is None else float(acc - self.prior_acc)
        self.prior_acc = acc
        # beta: the β this epoch's resample used (β₀ for type I unless decay_all, γⁿβ₀ for type
        # II), 0 when A is kept — not γⁿβ₀ on every epoch, which type I does not use.
        record = {"epoch": n, "acc": float(acc), "change": change, "subset_size": len(trained),
                  "resampled": int(decision.kind != KEEP), "type": decision.kind,
                  "beta": decision.beta if decision.kind != KEEP else 0.0, "replaced": replaced,
                  "seen": int(self.seen.sum()), "checksum": _checksum(trained)}
        self.history.append(record)
        return record

    def resample_from(self, source: torch.Tensor, beta: float) -> tuple[torch.Tensor, int]:
        """Eq. 1/2: α(1-β) random images of ``source`` ∪ αβ random images outside it."""
        new = round(self.alpha * beta)
        kept = self._draw(source, self.alpha - new)
        fresh = self._draw(self.complement(source), new)
        return torch.cat([kept, fresh]).sort().values, new

    def _draw(self, pool: torch.Tensor, k: int) -> torch.Tensor:
        return pool[torch.randperm(len(pool), generator=self.generator)[:k]].sort().values

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # Tensors and plain Python values only: loads under torch.load(weights_only=True).
        return {"subset": self.subset.clone(), "best_subset": self.best_subset.clone(),
                "best_acc": self.best_acc, "prior_acc": self.prior_acc,
                "seen": self.seen.clone(), "epoch": self.epoch,
                "generator": self.generator.get_state(),
                "history": [dict(r) for r in self.history],
                "config": {"n_total": self.n_total, "alpha": self.alpha, "beta": self.beta0,
                           "variant": self.variant, "trigger": self.trigger}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()["config"]
        # A checkpoint from before the trigger option ran its scheme's own reading.
        theirs = {"trigger": DEFAULT_TRIGGER.get(state["config"].get("variant"), "abs"),
                  **state["config"]}
        if theirs != mine:
            raise EffbenchError(f"the checkpoint's dynamic schedule {state['config']} does not "
                                f"match this run's {mine}; resume with the same "
                                "strategy.dynamic.alpha, strategy.dynamic.beta, "
                                "strategy.dynamic.variant, strategy.dynamic.trigger and dataset.")
        self.subset, self.best_subset = state["subset"].clone(), state["best_subset"].clone()
        self.best_acc, self.prior_acc = state["best_acc"], state["prior_acc"]
        self.seen, self.epoch = state["seen"].clone(), int(state["epoch"])
        self.generator.set_state(state["generator"])
        self.history = [dict(r) for r in state["history"]]

    def summary(self) -> dict[str, Any]:
        h = self.history
        return {"subset_size": self.alpha, "train_size": self.n_total, "trigger": self.trigger,
                "resamples": sum(r["resampled"] for r in h),
                "resamples_type1": sum(r["type"] == TYPE_I for r in h),
                "resamples_type2": sum(r["type"] == TYPE_II for r in h),
                "seen_images": int(self.seen.sum()),
                "seen_fraction": float(self.seen.float().mean()),
                "best_subset_acc": self.best_acc, "history": [dict(r) for r in h]}


def _check(variant: str, beta: float, delta: float, gamma: float,
           trigger: str | None = None) -> None:
    if variant not in RULES:
        raise EffbenchError(f"invalid value strategy.dynamic.variant={variant!r}: use one of "
                            f"{', '.join(RULES)}.")
    if trigger is not None and trigger not in TRIGGERS:
        raise EffbenchError(f"invalid value strategy.dynamic.trigger={trigger!r}: use abs "
                            "(|Δacc| < δ, the study's pseudocode), improvement (Δacc < δ, its "
                            "text) or null (the scheme's own: abs for base, improvement for "
                            "adaptive).")
    if not 0 <= beta <= 1:
        raise EffbenchError(f"invalid value strategy.dynamic.beta={beta!r}: use a fraction in [0, "
                            "1] "
                            "such as 0.7.")
    if delta < 0:
        raise EffbenchError(f"invalid value strategy.dynamic.delta={delta!r}: use 0 or a positive "
                            "accuracy change such as 0.01.")
    if not 0 < gamma <= 1:
        raise EffbenchError(f"invalid value strategy.dynamic.gamma={gamma!r}: use a decay in (0, "
                            "1] "
                            "such as 0.97.")


class SubsetSampler(DistributedSampler):
    """Yields this rank's shard of a fresh permutation of the current A every epoch.

    Subclassing ``DistributedSampler`` tells Lightning the sampler already shards, so with
    ``use_distributed_sampler`` it is kept as is (val/test loaders still get Lightning's
    ``DistributedSampler``). ``DistributedSampler.__init__`` is not called on purpose: it needs a
    dataset and an initialised process group, while the rank is only known at ``setup``.
    """

    def __init__(self, schedule: SubsetSchedule, seed: int = 0) -> None:
        self.schedule, self.seed, self.epoch = schedule, int(seed), 0
        self.num_replicas, self.rank, self.shuffle, self.drop_last = 1, 0, True, False

    def shard(self, num_replicas: int, rank: int) -> None:
        self.num_replicas, self.rank = int(num_replicas), int(rank)

    @property
    def num_samples(self) -> int:
        return math.ceil(len(self.schedule.subset) / self.num_replicas)

    @property
    def total_size(self) -> int:
        return self.num_samples * self.num_replicas

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        subset = self.schedule.subset
        # Seeded by (seed, epoch) like DistributedSampler: the same order on every rank and
        # after a resume; ranks then take interleaved shards (padded by wrapping, as torch does).
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = subset[torch.randperm(len(subset), generator=gen)]
        if self.total_size > len(order):
            order = order.repeat(math.ceil(self.total_size / len(order)))[: self.total_size]
        return iter(order[self.rank:self.total_size:self.num_replicas].tolist())


class DynamicSampling(Callback):
    """Drives :class:`SubsetSchedule` from Lightning: decides after validation (before the
    checkpoint of that epoch is written, so a resume continues the same schedule), logs the
    decision at the end of the training epoch (``dynamic/*`` columns in CSV and TensorBoard)."""

    def __init__(self, schedule: SubsetSchedule, metric: str = "val/acc", seed: int = 0) -> None:
        self.schedule, self.metric = schedule, metric
        self.sampler = SubsetSampler(schedule, seed)
        self._pending: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.sampler.shard(trainer.world_size, trainer.global_rank)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # ModelCheckpoint is always ordered last, so this runs before the epoch's checkpoint.
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        n = trainer.current_epoch + 1  # the study's 1-based epoch number
        if self.schedule.epoch >= n:  # already decided for this epoch (e.g. a second val run)
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            raise EffbenchError(f"strategy.dynamic.metric={self.metric!r} was not logged; use one "
                                "of "
                                f"{', '.join(sorted(trainer.callback_metrics))}.")
        # Rank 0's value everywhere: every rank takes the same decision with the same generator.
        acc = trainer.strategy.broadcast(float(value), src=0)
        self._pending = self.schedule.step(acc, n)
        if trainer.world_size > 1:
            self._check_ranks_agree(trainer)

    def _check_ranks_agree(self, trainer: pl.Trainer) -> None:
        """One small collective per epoch that proves every rank shards the same A."""
        mine = torch.tensor(_checksum(self.schedule.subset), device=trainer.strategy.root_device)
        every = trainer.strategy.all_gather(mine)
        if not bool((every == mine).all()):
            raise RuntimeError(f"DDP ranks disagree on the dynamic subset A: {every.tolist()}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record, self._pending = self._pending, None
        if record is None:
            return
        for key in ("subset_size", "resampled", "type", "beta", "replaced", "seen"):
            pl_module.log(f"dynamic/{key}", float(record[key]), on_step=False, on_epoch=True)

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state_dict)
