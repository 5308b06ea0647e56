"""``prune``: gradual magnitude pruning during training, then real (compressed) size savings.

The CheXNet compression study's recipe: conv weights only (not biases, BatchNorm nor the output
layer), a polynomial schedule of power 4 from 10 % sparsity at the middle of epoch 1 to the target
(50 % / 70 %) at the end of epoch 7 (Zhu & Gupta's schedule, TensorFlow's ``PolynomialDecay``), or
per-layer targets by output channels (the "adaptive" variant). Masks come from
``torch.nn.utils.prune``; at the end they are made permanent and the dense and zipped state-dict
sizes are reported.

``structure=channel`` removes whole conv output channels instead (torch-pruning, see
effbench/techniques/prune/channel.py) on the same schedule: each update prunes every channel group
to the scheduled fraction of its original channels, the optimizer follows the replaced
parameters, and the end reports parameters, MACs, size and CPU latency before/after.

Why a small callback and not Lightning's ``ModelPruning``: its ``amount`` is evaluated once per
epoch (the schedule here starts mid-epoch and updates every ``frequency``), it has no per-layer
amounts (adaptive), and its lottery-ticket resetting is on by default. The amounts handed to
``torch.nn.utils.prune`` are counts of *additional* weights taken from those still unpruned (its
iterative ``PruningContainer`` semantics), computed from the schedule's total target.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.nn.utils import prune

from effbench.errors import EffbenchError
from effbench.model import cpu_latency_ms, zipped_state_dict_bytes
from effbench.model.saved import SavedModel, network_model
from effbench.summary import state_dict_bytes
from effbench.technique import Technique, register
from effbench.techniques.prune.channel import (
    build_channel_pruner,
    channel_sparsity,
    conv_layers,
    count_macs,
    example_batch,
    import_torch_pruning,
    out_channels,
    recorded_swaps,
    remap_optimizer,
)

if TYPE_CHECKING:
    from effbench.context import RunContext

log = logging.getLogger(__name__)

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Which layers' weights each scope prunes (biases, BatchNorm and embeddings never are).
SCOPES: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": CONV,
    "all": (*CONV, nn.Linear),
    "adaptive": CONV,
}
MODES = ("layer", "global")
# unstructured: masks (zeros) in the weights; channel: conv output channels removed (torch-pruning).
STRUCTURES = ("unstructured", "channel")
UNITS = ("epoch", "step")
# The study's adaptive targets, by a conv layer's output channels. Channel counts a preset lacks
# (ResNet's 128, DenseNet's 128/256/512) are left unpruned unless ``adaptive_default`` is set.
ADAPTIVE_PRESETS: dict[str, dict[int, float]] = {
    "resnet": {64: 0.25, 256: 0.40, 512: 0.55, 1024: 0.70, 2048: 0.85},
    "densenet": {32: 0.25, 64: 0.50},
}


@dataclass(frozen=True)
class PolynomialSchedule:
    """Sparsity at optimizer step ``t``: 0 before ``begin``, then
    ``final + (initial - final) * (1 - (t - begin) / (end - begin)) ** power``, ``final`` from
    ``end`` on (TensorFlow Model Optimization's ``PolynomialDecay``)."""

    initial: float
    final: float
    begin: int
    end: int
    power: float = 4.0

    def __call__(self, step: int) -> float:
        if step < self.begin:
            return 0.0
        if step >= self.end:
            return self.final
        progress = (step - self.begin) / (self.end - self.begin)
        return self.final + (self.initial - self.final) * (1.0 - progress) ** self.power


def _fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise EffbenchError(f"strategy.prune.{name}={value} must be a fraction in [0, 1), "
                            f"e.g. strategy.prune.{name}=0.5.")
    return value


def _choice(name: str, value: str, allowed: tuple[str, ...] | dict) -> str:
    if value not in allowed:
        raise EffbenchError(f"strategy.prune.{name}={value!r} is not one of {', '.join(allowed)}; "
                            f"set strategy.prune.{name}={next(iter(allowed))} (or another of "
                            "them).")
    return value


def layer_sparsity(module: nn.Module) -> float:
    """Fraction of zeros in ``module.weight`` (the masked weight while pruning is active)."""
    w = module.weight.detach()
    return float((w == 0).sum()) / w.numel()


class GradualPruning(Callback):
    """Prunes ``layers`` (name → module, each already reparametrised by ``torch.nn.utils.prune``)
    towards per-layer ``targets`` on a :class:`PolynomialSchedule`, before the training batch of
    every ``frequency``-th optimizer step between ``start`` and ``end`` (and always at ``end``)."""

    def __init__(self, layers: dict[str, nn.Module], targets: dict[str, float], initial: float,
                 power: float, start: float, end: float, unit: str, frequency: float,
                 mode: str) -> None:
        self.layers, self.targets, self.mode = layers, targets, mode
        self.initial, self.power, self.unit = initial, power, unit
        self.start, self.end, self.frequency = start, end, frequency
        self.schedules: dict[str, PolynomialSchedule] = {}
        self.every = 1
        self.last_step = -1
        self.history: list[dict[str, float]] = []

    # -- schedule in steps -----------------------------------------------------------------------
    def resolve(self, steps_per_epoch: int) -> None:
        """Turns ``start``/``end``/``frequency`` into optimizer steps. In epochs, ``end=7`` is the
        last step of the 7th epoch, ``start=0.5`` the middle of the first."""
        scale = steps_per_epoch if self.unit == "epoch" else 1
        begin = round(self.start * scale)
        end = max(begin, math.ceil(self.end * scale) - (1 if self.unit == "epoch" else 0))
        self.every = max(1, round(self.frequency * scale))
        self.schedules = {n: PolynomialSchedule(min(self.initial, t), t, begin, end, self.power)
                          for n, t in self.targets.items()}

    @property
    def begin_step(self) -> int:
        return next(iter(self.schedules.values())).begin

    @property
    def end_step(self) -> int:
        return next(iter(self.schedules.values())).end

    def finished(self, global_step: int) -> bool:
        """True once the final sparsity has been applied and one step trained with it."""
        return bool(self.schedules) and global_step > self.end_step

    def checkpoint_ready(self, trainer: pl.Trainer) -> bool:
        """The best checkpoint is chosen once the schedule reached its final sparsity, so the
        model tested (and reported) is the pruned one, not a less sparse early epoch."""
        return self.finished(trainer.global_step)

    def due(self, step: int) -> bool:
        if step == self.last_step or step < self.begin_step:
            return False
        if step >= self.end_step:
            return self.last_step < self.end_step
        return (step - self.begin_step) % self.every == 0

    # -- Lightning hooks -------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batches = trainer.num_training_batches
        if not math.isfinite(batches) and self.unit == "epoch":
            raise EffbenchError("strategy.prune.unit=epoch needs a dataset of known length; set "
                                "strategy.prune.unit=step and give strategy.prune.start/end in "
                                "steps.")
        self.resolve(max(1, math.ceil(batches / trainer.accumulate_grad_batches)))
        log.info("pruning from step %d to %d every %d steps", self.begin_step, self.end_step,
                 self.every)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not self.due(step):
            return
        self.apply(step)
        self.last_step = step
        achieved = self.sparsity()
        self.history.append({"step": step, "target": self.scheduled(step), "sparsity": achieved})
        pl_module.log("prune/sparsity", achieved, on_step=True, on_epoch=False)

    # -- pruning ---------------------------------------------------------------------------------
    def scheduled(self, step: int) -> float:
        """The overall target at ``step`` (weighted by layer size)."""
        sizes = {n: self.layers[n].weight.numel() for n in self.schedules}
        return sum(self.schedules[n](step) * sizes[n] for n in sizes) / sum(sizes.values())

    def apply(self, step: int) -> None:
        if self.mode == "global":
            prune_global_to([self.layers[n] for n in self.schedules], self.scheduled(step))
            return
        for name, schedule in self.schedules.items():
            prune_layer_to(self.layers[name], schedule(step))

    def sparsity(self) -> float:
        zeros = sum(float((m.weight_mask == 0).sum()) for m in self.layers.values())
        return zeros / sum(m.weight_mask.numel() for m in self.layers.values())


def _pruned(module: nn.Module) -> int:
    return int((module.weight_mask == 0).sum())


def _scores(module: nn.Module) -> torch.Tensor:
    """|weight| of the unmasked weights; the masked ones rank first (−1), so they stay masked."""
    mask = module.weight_mask.detach().flatten()
    scores = module.weight_orig.detach().abs().flatten().float().clone()
    return scores.masked_fill_(mask == 0, -1.0)


def _mask_smallest(modules: list[nn.Module], scores: torch.Tensor, k: int) -> None:
    """Masks the ``k`` smallest scores, writing each layer's mask in place.

    Written here rather than with ``prune.l1_unstructured``: every call of that stacks another
    PruningContainer and ranks with a full ``topk`` of the amount, about 10× slower per update on
    resnet18's largest layers (an update every 0.05 epochs made training 15× slower); one
    ``topk`` over the scores and an in-place mask keep the checkpoint keys (weight_orig,
    weight_mask) and the masks' identity.
    """
    flat = torch.ones_like(scores)
    flat[torch.topk(scores, k, largest=False, sorted=False).indices] = 0.0
    start = 0
    for m in modules:
        n = m.weight_mask.numel()
        m.weight_mask.copy_(flat[start:start + n].view_as(m.weight_mask))
        # What torch's pruning hook does before each forward: weight = weight_orig × mask now.
        m.weight = m.weight_orig * m.weight_mask
        start += n


def prune_layer_to(module: nn.Module, sparsity: float) -> None:
    """Masks the smallest-magnitude unmasked weights until ``sparsity`` of the layer is masked."""
    k = round(sparsity * module.weight_mask.numel())
    if k > _pruned(module):
        _mask_smallest([module], _scores(module), k)


def prune_global_to(modules: list[nn.Module], sparsity: float) -> None:
    """Like :func:`prune_layer_to` but ranks the weights of all ``modules`` together."""
    total = sum(m.weight_mask.numel() for m in modules)
    k = round(sparsity * total)
    if k > sum(_pruned(m) for m in modules):
        _mask_smallest(modules, torch.cat([_scores(m) for m in modules]), k)


class ChannelPruning(GradualPruning):
    """Removes conv output channels of ``layers`` on :class:`GradualPruning`'s schedule: each
    update brings every channel group (``mode=layer``; ``global``: all groups ranked together) to
    the scheduled fraction of its original channels, with torch-pruning keeping coupled layers
    (residual adds, concatenations) consistent. Optimizers seen at ``on_train_start`` follow the
    replaced parameters, state included."""

    def __init__(self, system: nn.Module, layers: dict[str, nn.Module], example: torch.Tensor,
                 final: float, initial: float, power: float, start: float, end: float,
                 unit: str, frequency: float, mode: str) -> None:
        super().__init__(layers, dict.fromkeys(layers, final), initial, power, start, end, unit,
                         frequency, mode)
        self.initial_channels = out_channels(layers)
        self.optimizers: list[torch.optim.Optimizer] = []
        # The head is never pruned: it only loses the inputs the backbone no longer produces.
        self.pruner = build_channel_pruner(system, example[:1], [system.head], final,
                                           self.ratio_at, mode == "global")

    def due_steps(self) -> list[int]:
        """The steps :meth:`due` fires at, in order, when training runs through ``end``."""
        return [*range(self.begin_step, self.end_step, self.every), self.end_step]

    def ratio_at(self, call: int, final: float) -> float:
        """The fraction of channels removed after the ``call``-th update (from 1)."""
        if call <= 0:
            return 0.0
        due = self.due_steps()
        step = due[min(call, len(due)) - 1]
        schedule = next(iter(self.schedules.values()))
        return PolynomialSchedule(min(self.initial, final), final, schedule.begin, schedule.end,
                                  self.power)(step)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1:
            # DDP registers every parameter (and its shape) when it wraps the model.
            raise EffbenchError("strategy.prune.structure=channel cannot run on "
                                f"{trainer.world_size} processes (DDP fixes the parameter shapes "
                                "that channel pruning changes); train on one device or use "
                                "strategy.prune.structure=unstructured.")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.optimizers = list(trainer.optimizers)

    def scheduled(self, step: int) -> float:
        return next(iter(self.schedules.values()))(step)

    def apply(self, step: int) -> None:
        with recorded_swaps() as swaps:
            self.pruner.step()
        for optimizer in self.optimizers:
            remap_optimizer(optimizer, swaps)

    def sparsity(self) -> float:
        return channel_sparsity(self.initial_channels, self.layers)

    def release(self) -> None:
        """Drops torch-pruning's graph (it holds the modules) once pruning is over."""
        self.pruner = None
        self.optimizers = []


@register
class Prune(Technique):
    """Gradual magnitude pruning (see the module docstring); composable with the shared fit.

    ``structure`` chooses one of two techniques that share the schedule and its options:
    :class:`UnstructuredPrune` (masks, then zeros) or :class:`ChannelPrune` (whole channels
    removed); ``Prune(...)`` builds the one asked for."""

    name = "prune"
    order = 30
    acts_on = frozenset({"model", "callbacks", "checkpoint"})
    needs = frozenset({"backbone_grad"})
    # Masks are hooks; channel pruning replaces parameters and resizes layers during training.
    # Either way a later graph export must wait until ``settle``.
    reparametrizes = True

    def __new__(cls, *args: Any, **kwargs: Any) -> Prune:
        if cls is Prune:
            cls = ChannelPrune if kwargs.get("structure") == "channel" else UnstructuredPrune
        return super().__new__(cls)

    def __init__(self, name: str = "prune", final_sparsity: float = 0.5,
                 initial_sparsity: float = 0.1,
                 power: float = 4.0, start: float = 0.5, end: float = 7.0, unit: str = "epoch",
                 frequency: float = 0.05, scope: str = "conv", mode: str = "layer",
                 adaptive_preset: str | None = "auto",
                 adaptive_targets: dict[int, float] | None = None,
                 adaptive_default: float | None = None, include_head: bool = False,
                 structure: str = "unstructured", latency_batch: int = 16,
                 latency_min_time: float = 1.0) -> None:
        super().__init__(name)
        self.final_sparsity = _fraction("final_sparsity", final_sparsity)
        self.initial_sparsity = _fraction("initial_sparsity", initial_sparsity)
        self.power = float(power)
        self.start, self.end, self.frequency = float(start), float(end), float(frequency)
        if not 0 <= self.start <= self.end or self.frequency <= 0 or self.power <= 0:
            raise EffbenchError(f"strategy.prune.start={start}, strategy.prune.end={end}, "
                                "strategy.prune.frequency="
                                f"{frequency}, strategy.prune.power={power} need 0 <= start <= end "
                                "and "
                                f"frequency, power > 0, e.g. start=0.5 end=7 frequency=0.05 "
                                f"power=4.")
        self.unit = _choice("unit", unit, UNITS)
        self.scope = _choice("scope", scope, SCOPES)
        self.mode = _choice("mode", mode, MODES)
        if self.scope == "adaptive" and self.mode == "global":
            raise EffbenchError("strategy.prune.scope=adaptive sets per-layer targets, which needs "
                                "strategy.prune.mode=layer.")
        if adaptive_preset is not None:
            _choice("adaptive_preset", adaptive_preset, ("auto", *ADAPTIVE_PRESETS))
        self.adaptive_preset = adaptive_preset
        self.adaptive_targets = {int(k): _fraction(f"adaptive_targets.{k}", v)
                                 for k, v in (adaptive_targets or {}).items()}
        self.adaptive_default = (None if adaptive_default is None
                                 else _fraction("adaptive_default", adaptive_default))
        self.include_head = bool(include_head)
        self.structure = _choice("structure", structure, STRUCTURES)
        if self.structure == "channel" and (self.scope != "conv" or self.include_head):
            raise EffbenchError(f"strategy.prune.structure=channel removes the backbone's conv "
                                f"output channels and never the head's, so it needs "
                                f"strategy.prune.scope=conv and strategy.prune.include_head=false "
                                f"(got scope={self.scope}, include_head={self.include_head}).")
        if int(latency_batch) < 1 or float(latency_min_time) <= 0:
            raise EffbenchError(f"strategy.prune.latency_batch={latency_batch} and "
                                f"strategy.prune.latency_min_time={latency_min_time} must be "
                                ">= 1 and > 0, e.g. 16 and 1.0.")
        self.latency_batch, self.latency_min_time = int(latency_batch), float(latency_min_time)
        self._pruner: GradualPruning | None = None
        self._example: torch.Tensor | None = None
        self._before: dict[str, Any] = {}
        self._after: dict[str, Any] = {}

    # -- what gets pruned ------------------------------------------------------------------------
    def layers(self, system: nn.Module) -> dict[str, nn.Module]:
        """Named layers of the scope in the backbone (and the head if ``include_head``)."""
        roots = ["backbone", "head"] if self.include_head else ["backbone"]
        types = SCOPES[self.scope]
        return {f"{root}.{n}" if n else root: m for root in roots
                for n, m in getattr(system, root).named_modules()
                if isinstance(m, types) and isinstance(getattr(m, "weight", None), nn.Parameter)}

    def channel_targets(self, backbone_name: str) -> dict[int, float]:
        preset = self.adaptive_preset
        if preset == "auto":
            preset = next((p for p in ADAPTIVE_PRESETS if p in backbone_name.lower()), None)
        if preset is None and not self.adaptive_targets:
            raise EffbenchError("strategy.prune.scope=adaptive has no per-channel targets for "
                                "backbone "
                                f"{backbone_name!r}; set "
                                "strategy.prune.adaptive_preset=resnet|densenet "
                                f"or strategy.prune.adaptive_targets='{{64: 0.25, 128: 0.4}}'.")
        return {**ADAPTIVE_PRESETS.get(preset or "", {}), **self.adaptive_targets}

    def targets(self, layers: dict[str, nn.Module], backbone_name: str) -> dict[str, float]:
        if self.scope != "adaptive":
            return {n: self.final_sparsity for n in layers}
        by_channels = self.channel_targets(backbone_name)
        found = {n: by_channels.get(m.out_channels, self.adaptive_default)
                 for n, m in layers.items()}
        return {n: t for n, t in found.items() if t is not None}

    # -- hooks -----------------------------------------------------------------------------------
    def check(self, ctx: RunContext) -> None:
        epochs = int(ctx.cfg.trainer.max_epochs)
        if self.unit == "epoch" and self.end > epochs:
            # A schedule that cannot end tests a model less sparse than the target and reports it
            # as pruned: refused (early stopping can still cut it short: then said at the end).
            raise EffbenchError(f"strategy.prune.end={self.end:g} is past trainer.max_epochs="
                                f"{epochs}: the pruning schedule could never reach "
                                f"strategy.prune.final_sparsity={self.final_sparsity:g}; use "
                                f"trainer.max_epochs={math.ceil(self.end)} or more, or end the "
                                f"schedule sooner with strategy.prune.end={epochs}.")
    def callbacks(self, ctx: RunContext) -> list[Callback]:
        assert self._pruner is not None, "configure_model runs before callbacks"
        return [self._pruner]

    def saved_model(self, ctx: RunContext) -> SavedModel | None:
        # Compressed: the pruned tensors by their nonzeros + a bitmask (unstructured), the
        # smaller layers' shapes (channel): the file is as small as the pruning made the model.
        return network_model(ctx, compress=True)

    def _schedule_facts(self, pruner: GradualPruning) -> dict[str, Any]:
        completed = pruner.last_step >= pruner.end_step if pruner.schedules else False
        if not completed:
            log.warning("training stopped before the pruning schedule ended (step %d of %d): "
                        "the sparsity reported is below the target", pruner.last_step,
                        pruner.end_step)
        return {"schedule_steps": {"begin": pruner.begin_step, "end": pruner.end_step,
                                   "every": pruner.every},
                "schedule_completed": completed, "schedule_history": pruner.history}


class UnstructuredPrune(Prune):
    """``structure=unstructured``: ``torch.nn.utils.prune`` masks on the schedule, made zeros for
    good at ``settle``; the saved model stores the pruned tensors by their nonzeros."""

    sparsifies = True

    def configure_model(self, ctx: RunContext) -> None:
        scope = self.layers(ctx.system)
        # Only what trains: a frozen layer's zeros could never be compensated by its other
        # weights (an earlier technique, freeze, has set requires_grad by now).
        layers = {n: m for n, m in scope.items() if m.weight.requires_grad}
        self._frozen_skipped = len(scope) - len(layers)
        if scope and not layers:
            raise EffbenchError(f"strategy.prune.scope={self.scope} finds no trainable layer to "
                                f"prune: all {len(scope)} are frozen (strategy.freeze), and a "
                                "frozen layer's zeros could never be made up for; freeze fewer "
                                "blocks with strategy.freeze.frozen_stages=k, or prune the head "
                                "with strategy.prune.scope=all strategy.prune.include_head=true.")
        targets = self.targets(layers, getattr(ctx.system.backbone, "name", ""))
        if not targets:
            raise EffbenchError(f"strategy.prune.scope={self.scope} finds no layer to prune in "
                                "backbone "
                                f"{ctx.cfg.backbone.name}; use strategy.prune.scope=all or set "
                                "strategy.prune.adaptive_targets / "
                                "strategy.prune.adaptive_default.")
        # Identity masks from the start: every checkpoint has the same keys (weight_orig,
        # weight_mask), so resuming and testing the best checkpoint restore the masks as well.
        for name in targets:
            prune.identity(layers[name], "weight")
        # The share of the scope's weights that has a target: scope=adaptive read literally
        # leaves layers of unlisted widths dense (31 % coverage on DenseNet121).
        total = sum(m.weight.numel() for m in layers.values())
        self._coverage = sum(layers[n].weight.numel() for n in targets) / total if total else 0.0
        self._pruner = GradualPruning({n: layers[n] for n in targets}, targets,
                                      self.initial_sparsity, self.power, self.start, self.end,
                                      self.unit, self.frequency, self.mode)

    def headline(self, summary: dict[str, Any]) -> str | None:
        s, m = self.facts(summary), summary["model"]
        dense, zipped = m.get("size_bytes"), m.get("size_bytes_compressed")
        done = "" if s.get("schedule_completed") else " (schedule NOT completed)"
        return (f"sparsity {s.get('sparsity', 0):.1%} of pruned weights (target "
                f"{self.final_sparsity:.0%}){done}   size {dense / 2**20:.2f} MB dense → "
                f"{zipped / 2**20:.2f} MB compressed")

    def settle(self, ctx: RunContext) -> None:
        assert self._pruner is not None
        with ctx.phase("compress"):
            for module in self._pruner.layers.values():
                if prune.is_pruned(module):
                    prune.remove(module, "weight")  # weight = weight_orig * mask, for good
        self._zeros = [(m.weight, m.weight.detach() == 0) for m in self._pruner.layers.values()]

    def kept_zeros(self) -> list[tuple[Any, Any]]:
        return list(getattr(self, "_zeros", []))

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        pruner = self._pruner
        assert pruner is not None
        self.settle(ctx)
        with ctx.phase("compress"):
            per_layer = {n: layer_sparsity(m) for n, m in pruner.layers.items()}
            sizes = {n: m.weight.numel() for n, m in pruner.layers.items()}
            overall = sum(per_layer[n] * sizes[n] for n in sizes) / sum(sizes.values())
            params = list(ctx.system.parameters())
            zeros = sum(int((p.detach() == 0).sum()) for p in params)
            dense = state_dict_bytes(ctx.system)
            zipped = zipped_state_dict_bytes(ctx.system)
        return {
            "pruned_layers": len(per_layer),
            "sparsity": overall,
            "sparsity_per_layer": per_layer,
            "target_per_layer": dict(pruner.targets),
            "target_coverage": getattr(self, "_coverage", None),
            # frozen layers of the scope left dense (only trainable layers are pruned)
            "frozen_layers_skipped": getattr(self, "_frozen_skipped", 0),
            **self._schedule_facts(pruner),
            "model": {"size_bytes": dense, "size_bytes_compressed": zipped,
                      "compression_ratio": dense / zipped, "sparsity": overall,
                      "sparsity_params": zeros / sum(p.numel() for p in params)},
        }


class ChannelPrune(Prune):
    """``structure=channel``: whole conv output channels removed on the schedule (torch-pruning);
    the end reports parameters, MACs, size and CPU latency before and after."""

    def check(self, ctx: RunContext) -> None:
        super().check(ctx)
        import_torch_pruning()
        if ctx.resume:
            raise EffbenchError(f"resume={ctx.resume['path']} cannot continue a "
                                "strategy.prune.structure=channel run, whose checkpoints hold "
                                "layers with fewer channels than the model built at start; "
                                "start a new run instead.")

    def configure_model(self, ctx: RunContext) -> None:
        system = ctx.system
        layers = conv_layers(system.backbone, "backbone")
        if not layers:
            raise EffbenchError(f"strategy.prune.structure=channel finds no conv layer in backbone "
                                f"{ctx.cfg.backbone.name}; use "
                                "strategy.prune.structure=unstructured.")
        self._example = example_batch(ctx.datamodule, self.latency_batch)
        with ctx.phase("compress"):
            # The unpruned model, kept for its latency next to the pruned one's at the end.
            self._before = self._measure(system)
        self._pruner = ChannelPruning(system, layers, self._example, self.final_sparsity,
                                      self.initial_sparsity, self.power, self.start, self.end,
                                      self.unit, self.frequency, self.mode)

    def _measure(self, system: nn.Module) -> dict[str, Any]:
        """Parameters, MACs (one image), state-dict bytes and a CPU copy of backbone + head."""
        assert self._example is not None
        model = copy.deepcopy(nn.Sequential(system.backbone, system.head)).cpu().eval()
        return {"params": sum(p.numel() for p in system.parameters()),
                "macs": count_macs(model, self._example[:1]),
                "size_bytes": state_dict_bytes(system), "model": model}

    def headline(self, summary: dict[str, Any]) -> str | None:
        s, m = self.facts(summary), summary["model"]
        done = "" if s.get("schedule_completed") else " (schedule NOT completed)"
        speed = m.get("speedup") or 0
        verdict = f"{speed:.2f}× faster" if speed >= 1 else f"{1 / speed:.2f}× SLOWER" if speed \
            else "n/a"
        return (f"channels removed {s.get('channel_sparsity', 0):.1%} (target "
                f"{self.final_sparsity:.0%}){done}   params {m['params_before']:,} → "
                f"{m['params_after']:,}   MACs {m['macs_before'] / 1e6:.1f} M → "
                f"{m['macs_after'] / 1e6:.1f} M   size {m['size_bytes_before'] / 2**20:.2f} MB → "
                f"{m['size_bytes_structured'] / 2**20:.2f} MB   CPU latency "
                f"{m['latency_ms_before']:.1f} ms → {m['latency_ms_after']:.1f} ms ({verdict}, "
                f"batch {self.latency_batch})")

    def settle(self, ctx: RunContext) -> None:
        assert self._pruner is not None
        # Nothing to make permanent (the channels are gone); what the pruned model is, is
        # recorded now, before a later technique rebuilds it.
        if not self._after:
            with ctx.phase("compress"):
                self._after = self._measure(ctx.system)
            self._pruner.release()

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        pruner = self._pruner
        assert isinstance(pruner, ChannelPruning) and self._example is not None
        self.settle(ctx)
        before, after = self._before, self._after
        with ctx.phase("latency"):  # side by side, same input, same threads
            before_ms = cpu_latency_ms(before["model"], self._example, self.latency_min_time)
            after_ms = cpu_latency_ms(after["model"], self._example, self.latency_min_time)
        sparsity = pruner.sparsity()
        return {
            "pruned_layers": len(pruner.layers),
            "channel_sparsity": sparsity,
            "channels_per_layer": {n: [c, int(pruner.layers[n].out_channels)]
                                   for n, c in pruner.initial_channels.items()},
            **self._schedule_facts(pruner),
            "latency": {"batch": self.latency_batch, "threads": torch.get_num_threads(),
                        "input": list(self._example.shape[1:]), "device": "cpu"},
            "model": {"params_before": before["params"], "params_after": after["params"],
                      "macs_before": before["macs"], "macs_after": after["macs"],
                      "size_bytes_before": before["size_bytes"],
                      "size_bytes_structured": after["size_bytes"],
                      "latency_ms_before": before_ms, "latency_ms_after": after_ms,
                      "speedup": before_ms / after_ms, "channel_sparsity": sparsity},
        }
