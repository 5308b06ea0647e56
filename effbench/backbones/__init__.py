"""Backbones by name: ``build_backbone`` is what ``conf/backbone/*.yaml`` instantiate.

Three sources, one factory:

* the named backbones of ``BACKBONES`` (``backbone=resnet50``, ``backbone=cifar_cnn14``, ...);
* ``source="torchvision"``: any torchvision classification model (``backbone=torchvision
  backbone.name=resnet101``);
* ``source="timm"``: any timm model (``backbone=timm backbone.name=convnext_atto``).

Every builder takes ``image_size`` and ``pretrained`` (the source's ImageNet weights); weights
from a local file are loaded here, the same way for every backbone. ``normalize=False`` feeds the
network plain [0, 1] inputs, ``classifier_layers`` keeps or drops the layers between global
pooling and the final Linear, and ``head`` configures ``Backbone.build_head``.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from effbench.backbones.base import Backbone, Preprocessing
from effbench.backbones.heads import HeadSpec
from effbench.backbones.registry import unknown_name
from effbench.backbones.small_cnns import SMALL_CNNS
from effbench.backbones.torchvision_models import (
    TORCHVISION_BACKBONES,
    build_torchvision_backbone,
    check_classifier_layers,
)
from effbench.errors import EffbenchError

__all__ = ["BACKBONES", "SOURCES", "Backbone", "HeadSpec", "Preprocessing", "build_backbone",
           "load_weights_file"]

BACKBONES: dict[str, Callable[..., Backbone]] = {**TORCHVISION_BACKBONES, **SMALL_CNNS}


def _timm_backbone(name: str, **kwargs: Any) -> Backbone:
    from effbench.backbones.timm_models import build_timm_backbone  # timm loads only when used

    return build_timm_backbone(name, **kwargs)


# backbone.source → builder(name, image_size=, pretrained=, classifier_layers=)
SOURCES: dict[str, Callable[..., Backbone]] = {
    "torchvision": build_torchvision_backbone,
    "timm": _timm_backbone,
}

IMAGENET = "imagenet"
_NO_WEIGHTS = {"", "null", "none"}
_SHOWN = 3  # how many offending keys an error message lists


def build_backbone(name: str | None, weights: str | os.PathLike | None = None,
                   image_size: int | None = None, source: str | None = None,
                   normalize: bool = True, classifier_layers: str = "keep",
                   head: Mapping[str, Any] | None = None, **options: Any) -> Backbone:
    """Build backbone ``name``; ``weights`` is ``"imagenet"``, ``None``/``"null"`` (random init)
    or the path of a state dict (the source model's, or effbench's ``backbone.state_dict()``).

    ``source`` None looks ``name`` up in ``BACKBONES``; ``"torchvision"``/``"timm"`` take any model
    of that library. ``options`` go to the named builder (``batch_norm`` for cifar_cnn14).
    """
    spec = None if weights is None or str(weights).strip().lower() in _NO_WEIGHTS else str(weights)
    pretrained = spec is not None and spec.lower() == IMAGENET
    head_spec = HeadSpec.from_config(head)
    layers = check_classifier_layers(classifier_layers)
    backbone = _build(name, source, image_size, pretrained, layers, options)
    if spec is not None and not pretrained:
        load_weights_file(backbone, Path(spec).expanduser())
    backbone.weights = spec
    backbone.head_spec = head_spec
    if not _flag(normalize, "backbone.normalize"):
        backbone.preprocessing = backbone.preprocessing.without_normalization()
    return backbone


def _build(name: str | None, source: str | None, image_size: int | None, pretrained: bool,
           layers: str, options: dict[str, Any]) -> Backbone:
    if source is not None and str(source).lower() not in ("", "null", "none"):
        src = str(source).lower()
        if src not in SOURCES:
            raise unknown_name(src, SOURCES, "backbone source", "backbone.source")
        if not name:
            example = "resnet101" if src == "torchvision" else "convnext_atto"
            raise EffbenchError(f"backbone={src} needs a model name: set "
                                f"backbone.name=<{src} model>, e.g. backbone.name={example}.")
        if options:
            key = sorted(options)[0]
            raise EffbenchError(f"backbone.{key} is not an option of {src} backbones; remove "
                                f"backbone.{key}=… .")
        return SOURCES[src](str(name), image_size=image_size, pretrained=pretrained,
                            classifier_layers=layers)
    builder = BACKBONES.get(str(name))
    if builder is None:
        err = unknown_name(str(name), BACKBONES, "backbone", "backbone.name")
        from effbench.backbones.torchvision_models import classification_models

        if str(name) in classification_models():
            err = EffbenchError(f"{str(err).rstrip('.')}; {name} is a torchvision model: use "
                                f"backbone=torchvision backbone.name={name}.")
        raise err
    accepted = inspect.signature(builder).parameters
    for key in sorted(options):
        if key not in accepted:
            raise EffbenchError(f"backbone.{key} is not an option of backbone {name}; remove "
                                f"backbone.{key}=… .")
    kwargs = dict(options)
    if "classifier_layers" in accepted:
        kwargs["classifier_layers"] = layers
    backbone = builder(image_size=image_size, pretrained=pretrained, **kwargs)
    backbone.classifier_layers = layers
    return backbone


def _flag(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise EffbenchError(f"{key}={value} must be true or false.")


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
        if path.suffix == ".safetensors":  # timm / Hugging Face checkpoints
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # torch.load reports corrupt, truncated or non-tensor (weights_only) files through many
        # exception types; for the user they all mean "not a readable state dict".
        raise EffbenchError(f"Weights file {path} could not be read as a state dict "
                            f"({type(err).__name__}: {_first_line(err)}); {hint}.") from err
    if not isinstance(state, Mapping):
        raise EffbenchError(f"Weights file {path} holds a {type(state).__name__}, not a state "
                            f"dict; {hint}.")
    return _backbone_of_checkpoint(state)


def _backbone_of_checkpoint(state: Mapping) -> Mapping[str, torch.Tensor]:
    """An effbench run's Lightning checkpoint (``<run>/checkpoints/best.ckpt``) → its backbone's
    state dict: pretrain on one dataset, transfer to another (``backbone.weights=<ckpt>``).
    Pruning's re-parametrised weights (``weight_orig`` × ``weight_mask``) are folded back."""
    if not (isinstance(state.get("state_dict"), Mapping) and "epoch" in state):
        return state
    prefix = "backbone."
    inner = {k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    for key in [k for k in inner if k.endswith("weight_orig")]:
        base = key[: -len("_orig")]
        mask = inner.pop(base + "_mask", None)
        orig = inner.pop(key)
        inner[base] = orig * mask if mask is not None else orig
    return inner


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
