"""Any timm model as an effbench ``Backbone`` (``backbone=timm backbone.name=<model>``).

The model is created by ``timm.create_model`` (``pretrained=True`` for ``weights: imagenet``: the
default pretrained tag of that name, or the tag given as ``name.tag``), its classifier is removed
with ``reset_classifier(0)``, and its preprocessing comes from its ``pretrained_cfg`` (mean, std,
input size, crop_pct, interpolation). Stages follow timm's ``feature_info``: a stage ends at each
feature module (``layer1``, ``blocks.3``, ``stages.2``, ...), the stem is stage 0, and the last
stage also holds the head side up to the pre-logits features. How the stages run (a chain of
modules, or the model's own forward with a hook for the frozen prefix) is decided by
:mod:`effbench.backbones.generic`.

``classifier_layers``: ``keep`` = timm's pre-logits features (``forward_head(pre_logits=True)``,
e.g. MobileNetV3's 1280-wide ``conv_head``, ConvNeXt's head norm); ``drop`` = global average
pooling of ``forward_features`` (960 for MobileNetV3-Large). Models whose features are tokens, not a
feature map (ViT), have nothing to drop: ``drop`` = ``keep`` for them.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from effbench.backbones import generic
from effbench.backbones.base import Backbone, Preprocessing
from effbench.errors import EffbenchError


def _timm():
    try:
        import timm
    except ImportError as err:  # pragma: no cover - timm is a dependency
        raise EffbenchError("backbone=timm needs the timm package; install it with "
                            "pip install timm.") from err
    return timm


@lru_cache(maxsize=1)
def timm_models() -> tuple[str, ...]:
    return tuple(_timm().list_models())


def check_name(name: str) -> str:
    timm = _timm()
    if name and timm.is_model(name):
        return name
    from effbench.backbones.registry import unknown_name

    raise unknown_name(name, timm_models(), "timm model", "backbone.name")


def preprocessing_of(model: nn.Module, image_size: int | None = None) -> Preprocessing:
    """mean/std, input size, crop_pct and interpolation from the model's ``pretrained_cfg``."""
    timm = _timm()
    cfg = timm.data.resolve_model_data_config(model)
    crop = int(cfg["input_size"][-1])
    tag = getattr(model, "pretrained_cfg", {}) or {}
    arch = tag.get("architecture", "")
    label = f"{arch}.{tag['tag']}" if arch and tag.get("tag") else arch
    pre = Preprocessing(crop_size=crop, resize_size=generic.resize_for(crop, cfg.get("crop_pct")),
                        mean=tuple(float(v) for v in cfg["mean"]),
                        std=tuple(float(v) for v in cfg["std"]),
                        interpolation=str(cfg.get("interpolation", "bicubic")),
                        source=f"timm pretrained_cfg {label}".strip())
    return pre.with_size(image_size)


def _create(name: str, pretrained: bool) -> nn.Module:
    timm = _timm()
    if not pretrained:
        return timm.create_model(name, pretrained=False)
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as err:
        # Offline, no cache, corrupt download or a name without pretrained weights: the fixes are
        # the same for the user.
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        reason = f"{type(err).__name__}: {first}"
        raise EffbenchError(
            f"Could not fetch timm's pretrained weights for {name} ({reason}); download them once "
            f"with network access (Hugging Face cache, $HF_HOME), or set backbone.weights=null "
            f"(random init) or backbone.weights=/path/to/state_dict.pt (a local file)."
        ) from err


class TimmFeatures:
    """Runner: ``forward_features`` then timm's pre-logits head (keep) or a global pool (drop)."""

    def __init__(self, pool: nn.Module | None = None) -> None:
        self.pool = pool

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        features = model.forward_features(x)
        if self.pool is not None:
            return self.pool(features)
        return model.forward_head(features, pre_logits=True)


def _feature_ends(model: nn.Module, units: list[generic.Unit]) -> set[str]:
    """The units where timm's ``feature_info`` modules end (where a stage ends): the unit that is
    or holds the feature module, or the last unit inside it (``layer1`` opened into its blocks)."""
    names = [info.get("module", "") for info in getattr(model, "feature_info", None) or []]
    ends = set()
    for fname in names:
        inside = [u for u, _ in units if u.startswith(fname + ".")]
        if inside:
            ends.add(inside[-1])
            continue
        ends.update(u for u, _ in units if fname == u or fname.startswith(u + "."))
    return ends


def build_timm_backbone(name: str, image_size: int | None = None, pretrained: bool = False,
                        classifier_layers: str = "keep") -> Backbone:
    """timm model ``name`` as a Backbone (see the module docstring)."""
    from effbench.backbones.torchvision_models import check_classifier_layers

    drop = check_classifier_layers(classifier_layers) == "drop"
    check_name(name)
    model = _create(name, pretrained)
    model.reset_classifier(0)
    pre = preprocessing_of(model, image_size)
    units = generic.module_units(model)
    ends = _feature_ends(model, units)
    features = generic.trace(model, units, model.forward_features,
                             generic.probe_sizes(image_size, pre_native(model)))
    generic.check_size(name, features, image_size)
    pool = None
    if drop and features.output.ndim == 4:
        timm = _timm()
        pool = timm.layers.SelectAdaptivePool2d(pool_type="avg", flatten=True,
                                                input_fmt=getattr(model, "output_fmt", "NCHW"))
    runner = TimmFeatures(pool)
    full = generic.trace(model, units, lambda x: runner(model, x), (features.size,))
    ordered = full.called_in_order(units)
    body = [u for u in ordered if u[0] in features.calls]
    head_side = [u for u in ordered if u[0] not in features.calls]
    dim = int(full.output.shape[1])
    chain = None
    if features.each_called_once() and full.each_called_once():
        chain = generic.chain_tail(body, features, model, [list])  # body alone = forward_features
    if chain is not None:
        tail: list[generic.Unit] = [("pool", pool)] if pool is not None else [
            ("head", generic.OwnerCall(model, "forward_head", head_side, pre_logits=True))]
        groups = generic.split_groups(generic.merge_empty(generic.group_after(body, ends)))
        stages = [generic.sequential_stage(g) for g in groups[:-1]]
        stages.append(generic.sequential_stage(groups[-1] + tail))
        backbone: Backbone = Backbone(name, stages, dim, pre)
    else:
        groups = generic.split_groups(generic.merge_empty(generic.group_after(ordered, ends)))
        groups = generic.merge_interleaved(groups, full.calls)
        backbone = generic.DrivenBackbone(name, model, runner, groups, dim, pre, extra=pool)
    # The classifier timm removed: its keys in a timm state dict are ignored when loading one.
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "fc"
    classifiers = [classifier] if isinstance(classifier, str) else list(classifier)
    generic.add_load_pre_hook(backbone, generic.foreign_keys(
        model, backbone, [f"{n}." for n in classifiers]))
    backbone.source = "timm"
    backbone.classifier_layers = classifier_layers
    return backbone


def pre_native(model: nn.Module) -> int:
    return int(_timm().data.resolve_model_data_config(model)["input_size"][-1])
