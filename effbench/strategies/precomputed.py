"""``precomputed``: adapt BatchNorm, cache the backbone's features once, train a small head on them.

Phases (each timed in ``summary["time_s"]``):

1. ``bn_adapt`` — train-mode, no-grad passes over the training images until the running means
   of the BN layers change by less than ``bn_threshold`` between passes
   (``effbench.features.bn_adapt``);
2. ``extract`` — eval-mode features of train/val/test into the content-addressed cache under
   ``cache_dir`` (``effbench.features.cache``); a later job with the same key loads both the
   adapted BN statistics and the features and never runs the backbone;
3. ``train`` — the head (``mlp``: Linear → BatchNorm1d → ReLU → Dropout → Linear, or ``linear``)
   trained as tensor ops on the cached features with the ambiguity-weighted loss;
4. ``eval`` — the final model (adapted backbone + head) tested on the test images like any run
   (``eval_on=model``), or the head on the cached test features (``eval_on=features``).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from effbench.errors import EffbenchError
from effbench.features.bn_adapt import BNAdaptResult, adapt_batchnorm, bn_state
from effbench.features.cache import FeatureCache, FeatureKeys, feature_keys
from effbench.features.extract import extract_features, train_batches
from effbench.features.head_training import HeadTraining, cpu_threads, evaluate_head, train_head
from effbench.features.heads import build_head
from effbench.strategies.base import Technique
from effbench.summary import state_dict_bytes

if TYPE_CHECKING:
    from effbench.context import RunContext

log = logging.getLogger(__name__)

EVAL_ON = ("model", "features")


class Precomputed(Technique):
    """Frozen, BN-adapted backbone; features cached once per sweep; only the head trains."""

    # Features and head are fp32, whatever the preset's mixed precision.
    requires_precision = "32-true"
    # The head trains in its own loop (tensor ops on cached features): only these Trainer
    # arguments mean something here; any other one set is refused (validate.py).
    trainer_keys = frozenset({"max_epochs", "enable_progress_bar", "enable_model_summary",
                              "deterministic", "log_every_n_steps", "num_sanity_val_steps",
                              "limit_test_batches", "num_nodes"})

    name = "precomputed"
    order = 0
    acts_on = frozenset({"model", "loop"})
    replaces_loop = True

    def __init__(self, name: str = "precomputed", head: str = "mlp", hidden: int = 512,
                 dropout: float = 0.3, ambiguity_weight: float = 1.0, bn_adapt: bool = True,
                 bn_threshold: float = 0.01, bn_max_passes: int = 10,
                 bn_momentum: float | None = 0.1, head_batch_size: int | None = None,
                 eval_on: str = "model", head_threads: int | None = None,
                 ) -> None:
        super().__init__(name)
        # CPU threads for head training (null: torch's default). 1 helps on an oversubscribed
        # machine, where a descheduled OpenMP worker stalls every small op.
        self.head_threads = head_threads
        self.head, self.hidden, self.dropout = head, hidden, dropout
        self.ambiguity_weight, self.bn_adapt = ambiguity_weight, bn_adapt
        self.bn_threshold, self.bn_max_passes, self.bn_momentum = (bn_threshold, bn_max_passes,
                                                                   bn_momentum)
        self.head_batch_size, self.eval_on = head_batch_size, eval_on

    # -- hooks --------------------------------------------------------------------------------
    def configure_model(self, ctx: RunContext) -> None:
        self._check()
        backbone = ctx.system.backbone
        ctx.system.head = build_head(self.head, backbone.feature_dim, ctx.datamodule.num_classes,
                                     self.hidden, self.dropout)
        # The backbone never receives gradients: only the head's parameters count as trainable.
        backbone.requires_grad_(False)

    def fit(self, ctx: RunContext) -> None:
        device = ctx.plan.torch_device
        ctx.system.to(device)
        feats = self._adapt_and_extract(ctx, device)
        with ctx.phase("train"):
            self._train(ctx, feats, device)
        with ctx.phase("eval"):
            self._test(ctx, feats, device)

    def headline(self, summary: dict[str, Any]) -> str | None:
        s = self.facts(summary)
        bn = s.get("bn_adaptation") or {}
        return (f"cache {'hit' if s.get('cache_hit') else 'miss (features computed)'}   "
                f"BN passes {bn.get('passes', 'n/a')}   head trained on {s.get('train_images')} "
                "feature vectors")

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        head = ctx.system.head
        return {"model": {"head_params": sum(p.numel() for p in head.parameters()),
                          "head_size_bytes": state_dict_bytes(head)}}

    # -- phases -------------------------------------------------------------------------------
    def _check(self) -> None:
        if self.eval_on not in EVAL_ON:
            raise EffbenchError(f"invalid value strategy.precomputed.eval_on={self.eval_on!r}: use "
                                "one of "
                                f"{', '.join(EVAL_ON)}.")
        if not (isinstance(self.bn_threshold, (int, float)) and self.bn_threshold >= 0):
            raise EffbenchError("invalid value "
                                f"strategy.precomputed.bn_threshold={self.bn_threshold!r}: use "
                                "a relative change such as strategy.precomputed.bn_threshold=0.01.")
        if not (isinstance(self.bn_max_passes, int) and self.bn_max_passes >= 1):
            raise EffbenchError("invalid value "
                                f"strategy.precomputed.bn_max_passes={self.bn_max_passes!r}: "
                                "use 1 or more, or strategy.precomputed.bn_adapt=false to skip "
                                "adaptation.")
        if self.bn_momentum is not None and not 0 < self.bn_momentum <= 1:
            raise EffbenchError("invalid value "
                                f"strategy.precomputed.bn_momentum={self.bn_momentum!r}: use "
                                "a factor in (0, 1] or null for the cumulative average.")
        if not (isinstance(self.ambiguity_weight, (int, float)) and self.ambiguity_weight >= 0):
            raise EffbenchError(f"invalid value strategy.precomputed.ambiguity_weight="
                                f"{self.ambiguity_weight!r}: use 0 (off) or a positive α.")
        if self.head_batch_size is not None and not (
                isinstance(self.head_batch_size, int) and self.head_batch_size >= 2):
            raise EffbenchError("invalid value "
                                f"strategy.precomputed.head_batch_size={self.head_batch_size!r}"
                                ": use 2 or more, or null for dataset.batch_size.")

    def _bn_settings(self, ctx: RunContext) -> dict[str, Any]:
        # Batch size matters: train-mode BN averages per-batch statistics.
        return {"enabled": bool(self.bn_adapt), "threshold": self.bn_threshold,
                "max_passes": self.bn_max_passes, "momentum": self.bn_momentum,
                "batch_size": ctx.datamodule.batch_size}

    def _adapt_and_extract(self, ctx: RunContext, device: torch.device) -> dict[str, tuple]:
        dm, backbone = ctx.datamodule, ctx.system.backbone
        start = time.perf_counter()
        keys = feature_keys(dm.cache_key, dm.labels, backbone, self._bn_settings(ctx))
        cache = FeatureCache(ctx.cfg.cache_dir)
        key_time = time.perf_counter() - start
        start = time.perf_counter()
        # One job computes, concurrent jobs with the same key wait here and then load.
        with cache.lock(keys.bn):
            wait = time.perf_counter() - start
            with ctx.phase("bn_adapt"):
                bn, bn_hit = self._adapt(ctx, cache, keys, device)
            with ctx.phase("extract"):
                feats, hits = self._extract(ctx, cache, keys, device)
        ctx.extra.setdefault(self.name, {}).update({
            "cache_hit": bn_hit and all(hits.values()),
            "bn_adaptation": bn,
            "cache": {"dir": str(cache.dir), "keys": {"bn": keys.bn, **keys.splits},
                      "paths": {s: str(cache.path(k)) for s, k in
                                {"bn": keys.bn, **keys.splits}.items()},
                      "hits": {"bn": bn_hit, **hits}},
            "fixed_costs_s": {"cache_key": key_time, "lock_wait": wait},
        })
        return feats

    def _adapt(self, ctx: RunContext, cache: FeatureCache, keys: FeatureKeys,
               device: torch.device) -> tuple[dict[str, Any], bool]:
        """Adapted BN statistics from the cache, or computed (and stored). Returns the record."""
        backbone = ctx.system.backbone
        if not self.bn_adapt:
            return BNAdaptResult(skipped="strategy.precomputed.bn_adapt=false").as_dict(), True
        stored = cache.load(keys.bn)
        if stored is not None and set(stored["state"]) == set(bn_state(backbone)):
            backbone.load_state_dict(stored["state"], strict=False)
            return {**json.loads(stored["record"]), "from_cache": True}, True
        start = time.perf_counter()
        result = adapt_batchnorm(backbone, lambda: train_batches(ctx.datamodule, device),
                                 self.bn_threshold, self.bn_max_passes, self.bn_momentum)
        record = {**result.as_dict(), "time_s": time.perf_counter() - start}
        if result.skipped is not None:
            log.info("BN adaptation skipped: %s", result.skipped)
        else:
            log.info("BN adaptation: %d passes, relative changes %s", result.passes,
                     [f"{c:.2g}" for c in result.changes])
            cache.store(keys.bn, {"state": bn_state(backbone), "record": json.dumps(record)})
        return {**record, "from_cache": False}, result.skipped is not None

    def _extract(self, ctx: RunContext, cache: FeatureCache, keys: FeatureKeys,
                 device: torch.device) -> tuple[dict[str, tuple], dict[str, bool]]:
        dm, backbone = ctx.datamodule, ctx.system.backbone
        feats, hits = {}, {}
        for split, key in keys.splits.items():
            stored = cache.load(key)
            n = len(dm.labels[split])
            if stored is not None and tuple(stored["features"].shape) == (n, backbone.feature_dim):
                feats[split], hits[split] = (stored["features"], stored["labels"]), True
                continue
            x, y = extract_features(backbone, dm, split, device,
                                    bool(ctx.cfg.trainer.enable_progress_bar))
            cache.store(key, {"features": x, "labels": y})
            feats[split], hits[split] = (x, y), False
        return feats, hits

    def _train(self, ctx: RunContext, feats: dict[str, tuple], device: torch.device) -> None:
        sys_, dm = ctx.system, ctx.datamodule
        on = {s: (x.to(device), y.to(device)) for s, (x, y) in feats.items()}
        cfg = HeadTraining(epochs=int(ctx.cfg.trainer.max_epochs),
                           batch_size=int(self.head_batch_size or dm.batch_size),
                           alpha=float(self.ambiguity_weight),
                           patience=(ctx.recipe.early_stopping or {}).get("patience"),
                           keep_best=bool(ctx.recipe.checkpoint), seed=int(ctx.cfg.seed))
        loggers = ctx.loggers()

        def log(row: dict[str, float], step: int) -> None:
            for logger in loggers:
                logger.log_metrics(row, step=step)

        # The cache phase consumes random numbers only when it misses (BN passes shuffle); reseed
        # so a job's result is a function of its config and seed, whatever was cached.
        torch.manual_seed(int(ctx.cfg.seed))
        with cpu_threads(self.head_threads if device.type == "cpu" else None):
            result = train_head(sys_.head, sys_.loss_fn, sys_.configure_optimizers(),
                                on["train"], on["val"], dm.task, sys_.class_names, cfg, log)
        for logger in loggers:
            logger.save()
        sys_.best_val, sys_.val_history = dict(result.best), result.history
        ctx.epochs = result.epochs
        ctx.record.images = result.images
        ctx.extra.setdefault(self.name, {}).update({"train_images": result.images,
                                                     "stopped_early": result.stopped_early})

    def _test(self, ctx: RunContext, feats: dict[str, tuple], device: torch.device) -> None:
        sys_ = ctx.system
        sys_.eval()
        if self.eval_on == "features":
            x, y = feats["test"]
            sys_.test_results = evaluate_head(sys_.head, sys_.loss_fn, (x.to(device),
                                              y.to(device)), ctx.datamodule.task,
                                              sys_.class_names)
            return
        trainer = ctx.make_trainer([], max_epochs=1)
        trainer.test(sys_, datamodule=ctx.datamodule, verbose=False)
