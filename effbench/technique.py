"""The technique contract: a self-contained plug-in on one shared pipeline (DESIGN.md §5).

A technique is one class in ``effbench/techniques/<name>.py`` or ``effbench/techniques/<name>/``
that registers itself (:func:`register`), selected by ``conf/strategy/<name>.yaml`` (its keys
under ``<name>:``); ``strategy=[a,b]`` stacks several. Like Composer's algorithms and
Lightning's callbacks, each technique declares what it changes (``acts_on``) and what it needs
(``needs``, ``requires_precision``); effbench/stack.py resolves a stack from these declarations
(order, compatibility, the precision) in one place, and effbench/pipeline.py runs its phases,
calling each technique's hook for the phase:

``check`` → ``configure_model`` (model surgery) → **fit** (the shared Lightning fit with every
technique's ``callbacks``, or the ``fit`` of the one technique that ``replaces_loop``) →
**settle** (``settle``: changes made permanent) → **refit** (``refit``: a second training phase)
→ **finalize** (``finalize``: its own facts, under ``summary.strategy.<name>``) → **save**
(``saved_model``: the form of the model kept in ``<run>/model/``).

No technique calls the pipeline or another technique's hooks: what a phase needs from the
pipeline is handed to the hook (``refit``'s ``train``). The training recipe (optimizer,
scheduler, early stopping, checkpoint) is not a technique's: it is the ``optim`` config group.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytorch_lightning.callbacks import Callback

from effbench.errors import EffbenchError

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from torch import nn

    from effbench.context import RunContext
    from effbench.data.base import ImageDataModule
    from effbench.model.saved import SavedModel

# ``train(callbacks, subdir, **trainer_overrides)``: one more fit + test with the run's recipe.
Train = Callable[..., None]

# What a technique may change. Two techniques that both own a "sampling" or a "loop" conflict.
# "batch": the training batch before the forward (``system.train_batch_transforms``); several
# such changes compose, in the stack's order.
ACTS_ON = ("model", "loss", "callbacks", "sampling", "loop", "checkpoint", "export", "batch")
EXCLUSIVE = ("sampling", "loop")


class Technique:
    """Base: a technique that changes nothing (the plain recipe, the baseline)."""

    name = "technique"
    order = 50                                   # place in a stack: earlier acts first
    acts_on: frozenset[str] = frozenset()
    # "backbone_grad": gradients flow through the backbone (training the backbone's weights).
    needs: frozenset[str] = frozenset()
    replaces_loop = False
    # Model changes made through hooks (masks) that a graph export cannot carry until ``settle``
    # makes them permanent: a later model-rebuilding technique waits for it (its ``refit``).
    reparametrizes = False
    # Which weights train changes during the fit (a technique exporting a graph cannot follow).
    unfreezes_during_fit = False
    # BatchNorm layers held in eval mode during training (a graph that folds them cannot).
    holds_batchnorm_in_eval = False
    # Weights set to zero for good: the saved model is sparse (stored by its nonzeros).
    sparsifies = False
    # The precision this technique needs (None: any); the hardware plan uses it instead of the
    # preset's and refuses an explicit trainer.precision that differs.
    requires_precision: str | None = None
    # Trainer arguments honoured (None: all — training goes through Lightning's fit). A technique
    # with its own loop lists what it honours; any other trainer.* set is refused.
    trainer_keys: frozenset[str] | None = None

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self.name = name

    # -- composition ----------------------------------------------------------------------------
    def incompatible(self, other: Technique) -> str | None:
        """Why this technique cannot run with ``other`` (None: they stack)."""
        return None

    # -- hooks ----------------------------------------------------------------------------------
    def check(self, ctx: RunContext) -> None:
        """Refuse options that cannot take effect in this run (before anything trains)."""

    def configure_model(self, ctx: RunContext) -> None:
        """Change the model before training (stop layers training, insert fake-quant, …). Default:
        nothing."""

    def callbacks(self, ctx: RunContext) -> list[Callback]:
        """Lightning callbacks this technique acts through during the shared fit."""
        return []

    def settle(self, ctx: RunContext) -> None:
        """Phase *settle*: make this technique's model changes permanent (masks → zeros), before
        any ``refit`` rebuilds the model and before ``finalize``; must be idempotent."""

    def kept_zeros(self) -> list[tuple[Any, Any]]:
        """(parameter, boolean mask) pairs this technique fixed at zero (after ``settle``); the
        pipeline keeps them zero in every later training phase."""
        return []

    def refit(self, ctx: RunContext, train: Train) -> None:
        """Phase *refit*, after every technique settled: a second training phase of this
        technique's own (``train(callbacks, subdir, **trainer_overrides)``). Default: none."""

    def fit(self, ctx: RunContext) -> None:
        """Only for a technique that ``replaces_loop``."""
        raise NotImplementedError(f"{self.name} does not replace the training loop")

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        """After testing: make changes permanent, measure, return this technique's facts (a
        ``"model"`` entry is merged into ``summary["model"]``)."""
        return {}

    def cached_parts(self, cfg: DictConfig) -> tuple[nn.Module, ImageDataModule] | None:
        """Before anything is built: a technique that can serve the whole job from a cache
        (a feature-cache index hit) returns a stand-in backbone and a labels-only datamodule, so
        no image is decoded and no backbone built. None: build as usual."""
        return None

    def saved_model(self, ctx: RunContext) -> SavedModel | None:
        """After ``finalize``: the form in which this technique's model is kept in
        ``<run>/model/`` (compressed, int8, …). None: the technique leaves the
        model's form alone. The last technique of the stack that returns one decides; when none
        does, backbone + head are saved as they are (effbench/model/saved.py)."""
        return None

    def headline(self, summary: dict[str, Any]) -> str | None:
        """One line for the end-of-run report: the outcome of the technique itself.
        ``summary["strategy"][self.name]`` holds this technique's facts."""
        return None

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def facts(self, summary: dict[str, Any]) -> dict[str, Any]:
        """This technique's own entry of a summary."""
        return summary.get("strategy", {}).get(self.name, {})


# -- the registry (timm's ``register_model``): every technique class, by name -------------------
_REGISTRY: dict[str, type[Technique]] = {}


def register(cls: type[Technique]) -> type[Technique]:
    """Class decorator: ``cls`` is the technique ``cls.name`` (``conf/strategy/<name>.yaml``)."""
    if _REGISTRY.get(cls.name, cls) is not cls:
        raise EffbenchError(f"two techniques are named {cls.name!r}: "
                            f"{_REGISTRY[cls.name].__module__} and {cls.__module__}")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Technique]]:
    """Every technique: each module of ``effbench.techniques`` (a package's ``technique``
    module) is imported once, and registers its class."""
    # A plugin scan, not a dependency: the contract knows the folder, never a technique.
    folder = Path(__file__).with_name("techniques")
    for info in pkgutil.iter_modules([str(folder)]):
        name = f"{__package__}.techniques.{info.name}"
        importlib.import_module(f"{name}.technique" if info.ispkg else name)
    return dict(sorted(_REGISTRY.items()))


def technique_class(name: str) -> type[Technique]:
    """The registered class called ``name``; an unknown name is refused with the closest ones."""
    known = registered()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise EffbenchError(f"no technique is called {name!r}{hint}; the techniques: "
                            f"{', '.join(known)}.")
    return known[name]
