"""Backbones by name: ``build_backbone`` is what ``conf/backbone/*.yaml`` instantiate.

Every builder in ``BACKBONES`` takes ``image_size`` and ``pretrained`` (ImageNet weights); weights
from a local file are loaded here, the same way for every backbone.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from effbench.backbones.base import Backbone, Preprocessing
from effbench.backbones.small_cnns import SMALL_CNNS
from effbench.backbones.torchvision_models import TORCHVISION_BACKBONES
from effbench.errors import EffbenchError

__all__ = ["BACKBONES", "Backbone", "Preprocessing", "build_backbone", "load_weights_file"]

BACKBONES: dict[str, Callable[..., Backbone]] = {**TORCHVISION_BACKBONES, **SMALL_CNNS}

IMAGENET = "imagenet"
_NO_WEIGHTS = {"", "null", "none"}
_SHOWN = 3  # how many offending keys an error message lists


def build_backbone(name: str, weights: str | os.PathLike | None = None,
                   image_size: int | None = None) -> Backbone:
    """Build backbone ``name``; ``weights`` is ``"imagenet"``, ``None``/``"null"`` (random init)
    or the path of a state dict (torchvision's model or effbench's ``backbone.state_dict()``)."""
    builder = BACKBONES.get(name)
    if builder is None:
        raise EffbenchError(f"Unknown backbone {name!r}; valid backbones are "
                            f"{', '.join(sorted(BACKBONES))}.")
    spec = None if weights is None or str(weights).strip().lower() in _NO_WEIGHTS else str(weights)
    pretrained = spec is not None and spec.lower() == IMAGENET
    backbone = builder(image_size=image_size, pretrained=pretrained)
    if spec is not None and not pretrained:
        load_weights_file(backbone, Path(spec).expanduser())
    backbone.weights = spec
    return backbone


def load_weights_file(backbone: Backbone, path: Path) -> None:
    """Load a state-dict file into ``backbone``; an EffbenchError says what did not fit."""
    try:
        result = backbone.load_state_dict(_read_state_dict(backbone.name, path), strict=False)
    except RuntimeError as err:  # shape mismatches are raised even with strict=False
        problems = [_size_mismatches(str(err))]
    else:
        problems = [_listing("missing keys", result.missing_keys),
                    _listing("unexpected keys", result.unexpected_keys)]
    problems = [p for p in problems if p]
    if problems:
        raise EffbenchError(f"Weights file {path} does not fit backbone {backbone.name} "
                            f"({'; '.join(problems)}); it must be a state dict for "
                            f"{backbone.name}, e.g. saved with "
                            f"torch.save(backbone.state_dict(), path).")


def _read_state_dict(name: str, path: Path) -> Mapping[str, torch.Tensor]:
    hint = f"backbone.weights must be imagenet, null or the path of a state dict for {name}"
    if not path.is_file():
        raise EffbenchError(f"Weights file {path} does not exist; {hint}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # torch.load reports corrupt, truncated or non-tensor (weights_only) files through many
        # exception types; for the user they all mean "not a readable state dict".
        raise EffbenchError(f"Weights file {path} could not be read as a state dict "
                            f"({type(err).__name__}: {_first_line(err)}); {hint}.") from err
    if not isinstance(state, Mapping):
        raise EffbenchError(f"Weights file {path} holds a {type(state).__name__}, not a state "
                            f"dict; {hint}.")
    return state


def _first_line(err: BaseException) -> str:
    # torch's load errors run to several paragraphs; the first line names the problem.
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def _listing(what: str, keys: Sequence[str]) -> str:
    if not keys:
        return ""
    more = f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else ""
    return f"{what}: {', '.join(keys[:_SHOWN])}{more}"


_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape "
                            r"torch\.Size\((\[.*?\])\) from checkpoint, the shape in current model "
                            r"is torch\.Size\((\[.*?\])\)")


def _size_mismatches(message: str) -> str:
    found = [f"{k} is {file} in the file but {model} in the backbone"
             for k, file, model in _SIZE_MISMATCH.findall(message)]
    if not found:  # some other load error: its first detail line says enough
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        return lines[-1] if lines else message
    return _listing("shape mismatches", found)
