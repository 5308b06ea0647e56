"""``precomputed``: adapt BatchNorm, cache the backbone's features once, train a small head on them.

Phases (each timed in ``summary["time_s"]``):

1. ``bn_adapt`` — train-mode, no-grad passes over the training images until the running means
   of the BN layers change by less than ``bn_threshold`` between passes
   (``bn_adapt``);
2. ``extract`` — eval-mode features of train/val/test into the content-addressed cache under
   ``cache_dir`` (``cache``); a later job with the same key loads both the
   adapted BN statistics and the features and never runs the backbone;
3. ``train`` — the head (``mlp``: Linear → BatchNorm1d → ReLU → Dropout → Linear, or ``linear``)
   trained as tensor ops on the cached features with the ambiguity-weighted loss;
4. ``eval`` — the head on the cached test features (``eval_on=features``, the default), or the
   final model (adapted backbone + head) on the test images (``eval_on=model``).

The cache-hit fast path: before anything is built, ``run.build_context`` asks
:meth:`Precomputed.cached_parts`, which computes the decode-free lookup key
(``lookup``) and, on an index hit, loads the cached features, labels and BN
record and hands back a labels-only datamodule and a stand-in backbone: the job decodes no image,
builds no backbone and runs no backbone forward. The backbone is built only when something needs
it, by :meth:`Precomputed.ensure_backbone` (same RNG state as the original build, its weights
checked against the digest in the content key, then the cached adapted BN statistics loaded).

Why ``eval_on=features`` is the default: the cached test features *are* the adapted backbone's
eval-mode outputs on the test images, so the head on them gives the final model's test metrics
without a backbone pass. That is not taken on trust: the job that writes an index entry runs the
final model on the test images once and records the comparison (logits and metrics) in the
entry, and every hit job's summary carries that proof (``equivalence``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import nn

from effbench.backbones.base import Preprocessing
from effbench.compare.cost import build_energy
from effbench.errors import EffbenchError
from effbench.predictions import from_logits, sample_ids
from effbench.summary import state_dict_bytes
from effbench.technique import Technique, register
from effbench.techniques.precomputed.batched import PRETRAINED, job_key
from effbench.techniques.precomputed.bn_adapt import BNAdaptResult, adapt_batchnorm, bn_state
from effbench.techniques.precomputed.cache import (
    FeatureCache,
    FeatureKeys,
    feature_keys,
    module_digest,
)
from effbench.techniques.precomputed.extract import extract_features, train_batches
from effbench.techniques.precomputed.head_training import (
    HeadTraining,
    cpu_threads,
    evaluate_head,
    head_threads,
    train_head,
)
from effbench.techniques.precomputed.heads import build_head
from effbench.techniques.precomputed.lookup import lookup_key, lookup_parts
from effbench.techniques.precomputed.probes import ProbeOptions, as_names, run_probes
from effbench.techniques.precomputed.probes import check as check_probes
from effbench.techniques.precomputed.probes import headline as probes_headline

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from effbench.context import RunContext
    from effbench.data.base import ImageDataModule

log = logging.getLogger(__name__)

EVAL_ON = ("features", "model")
SPLITS = ("train", "val", "test")
# Largest |Δ logit| between the head on cached test features and the final model on the test
# images that still counts as the same model (fp32 rounding of the same ops is ~1e-6).
EQUIVALENCE_ATOL = 1e-4


class CachedBackbone(nn.Module):
    """Stands in for the backbone of a cache-hit job: its facts, no weights, no forward.

    ``Precomputed.ensure_backbone(ctx)`` replaces it with the real adapted backbone when
    something needs one."""

    def __init__(self, facts: dict[str, Any], preprocessing: Preprocessing) -> None:
        super().__init__()
        self.name, self.weights = facts["name"], facts["weights"]
        self.feature_dim, self.preprocessing = int(facts["feature_dim"]), preprocessing
        self.facts = facts

    def build_head(self, num_classes: int) -> nn.Module:
        return nn.Identity()  # precomputed puts its own head in configure_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this precomputed job was served from the feature cache and has no "
                           "backbone; call Precomputed.ensure_backbone(ctx) first")


@dataclass
class CacheHit:
    """What an index hit loaded: the index entry, features per split, the BN entry."""

    lookup: str
    entry: dict[str, Any]
    feats: dict[str, tuple[torch.Tensor, torch.Tensor]]
    bn: dict[str, Any] | None
    costs: dict[str, dict[str, Any]]  # per entry: what building it cost (``_entry_cost``)


def _entry_cost(seconds: float, run_dir: Any, hit: bool) -> dict[str, Any]:
    """One cache entry's build cost: seconds, the run that built it, and whether this job loaded
    it instead of computing it (then those seconds are a cost it was spared)."""
    return {"s": float(seconds), "built_by": None if run_dir is None else str(run_dir),
            "hit": bool(hit)}


def _stored_cost(text: str | None) -> dict[str, Any]:
    cost = json.loads(text or "{}")
    return {"s": float(cost.get("time_s") or cost.get("extract_s") or 0.0),
            "built_by": cost.get("built_by")}


@contextmanager
def _rng_kept():
    """Run a block that reseeds without changing the caller's python / numpy / torch RNGs."""
    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])


def build_backbone_as_run_does(cfg: DictConfig) -> nn.Module:
    """The backbone exactly as ``run()`` builds it (seeded, then built first), RNGs untouched."""
    with _rng_kept():
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
        return instantiate(cfg.backbone, image_size=cfg.dataset.image_size)


@register
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
                 bn_momentum: float | None = 0.1, bn_shuffle_seed: int = 0,
                 head_batch_size: int | None = None,
                 eval_on: str = "features", head_threads: int | str | None = None,
                 save_model: bool = True, probes: list[str] | None = None,
                 probe_knn_k: int = 20, probe_logreg_c: float = 1.0,
                 probe_logreg_max_iter: int = 1000) -> None:
        super().__init__(name)
        # k-NN / logistic-regression probes fitted on the cached features after the head
        # (probes.py): how good the features are, next to what the head made of them.
        self.probes = as_names(probes)
        self.probe_knn_k, self.probe_logreg_c = probe_knn_k, probe_logreg_c
        self.probe_logreg_max_iter = probe_logreg_max_iter
        # A cache-hit job builds its backbone only to save the model (<run>/model/).
        self.save_model = save_model
        # CPU threads for head training (head_training.head_threads: null = the hardware plan's).
        self.head_threads = head_threads
        self.head, self.hidden, self.dropout = head, hidden, dropout
        self.ambiguity_weight, self.bn_adapt = ambiguity_weight, bn_adapt
        self.bn_threshold, self.bn_max_passes, self.bn_momentum = (bn_threshold, bn_max_passes,
                                                                   bn_momentum)
        self.head_batch_size, self.eval_on = head_batch_size, eval_on
        # Fixes the shuffled order BN adaptation reads the training images in; not the run's seed,
        # so a seed sweep over pretrained weights still shares one cache entry.
        self.bn_shuffle_seed = bn_shuffle_seed
        self._hit: CacheHit | None = None
        self._lookup: str | None = None
        self._fast: dict[str, Any] = {}
        self._costs: dict[str, float] = {}
        self._keys: FeatureKeys | None = None
        self._entry_costs: dict[str, dict[str, Any]] = {}

    # -- the cache-hit fast path (called by run.build_context before it builds anything) ------
    def cached_parts(self, cfg: DictConfig) -> tuple[nn.Module, ImageDataModule] | None:
        """On an index hit: a stand-in backbone and a labels-only datamodule (nothing decoded,
        nothing built); None sends the job down the ordinary path."""
        self._check()
        start = time.perf_counter()
        dm: ImageDataModule = instantiate(cfg.dataset, _convert_="all")
        refused = ("eval_on=model tests the model on the images" if self.eval_on == "model"
                   else "a resumed run" if cfg.get("resume") else None)
        parts = lookup_parts(cfg, dm.source_files(), type(dm), self._bn_settings(dm.batch_size))
        self._lookup = lookup_key(parts) if parts else None
        self._costs["lookup"] = time.perf_counter() - start
        if refused or self._lookup is None:
            self._fast = {"used": False, "why": refused or "the data or weights files are not "
                          "there to fingerprint"}
            return None
        start = time.perf_counter()
        self._hit = self._load_hit(FeatureCache(cfg.cache_dir), self._lookup)
        self._costs["load"] = time.perf_counter() - start
        if self._hit is None:
            self._fast = {"used": False, "why": "no complete index entry (first job)"}
            return None
        entry = self._hit.entry
        pre = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in json.loads(entry["preprocessing"]).items()})
        dm.shuffle_seed = int(cfg.seed)
        dm.configure(pre)
        dm.restore_labels({s: y for s, (_, y) in self._hit.feats.items()},
                          list(entry["class_names"]))
        if "test_ids" in entry:  # the file names of the test rows, for predictions.npz
            dm.sample_ids = {"test": json.loads(entry["test_ids"])}
        self._fast = {"used": True, "index": self._lookup}
        return CachedBackbone(json.loads(entry["backbone"]), pre), dm

    def _load_hit(self, cache: FeatureCache, lookup: str) -> CacheHit | None:
        entry = cache.index().load(lookup)
        if entry is None or not json.loads(entry.get("equivalence") or "{}").get("ok"):
            return None
        keys = entry["keys"]
        feats, costs = {}, {}
        for split in SPLITS:
            stored = cache.load(keys[split])
            if stored is None:
                return None
            feats[split] = (stored["features"], stored["labels"])
            costs[split] = {**_stored_cost(stored.get("cost")), "hit": True}
        bn = cache.load(keys["bn"]) if entry["bn_adapted"] else None
        if entry["bn_adapted"] and bn is None:
            return None
        costs["bn"] = ({**_stored_cost(bn["record"]), "hit": True} if bn is not None
                       else _entry_cost(0.0, None, True))
        return CacheHit(lookup, entry, feats, bn, costs)

    def ensure_backbone(self, ctx: RunContext) -> nn.Module:
        """The adapted backbone in ``ctx.system.backbone``: after a fast-path hit it is built
        now, as ``run()`` built it (same seed, built first), checked against the weights digest
        of the cache's content key, and given the cached adapted BN statistics. Idempotent."""
        current = ctx.system.backbone
        if not isinstance(current, CachedBackbone):
            return current
        backbone = build_backbone_as_run_does(ctx.cfg)
        if module_digest(backbone) != current.facts["digest"]:
            raise EffbenchError("the backbone rebuilt for this cached precomputed job differs "
                                "from the one whose features are cached; rerun with "
                                "strategy.precomputed.eval_on=model to rebuild the cache entry.")
        if self._hit is not None and self._hit.bn is not None:
            backbone.load_state_dict(self._hit.bn["state"], strict=False)
        backbone.requires_grad_(False)
        if ctx.plan is not None and ctx.plan.channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        ctx.system.backbone = backbone.to(ctx.system.device)
        return ctx.system.backbone

    # -- hooks --------------------------------------------------------------------------------
    def configure_model(self, ctx: RunContext) -> None:
        self._check()
        backbone = ctx.system.backbone
        # Seeded here so the head starts the same whether or not a backbone was built before it.
        ctx.system.head = self.seeded_head(backbone.feature_dim, ctx.datamodule.num_classes,
                                           int(ctx.cfg.seed))
        # The backbone never receives gradients: only the head's parameters count as trainable.
        backbone.requires_grad_(False)

    def fit(self, ctx: RunContext) -> None:
        device = ctx.plan.torch_device
        ctx.system.to(device)
        if self._hit is not None:
            feats = self._from_hit(ctx)
        else:
            feats = self._adapt_and_extract(ctx, device)
        with ctx.phase("train"):
            self._train(ctx, feats, device)
        with ctx.phase("eval"):
            self._test(ctx, feats, device)
        # Cache hit, miss and batched jobs all come through here: the probes read the same
        # cached features in every case. ``probes`` in the summary is always the results by
        # probe ({} for none), never the option's list that describe() would show.
        ctx.extra.setdefault(self.name, {})["probes"] = {}
        if self.probes:
            with ctx.phase("probes"):
                self._probe(ctx, feats)

    def saved_model(self, ctx: RunContext) -> Any:
        """Backbone + head as they are (the generic saved model); a cache-hit job builds its
        adapted backbone first (:meth:`ensure_backbone`), unless ``save_model=false``."""
        if not self.save_model:
            raise EffbenchError("strategy.precomputed.save_model=false: this job keeps no model.")
        self.ensure_backbone(ctx)
        return None

    def headline(self, summary: dict[str, Any]) -> str | None:
        s = self.facts(summary)
        bn, cache = s.get("bn_adaptation") or {}, s.get("cache") or {}
        built = sum((cache.get("built_s") or {}).values())
        if s.get("cache_hit"):
            fast = (s.get("fast_path") or {}).get("used")
            by = cache.get("built_by") or "an earlier run"
            how = (f"cache hit{' (no image decoded, no backbone built)' if fast else ''}: "
                   f"features built in {built:.1f} s by {by}")
            passes = ("BN adaptation skipped" if bn.get("skipped") else
                      f"BN statistics loaded (adapted there in {bn.get('passes', 'n/a')} passes)")
        else:
            how = f"cache miss: features built here in {built:.1f} s"
            passes = ("BN adaptation skipped" if bn.get("skipped") else
                      f"BN passes {bn.get('passes', 'n/a')}")
        line = (f"{how}   {passes}   head trained {s.get('head_epochs', 'n/a')} epochs on "
                f"{s.get('train_vectors', 'n/a')} feature vectors")
        probes = probes_headline(s.get("probes") or {}, summary.get("data", {}).get("task"))
        return f"{line}\n  {probes}" if probes else line

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        head = ctx.system.head
        model: dict[str, Any] = {"head_params": sum(p.numel() for p in head.parameters()),
                                 "head_size_bytes": state_dict_bytes(head)}
        backbone = ctx.system.backbone
        if isinstance(backbone, CachedBackbone):
            # The backbone's numbers recorded when the entry was made; size within ~1 KB of
            # torch.save of the whole model (two archives' headers instead of one).
            facts = backbone.facts
            model["params_total"] = facts["params"] + sum(
                p.numel() for p in ctx.system.parameters())
            model["size_bytes"] = facts["size_bytes"] + state_dict_bytes(ctx.system)
        costs = {**self._costs, "setup": ctx.times.get("setup", 0.0),
                 "eval": ctx.times.get("eval", 0.0)}
        return {"model": model, "fast_path": dict(self._fast),
                "fixed_costs_s": {**ctx.extra.get(self.name, {}).get("fixed_costs_s", {}),
                                  **costs}}

    # -- phases -------------------------------------------------------------------------------
    def _check(self) -> ProbeOptions:
        options = check_probes(self.probes, self.probe_knn_k, self.probe_logreg_c,
                               self.probe_logreg_max_iter)
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
        if not (isinstance(self.bn_shuffle_seed, int) and not isinstance(self.bn_shuffle_seed, bool)
                and self.bn_shuffle_seed >= 0):
            raise EffbenchError("invalid value strategy.precomputed.bn_shuffle_seed="
                                f"{self.bn_shuffle_seed!r}: use a whole number such as 0.")
        if not (isinstance(self.ambiguity_weight, (int, float)) and self.ambiguity_weight >= 0):
            raise EffbenchError(f"invalid value strategy.precomputed.ambiguity_weight="
                                f"{self.ambiguity_weight!r}: use 0 (off) or a positive α.")
        if not isinstance(self.save_model, bool):
            raise EffbenchError("invalid value strategy.precomputed.save_model="
                                f"{self.save_model!r}: use true or false.")
        head_threads(self.head_threads)
        if self.head_batch_size is not None and not (
                isinstance(self.head_batch_size, int) and self.head_batch_size >= 2):
            raise EffbenchError("invalid value "
                                f"strategy.precomputed.head_batch_size={self.head_batch_size!r}"
                                ": use 2 or more, or null for dataset.batch_size.")
        return options

    def _bn_settings(self, batch_size: int) -> dict[str, Any]:
        # Batch size and order matter: train-mode BN averages per-batch statistics.
        return {"enabled": bool(self.bn_adapt), "threshold": self.bn_threshold,
                "max_passes": self.bn_max_passes, "momentum": self.bn_momentum,
                "batch_size": int(batch_size), "order": "shuffled",
                "shuffle_seed": int(self.bn_shuffle_seed)}

    def _from_hit(self, ctx: RunContext) -> dict[str, tuple]:
        hit = self._hit
        assert hit is not None
        keys, cache = hit.entry["keys"], FeatureCache(ctx.cfg.cache_dir)
        if hit.bn is not None:
            bn = {**json.loads(hit.bn["record"]), "from_cache": True}
        else:
            bn = BNAdaptResult(skipped=json.loads(hit.entry["bn_skipped"])).as_dict()
        ctx.times.update({"bn_adapt": 0.0, "extract": 0.0})  # both loaded at setup (fixed costs)
        self._entry_costs = dict(hit.costs)
        ctx.extra.setdefault(self.name, {}).update({
            "cache_hit": True, "bn_adaptation": bn,
            "cache": {"dir": str(cache.dir), "keys": dict(keys),
                      "paths": {s: str(cache.path(k)) for s, k in keys.items()},
                      "hits": {s: True for s in keys},
                      "index": str(cache.index().path(hit.lookup)), **self._cost_facts()},
            "equivalence": json.loads(hit.entry["equivalence"])})
        return hit.feats

    def _adapt_and_extract(self, ctx: RunContext, device: torch.device) -> dict[str, tuple]:
        dm, backbone = ctx.datamodule, ctx.system.backbone
        start = time.perf_counter()
        keys = feature_keys(dm.cache_key, dm.labels, backbone, self._bn_settings(dm.batch_size))
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
        self._entry_costs["bn"] = (_entry_cost(0.0, None, True) if bn.get("skipped") is not None
                                   else _entry_cost(bn.get("time_s") or 0.0, bn.get("built_by"),
                                                    bn_hit))
        self._keys = keys
        ctx.extra.setdefault(self.name, {}).update({
            "cache_hit": bn_hit and all(hits.values()),
            "bn_adaptation": bn,
            "cache": {"dir": str(cache.dir), "keys": {"bn": keys.bn, **keys.splits},
                      "paths": {s: str(cache.path(k)) for s, k in
                                {"bn": keys.bn, **keys.splits}.items()},
                      "hits": {"bn": bn_hit, **hits}, **self._cost_facts()},
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
        progress = bool(ctx.cfg.trainer.enable_progress_bar)
        result = adapt_batchnorm(backbone, lambda: train_batches(
                                     ctx.datamodule, device, self.bn_shuffle_seed, progress),
                                 self.bn_threshold, self.bn_max_passes, self.bn_momentum)
        record = {**result.as_dict(), "time_s": time.perf_counter() - start,
                  "built_by": str(ctx.run_dir)}
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
                self._entry_costs[split] = {**_stored_cost(stored.get("cost")), "hit": True}
                continue
            start = time.perf_counter()
            x, y = extract_features(backbone, dm, split, device,
                                    bool(ctx.cfg.trainer.enable_progress_bar))
            seconds = time.perf_counter() - start
            cost = {"extract_s": seconds, "built_by": str(ctx.run_dir)}
            cache.store(key, {"features": x, "labels": y, "cost": json.dumps(cost)})
            feats[split], hits[split] = (x, y), False
            self._entry_costs[split] = _entry_cost(seconds, ctx.run_dir, False)
        return feats, hits

    def _cost_facts(self) -> dict[str, Any]:
        """What building the cache entries this job used cost, and what it was spared (the
        entries it loaded): ``summary.strategy.precomputed.cache``, which effbench-compare
        charges (``effbench.compare.cost``)."""
        phase = {"bn": "bn_adapt", **{s: "extract" for s in SPLITS}}
        built_s = {"bn_adapt": 0.0, "extract": 0.0}
        spared_s = {"bn_adapt": 0.0, "extract": 0.0}
        for name, cost in self._entry_costs.items():
            built_s[phase[name]] += cost["s"]
            if cost["hit"]:
                spared_s[phase[name]] += cost["s"]
        # The BN entry's builder first: it built the features too unless one was rebuilt.
        ordered = sorted(self._entry_costs.items(), key=lambda kv: kv[0] != "bn")
        built_by = next((c["built_by"] for _, c in ordered if c.get("built_by")), None)
        hit = all(c["hit"] for c in self._entry_costs.values())
        kwh, co2 = build_energy(built_by, sum(built_s.values())) if hit else (None, None)
        return {"hit": hit, "built_by": built_by, "built_s": built_s, "spared_s": spared_s,
                "built_kwh": kwh, "built_co2_kg": co2}

    def head_training(self, cfg: DictConfig, recipe: Any, batch_size: int) -> HeadTraining:
        """How this job trains its head (also what the batched launcher gives each head)."""
        return HeadTraining(epochs=int(cfg.trainer.max_epochs),
                            batch_size=int(self.head_batch_size or batch_size),
                            alpha=float(self.ambiguity_weight),
                            patience=(recipe.early_stopping or {}).get("patience"),
                            keep_best=bool(recipe.checkpoint), seed=int(cfg.seed))

    def seeded_head(self, feature_dim: int, num_classes: int, seed: int) -> nn.Module:
        """This job's head as it starts training: a function of its settings and seed only."""
        with _rng_kept():
            torch.manual_seed(seed)
            return build_head(self.head, feature_dim, num_classes, self.hidden, self.dropout)

    def cached_features(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The features a fast-path hit loaded (the batched launcher trains on them)."""
        if self._hit is None:
            raise RuntimeError("no cache hit: the features were not loaded")
        return self._hit.feats

    def _train(self, ctx: RunContext, feats: dict[str, tuple], device: torch.device) -> None:
        sys_, dm = ctx.system, ctx.datamodule
        loggers = ctx.loggers()

        def log(row: dict[str, float], step: int) -> None:
            for logger in loggers:
                logger.log_metrics(row, step=step)

        # The launcher's batched heads train under the same rule (launcher.pretrain).
        threads = head_threads(self.head_threads) if device.type == "cpu" else None
        pre = PRETRAINED.pop(job_key(ctx.cfg), None)
        if pre is not None:  # trained batched with the other heads of its sweep group
            sys_.head.load_state_dict(pre.state)
            for row, step in pre.rows:
                log(row, step)
            result = pre.result
            ctx.times["train"] = ctx.times.get("train", 0.0) + pre.group["share_s"]
            ctx.extra.setdefault(self.name, {})["batched"] = dict(pre.group)
        else:
            on = {s: (x.to(device), y.to(device)) for s, (x, y) in feats.items()}
            cfg = self.head_training(ctx.cfg, ctx.recipe, dm.batch_size)
            # The cache phase consumes random numbers only when it misses (BN passes shuffle);
            # reseed so a job's result is a function of its config and seed, whatever was cached.
            torch.manual_seed(int(ctx.cfg.seed))
            with cpu_threads(threads):
                result = train_head(sys_.head, sys_.loss_fn, sys_.configure_optimizers(),
                                    on["train"], on["val"], dm.task, sys_.class_names, cfg, log)
        for logger in loggers:
            logger.save()
        sys_.best_val, sys_.val_history = dict(result.best), result.history
        ctx.epochs = result.epochs
        ctx.record.images = result.images
        ctx.extra.setdefault(self.name, {}).update({
            "train_images": result.images, "train_vectors": len(feats["train"][1]),
            "head_epochs": result.epochs, "stopped_early": result.stopped_early,
            # CPU threads the head trained with (null on a GPU)
            "head_threads": (threads or torch.get_num_threads()) if device.type == "cpu"
            else None})

    def _probe(self, ctx: RunContext, feats: dict[str, tuple]) -> None:
        """The probes on this job's features (train, val, and the test rows the head was
        tested on): ``summary.strategy.precomputed.probes``."""
        dm = ctx.datamodule
        x, y = feats["test"]
        n = self._test_count(ctx, len(y))
        on = {**feats, "test": (x[:n], y[:n])}
        # What the features are (the cache's content keys) and which test rows: equal sources
        # give equal probe results, so a later job of this process reuses them.
        source = {"keys": ctx.extra[self.name]["cache"]["keys"], "test_rows": n}
        ctx.extra[self.name]["probes"] = run_probes(on, dm.task, list(dm.class_names),
                                                    self._check(), source, str(ctx.run_dir))

    def _test_count(self, ctx: RunContext, n: int) -> int:
        """Test samples that ``trainer.limit_test_batches`` lets through (Lightning's rule:
        an int is batches, a float a share of the batches)."""
        limit = ctx.cfg.trainer.get("limit_test_batches")
        if limit is None:
            return n
        bs = ctx.datamodule.eval_batch_size
        batches = math.ceil(n / bs)
        take = int(limit) if isinstance(limit, int) else int(batches * float(limit))
        return min(n, max(1, min(take, batches)) * bs)

    def _test(self, ctx: RunContext, feats: dict[str, tuple], device: torch.device) -> None:
        sys_, dm = ctx.system, ctx.datamodule
        sys_.eval()
        x, y = feats["test"]
        n = self._test_count(ctx, len(y))
        on_features = (x[:n].to(device), y[:n].to(device))
        if self._hit is None and (self.eval_on == "model" or self._lookup is not None):
            # The model on the images: the test itself (eval_on=model), or the proof once per
            # index entry that the head on cached features is that test.
            logits = self._model_logits(ctx, n, device)
            results = evaluate_head(nn.Identity(), sys_.loss_fn, (logits, on_features[1]),
                                    dm.task, sys_.class_names)
            proof = self._equivalence(ctx, logits, on_features, results)
            ctx.extra.setdefault(self.name, {})["equivalence"] = proof
            if self._lookup is not None:
                self._write_index(ctx, proof)
            if self.eval_on == "model":
                sys_.test_results = results
                sys_.test_predictions = from_logits(logits, on_features[1], dm.task)
                return
        sys_.test_results = evaluate_head(sys_.head, sys_.loss_fn, on_features, dm.task,
                                          sys_.class_names)
        with torch.no_grad():  # <run>/predictions.npz, as the Lightning test step keeps them
            sys_.test_predictions = from_logits(sys_.head(on_features[0]), on_features[1],
                                                dm.task)

    def _model_logits(self, ctx: RunContext, n: int, device: torch.device) -> torch.Tensor:
        """The final model (adapted backbone + head) on the first ``n`` test images, as the
        Lightning test step runs it (normalised on the device, eval mode)."""
        sys_, dm, out = ctx.system, ctx.datamodule, []
        with torch.inference_mode():
            for x, _ in dm.loader("test", shuffle=False):
                out.append(sys_(dm.normalize(x.to(device, non_blocking=True))).float())
        return torch.cat(out)[:n] if out else torch.zeros(0, dm.num_classes, device=device)

    def _equivalence(self, ctx: RunContext, logits: torch.Tensor, on_features: tuple,
                     model_results: dict) -> dict[str, Any]:
        sys_ = ctx.system
        with torch.no_grad():
            head_logits = sys_.head(on_features[0]).float()
        diff = float((head_logits - logits).abs().max()) if len(logits) else 0.0
        head_results = evaluate_head(sys_.head, sys_.loss_fn, on_features, ctx.datamodule.task,
                                     sys_.class_names)
        a, b = model_results["scalars"], head_results["scalars"]
        metric_diff = max((abs(a[k] - b[k]) for k in a if k in b), default=0.0)
        ok = diff <= EQUIVALENCE_ATOL
        if not ok:
            log.warning("the head on cached test features differs from the final model on the "
                        "test images by %.3g (logits); the cache entry is not trusted", diff)
        return {"test_images": len(logits), "max_abs_logit_diff": diff,
                "max_abs_metric_diff": metric_diff, "tolerance": EQUIVALENCE_ATOL, "ok": ok}

    def _write_index(self, ctx: RunContext, proof: dict[str, Any]) -> None:
        """The decode-free index entry of this job's cache entries (``features.lookup``)."""
        keys, backbone, dm = self._keys, ctx.system.backbone, ctx.datamodule
        assert keys is not None and self._lookup is not None
        facts = {"name": getattr(backbone, "name", type(backbone).__name__),
                 "weights": getattr(backbone, "weights", None),
                 "feature_dim": int(backbone.feature_dim),
                 "digest": keys.parts["backbone"]["digest"],
                 "params": sum(p.numel() for p in backbone.parameters()),
                 "size_bytes": state_dict_bytes(backbone)}
        skipped = ctx.extra[self.name]["bn_adaptation"].get("skipped")
        entry = {"keys": {"bn": keys.bn, **keys.splits}, "bn_adapted": skipped is None,
                 "bn_skipped": json.dumps(skipped), "class_names": list(dm.class_names),
                 "preprocessing": json.dumps(dataclasses.asdict(dm.preprocessing)),
                 "backbone": json.dumps(facts), "content": json.dumps(keys.parts, default=str),
                 "equivalence": json.dumps(proof), "test_ids": json.dumps(sample_ids(dm))}
        FeatureCache(ctx.cfg.cache_dir).index().store(self._lookup, entry)
