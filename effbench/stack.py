"""The stack of techniques of one run, resolved in one place (as Composer's ``passes.py``): built
from ``cfg.strategy`` (one or several), put in the order they act, checked for compatibility from
what each declares, and the one requirement they may impose on the hardware plan (precision)."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from effbench.errors import EffbenchError
from effbench.technique import EXCLUSIVE, Technique


def build_techniques(strategy: DictConfig) -> list[Technique]:
    """One object per selected technique (``strategy.<name>``), in the order they act."""
    techniques = []
    for name, node in strategy.items():
        t = instantiate(node, _convert_="all")
        if not isinstance(t, Technique):
            raise EffbenchError(f"strategy.{name}._target_ does not name an effbench technique; "
                                "use one of the options of `effbench --help`.")
        t.name = str(name)
        techniques.append(t)
    if not techniques:
        raise EffbenchError("strategy=[] selects no technique; use one of the options of "
                            "`effbench --help`.")
    return sorted(techniques, key=lambda t: t.order)


def check_compatible(techniques: list[Technique]) -> None:
    """Refuses an impossible stack with one sentence naming both techniques and why."""
    for i, a in enumerate(techniques):
        for b in techniques[i + 1:]:
            reason = a.incompatible(b) or b.incompatible(a) or _shared_exclusive(a, b)
            if reason:
                raise EffbenchError(f"strategy=[{a.name},{b.name}] cannot run together: {reason}; "
                                    "run them separately and compare.")
    needed = {t.requires_precision for t in techniques} - {None}
    if len(needed) > 1:
        raise EffbenchError(f"strategy=[{','.join(t.name for t in techniques)}] need different "
                            f"precisions ({', '.join(sorted(needed))}); run them separately.")


def _shared_exclusive(a: Technique, b: Technique) -> str | None:
    shared = set(a.acts_on) & set(b.acts_on) & set(EXCLUSIVE)
    if shared:
        what = shared.pop()
        return f"both replace the training {what}, and a run has only one"
    if (a.replaces_loop and b.acts_on) or (b.replaces_loop and a.acts_on):
        loop, other = (a, b) if a.replaces_loop else (b, a)
        if "backbone_grad" in other.needs:
            return (f"{other.name} needs gradients through the backbone, which {loop.name} "
                    "never computes (it trains a head on cached features)")
        return (f"{loop.name} trains in its own loop, where {other.name}'s "
                f"{'/'.join(sorted(other.acts_on))} changes would never act")
    return None


def requirement(techniques: list[Technique], attr: str) -> Any:
    """The first technique's declared ``attr`` that is set (None: no technique requires one)."""
    values = [getattr(t, attr) for t in techniques if getattr(t, attr) is not None]
    return values[0] if values else None


def loop_owner(techniques: list[Technique]) -> Technique | None:
    """The one technique that replaces the training loop (check_compatible allows one)."""
    return next((t for t in techniques if t.replaces_loop), None)
