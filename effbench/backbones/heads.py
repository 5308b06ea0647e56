"""Classification heads on top of a backbone's features (``backbone.head`` in the config).

``type: linear`` (the default) is one ``nn.Linear(feature_dim, num_classes)`` — the head effbench
always used; ``type: mlp`` adds hidden layers, e.g. ``hidden: [256]`` is the Keras-style
``Dense(256, relu) -> Dense(num_classes)`` of the CIFAR-10 transfer-learning study. ``dropout``
is applied before every Linear layer after the first hidden activation (and, for ``linear``,
before the single Linear), as torchvision's classifiers do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from effbench.errors import EffbenchError

HEAD_TYPES = ("linear", "mlp")
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "hardswish": nn.Hardswish,
}


@dataclass(frozen=True)
class HeadSpec:
    type: str = "linear"
    hidden: tuple[int, ...] = field(default_factory=tuple)
    dropout: float = 0.0
    activation: str = "relu"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> HeadSpec:
        """Check ``backbone.head`` (a mapping or None) and make a spec; bad values: one sentence."""
        if cfg is None:
            return cls()
        if not isinstance(cfg, Mapping):
            raise EffbenchError(f"backbone.head must be a mapping like {{type: mlp, hidden: [256]}}"
                                f", got {cfg!r}.")
        unknown = sorted(set(cfg) - {"type", "hidden", "dropout", "activation"})
        if unknown:
            raise EffbenchError(f"backbone.head.{unknown[0]} is not a head option; the options are "
                                f"type, hidden, dropout and activation.")
        kind = str(cfg.get("type", "linear")).lower()
        if kind not in HEAD_TYPES:
            raise EffbenchError(f"backbone.head.type={kind} is not a head type; use linear or mlp.")
        hidden = cfg.get("hidden") or ()
        if isinstance(hidden, (int, str)) or not isinstance(hidden, Sequence):
            hidden = (hidden,)
        try:
            hidden = tuple(int(h) for h in hidden)
        except (TypeError, ValueError):
            raise EffbenchError(f"backbone.head.hidden={list(hidden)} must be a list of layer "
                                f"widths, e.g. [256].") from None
        if any(h < 1 for h in hidden):
            raise EffbenchError(f"backbone.head.hidden={list(hidden)} must hold positive widths.")
        if kind == "linear":
            hidden = ()  # a linear head has no hidden layers, whatever ``hidden`` holds
        elif not hidden:
            raise EffbenchError("backbone.head.type=mlp needs hidden layers, e.g. "
                                "backbone.head.hidden=[256]; or use backbone.head.type=linear.")
        dropout = float(cfg.get("dropout", 0.0) or 0.0)
        if not 0.0 <= dropout < 1.0:
            raise EffbenchError(f"backbone.head.dropout={dropout} must be in [0, 1).")
        activation = str(cfg.get("activation", "relu")).lower()
        if activation not in ACTIVATIONS:
            raise EffbenchError(f"backbone.head.activation={activation} is not supported; use one "
                                f"of {', '.join(ACTIVATIONS)}.")
        return cls(kind, hidden, dropout, activation)

    def build(self, in_features: int, num_classes: int) -> nn.Module:
        """``in_features -> num_classes``; the default spec is a bare ``nn.Linear`` (so its
        state-dict keys are ``weight``/``bias``, as in every checkpoint effbench wrote before)."""
        if self.type == "linear":
            linear = nn.Linear(in_features, num_classes)
            return nn.Sequential(nn.Dropout(self.dropout), linear) if self.dropout else linear
        layers: list[nn.Module] = []
        width = in_features
        for i, h in enumerate(self.hidden):
            if i and self.dropout:
                layers.append(nn.Dropout(self.dropout))
            layers += [nn.Linear(width, h), ACTIVATIONS[self.activation]()]
            width = h
        if self.dropout:
            layers.append(nn.Dropout(self.dropout))
        layers.append(nn.Linear(width, num_classes))
        return nn.Sequential(*layers)

    def describe(self) -> dict[str, Any]:
        return {"type": self.type, "hidden": list(self.hidden), "dropout": self.dropout,
                "activation": self.activation}


def head_params(feature_dim: int, num_classes: int, spec: HeadSpec | None = None) -> int:
    """Parameters of the head ``spec`` would build (without building it)."""
    spec = spec or HeadSpec()
    widths = [feature_dim, *spec.hidden, num_classes]
    return sum(a * b + b for a, b in zip(widths, widths[1:]))
