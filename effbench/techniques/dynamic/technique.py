"""``dynamic``: train on a subset A of α images, resampled when validation accuracy stalls.

The dynamic-training study (CIFAR-10, 14-conv CNN): the base scheme replaces a fraction β of A by
unseen images whenever the epoch-to-epoch accuracy change is below δ (``trigger``: ``|Δ| < δ`` or
``Δ < δ``, the study's two readings; δ = 0.01 is one percentage point); the ``adaptive`` variant
distinguishes type-I (no gain: resample the current A) and type-II (small gain: resample the best
set A* with β = γⁿ·β₀). Controls: ``alpha=1.0`` (full set), ``resample=false`` (fixed subset).
The logic lives in :mod:`.sampling`; this class wires it into the shared fit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pytorch_lightning.callbacks import Callback

from effbench.errors import EffbenchError
from effbench.technique import Technique, register
from effbench.techniques.dynamic.sampling import DynamicSampling, SubsetSchedule, resolve_alpha

if TYPE_CHECKING:
    from effbench.context import RunContext


@register
class Dynamic(Technique):
    """Selective-adaptive sampling of the training split (base scheme or adaptive variant)."""

    name = "dynamic"
    order = 20
    acts_on = frozenset({"sampling", "callbacks"})

    def __init__(self, name: str = "dynamic", variant: str = "base", alpha: float | int = 0.5,
                 beta: float = 0.7, delta: float = 0.01, gamma: float = 0.97,
                 resample: bool = True, decay_all: bool = False, metric: str = "val/acc",
                 trigger: str | None = None) -> None:
        super().__init__(name)
        self.trigger = trigger
        self.variant, self.alpha, self.beta = variant, alpha, float(beta)
        self.delta, self.gamma, self.resample = float(delta), float(gamma), bool(resample)
        self.decay_all, self.metric = bool(decay_all), metric
        self._sampling: DynamicSampling | None = None

    def configure_model(self, ctx: RunContext) -> None:
        """Builds A from the training split and makes the train loader iterate only A."""
        n_total = len(ctx.datamodule.labels["train"])
        seed = int(ctx.cfg.seed)
        schedule = SubsetSchedule(n_total, resolve_alpha(self.alpha, n_total), self.beta,
                                  self.delta, self.gamma, self.variant, self.resample,
                                  self.decay_all, seed=seed, trigger=self.trigger)
        self._sampling = DynamicSampling(schedule, self.metric, seed=seed)
        ctx.datamodule.train_sampler = self._sampling.sampler

    def callbacks(self, ctx: RunContext) -> list[Callback]:
        if self._sampling is None:
            raise EffbenchError("strategy=dynamic needs configure_model(ctx) before callbacks(); "
                                "run it through effbench.run.")
        return [self._sampling]

    def headline(self, summary: dict[str, Any]) -> str | None:
        s = self.facts(summary)
        return (f"subset {s.get('subset_size')} of {s.get('train_size')} images   images trained "
                f"{s.get('images_trained'):,}   resamples {s.get('resamples')}   seen "
                f"{(s.get('seen_fraction') or 0):.0%} of the training set")

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        facts = self._sampling.schedule.summary() if self._sampling else {}
        return {**facts, "images_trained": ctx.record.total_images()}
