"""``mixup``: each training batch is mixed with itself, mixup (Zhang et al. 2018, "mixup: Beyond
Empirical Risk Minimization") and/or cutmix (Yun et al. 2019, "CutMix"); timm's ``Mixup``, as
Composer's ``MixUp`` and ``CutMix``.

Image ``i`` of a batch of ``N`` is mixed with image ``N-1-i`` (timm's pairing: the batch
reversed). Mixup blends ``λ·x + (1-λ)·x'``; cutmix pastes a box of ``x'`` into ``x`` and λ is the
share of ``x`` left outside it (timm corrects λ for a box clipped by the border). λ ~ Beta(α, α)
is drawn per batch (``mode=batch``), per pair or per image, and applied with probability
``prob``; with both α set, cutmix is chosen with probability ``switch_prob``. The targets are
mixed in the same proportion, ``λ·y + (1-λ)·y'``: one-hot vectors for single-label data, the
multi-hot vectors for multi-label data (timm's ``mixup_target``, ``multi_label=True``).

Only training batches are mixed (``system.train_batch_transforms``): validation (the loss that
picks the best checkpoint and stops early) and testing see the true images and labels. The run's
own loss takes the soft targets: cross-entropy (class weights, sample weights) is linear in the
target, so its loss is exactly λ·loss(y) + (1-λ)·loss(y'); CheXNet's weighted BCE takes each
label's weight from the mixed target, as it does for label smoothing's.

timm pairs images two by two and needs an even batch: an odd batch (a split that does not divide
by the batch size ends in one) has its first N-1 images mixed and its last one left as it is,
counted in the facts (``odd_batches``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from timm.data import Mixup
from timm.data.mixup import mixup_target

from effbench.errors import EffbenchError
from effbench.task import is_multilabel
from effbench.technique import Technique, register

if TYPE_CHECKING:
    from effbench.context import RunContext

MODES = ("batch", "pair", "elem")
COUNTS = ("batches", "batches_mixed", "odd_batches", "images", "images_mixed")


def mix_images(mixer: Mixup, x: torch.Tensor) -> torch.Tensor:
    """Mixes the even batch ``x`` in place as timm's ``Mixup.__call__`` does; returns λ per image
    (1: left as it is). ``__call__`` returns the mixed targets but not λ, which the facts record
    and the targets of the odd batch's last image need: the same dispatch, keeping it."""
    if mixer.mode == "elem":
        lam = mixer._mix_elem(x)
    elif mixer.mode == "pair":
        lam = mixer._mix_pair(x)
    else:
        lam = mixer._mix_batch(x)
    if isinstance(lam, torch.Tensor):
        return lam.detach().float().flatten()  # per image (elem, pair), on x's device
    return torch.full((len(x),), float(lam), device=x.device)


class MixBatch(Callback):
    """The transform of every training batch (``system.train_batch_transforms``) and, as a
    callback, its counts kept in checkpoints: a resumed run counts the batches before the
    interruption too."""

    def __init__(self, mixer: Mixup) -> None:
        self.mixer = mixer
        self.counts: dict[str, int] = dict.fromkeys(COUNTS, 0)
        self.lambda_sum = 0.0                      # over the mixed images
        self.last_lambda: torch.Tensor | None = None  # per image of the last batch (tests)
        self._loaded: dict[str, Any] | None = None
        # (batches mixed, images mixed, λ sum) not yet read back, where λ lives: reading them
        # every step would make the host wait for the GPU once a step (elem/pair λ is a device
        # tensor); the facts and each checkpoint read them (``_settle``).
        self._pending: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(x) - len(x) % 2  # timm mixes pairs: an odd batch's last image stays unmixed
        lam = torch.ones(len(x), device=x.device)
        if n:
            lam[:n] = mix_images(self.mixer, x[:n])  # x[:n] is a view: x is mixed in place
        m = self.mixer
        target = mixup_target(y, m.num_classes, 1.0, 0.0, m.multi_label)  # one/multi-hot
        if n:
            target[:n] = mixup_target(y[:n], m.num_classes, lam[:n, None], 0.0, m.multi_label)
        self._count(lam, odd=n < len(x))
        return x, target

    def _count(self, lam: torch.Tensor, odd: bool) -> None:
        mixed = lam < 1
        c = self.counts
        c["batches"] += 1
        c["odd_batches"] += int(odd)
        c["images"] += len(lam)
        # λ of an unmixed image is 1: masking by multiplication (boolean indexing would sync).
        step = torch.stack([mixed.any(), mixed.sum(), (lam * mixed).sum()]).double()
        self._pending = step if self._pending is None else self._pending + step
        self.last_lambda = lam

    def _settle(self) -> None:
        if self._pending is not None:
            batches, images, lam_sum = self._pending.tolist()
            self.counts["batches_mixed"] += int(batches)
            self.counts["images_mixed"] += int(images)
            self.lambda_sum += lam_sum
            self._pending = None

    def facts(self) -> dict[str, Any]:
        self._settle()
        c = self.counts
        mean = self.lambda_sum / c["images_mixed"] if c["images_mixed"] else None
        return {**c, "batches_not_mixed": c["batches"] - c["batches_mixed"],
                "mean_lambda": mean}

    def state_dict(self) -> dict[str, Any]:
        self._settle()
        return {**self.counts, "lambda_sum": self.lambda_sum}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning also restores callbacks when testing a checkpoint; only a resumed fit counts.
        self._loaded = dict(state_dict)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded:
            self.counts = {k: int(self._loaded.get(k, 0)) for k in COUNTS}
            self.lambda_sum = float(self._loaded.get("lambda_sum", 0.0))
            self._loaded, self._pending = None, None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@register
class MixUp(Technique):
    """Mixup / cutmix of the training batches (see the module docstring)."""

    name = "mixup"
    order = 56  # after a technique that resizes the batch: the cutmix box is drawn at that size
    acts_on = frozenset({"batch", "callbacks"})

    def __init__(self, name: str = "mixup", mixup_alpha: float = 0.2, cutmix_alpha: float = 0.0,
                 prob: float = 1.0, switch_prob: float = 0.5, mode: str = "batch",
                 cutmix_minmax: list[float] | None = None, correct_lam: bool = True) -> None:
        super().__init__(name)
        for key, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if not _number(value) or value < 0:
                self._refuse(key, value, "must be a number >= 0 (the α of Beta(α, α); 0: off)")
        if not _number(prob) or not 0 < prob <= 1:
            self._refuse("prob", prob, "must be a probability in (0, 1], e.g. 1.0")
        if not _number(switch_prob) or not 0 <= switch_prob <= 1:
            self._refuse("switch_prob", switch_prob, "must be a probability in [0, 1], e.g. 0.5")
        if mode not in MODES:
            self._refuse("mode", mode, f"must be one of {', '.join(MODES)}")
        if not isinstance(correct_lam, bool):
            self._refuse("correct_lam", correct_lam, "must be true or false")
        self.cutmix_minmax = self._checked_minmax(cutmix_minmax)
        if not (mixup_alpha > 0 or cutmix_alpha > 0 or self.cutmix_minmax):
            raise EffbenchError(f"strategy.{self.name}.mixup_alpha=0 and "
                                f"strategy.{self.name}.cutmix_alpha=0 mix nothing: set "
                                f"strategy.{self.name}.mixup_alpha=0.2 (mixup) or "
                                f"strategy.{self.name}.cutmix_alpha=1.0 (cutmix).")
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob = float(prob), float(switch_prob)
        self.mode, self.correct_lam = mode, correct_lam
        self._batch: MixBatch | None = None

    def _refuse(self, key: str, value: Any, why: str) -> None:
        raise EffbenchError(f"strategy.{self.name}.{key}={value!r} {why}.")

    def _checked_minmax(self, value: Any) -> list[float] | None:
        if value is None:
            return None
        ok = isinstance(value, list | tuple) and len(value) == 2 and all(map(_number, value)) \
            and 0 < value[0] < value[1] <= 1
        if not ok:
            self._refuse("cutmix_minmax", value, "must be null or [low, high] with "
                         "0 < low < high <= 1, the range of the box's side as a share of the "
                         "image's, e.g. [0.4, 0.8]")
        return [float(v) for v in value]

    @property
    def mixes(self) -> str:
        cutmix = self.cutmix_alpha > 0 or self.cutmix_minmax is not None
        return {(True, True): "mixup or cutmix", (True, False): "mixup",
                (False, True): "cutmix"}[(self.mixup_alpha > 0, cutmix)]

    def check(self, ctx: RunContext) -> None:
        size = ctx.datamodule.batch_size
        if size < 2:
            raise EffbenchError(f"strategy={self.name} mixes each training image with another of "
                                f"its batch, and dataset.batch_size={size} has none: set "
                                "dataset.batch_size=2 or more.")

    def configure_model(self, ctx: RunContext) -> None:
        transforms = ctx.system.train_batch_transforms
        if self._batch is not None and self._batch in transforms:
            return  # configured already
        dm = ctx.datamodule
        # timm's own label smoothing is off: strategy=[mixup,label_smoothing] smooths the mix.
        mixer = Mixup(mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha,
                      cutmix_minmax=self.cutmix_minmax, prob=self.prob,
                      switch_prob=self.switch_prob, mode=self.mode,
                      correct_lam=self.correct_lam, label_smoothing=0.0,
                      num_classes=dm.num_classes, multi_label=is_multilabel(dm.task))
        self._batch = MixBatch(mixer)
        transforms.append(self._batch)

    def callbacks(self, ctx: RunContext) -> list[Callback]:
        if self._batch is None:
            raise EffbenchError(f"strategy={self.name} needs configure_model(ctx) before "
                                "callbacks(); run it through effbench.run.")
        return [self._batch]

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        facts = self._batch.facts() if self._batch else {}
        return {**facts, "mixes": self.mixes,
                "applies_to": "training batches (validation and test see the true images and "
                              "labels)"}

    def headline(self, summary: dict[str, Any]) -> str | None:
        s = self.facts(summary)
        mean = s.get("mean_lambda")
        odd = s.get("odd_batches") or 0
        return (f"{s.get('mixes', self.mixes)} of the training batches: {s.get('batches_mixed')} "
                f"of {s.get('batches')} batches mixed, mean λ "
                f"{'n/a' if mean is None else f'{mean:.2f}'}"
                f"{f' ({odd} odd batches: last image unmixed)' if odd else ''}; validation and "
                "test unmixed")
