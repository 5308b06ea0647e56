"""torchvision classifiers re-expressed as effbench ``Backbone``s.

The torchvision model is built as usual, then its modules (the very same objects, so weights are
shared) are regrouped into ordered stages and the final classification layer is left out, because
effbench adds its own head. The families effbench has always had are cut by a splitter registered
for their class (``SPLITTERS``: ResNet, DenseNet, MobileNetV2/V3, EfficientNet, VGG), so
ResNet-101/152, VGG-19 or EfficientNet-B3 need no new code; every other torchvision classification
model (``backbone=torchvision backbone.name=<any>``) is cut from its children by
:mod:`effbench.backbones.generic`.

``classifier_layers``: ``keep`` keeps the layers between the global pooling and the final Linear
(VGG's two 4096-wide FC layers after a 7x7 pooling, MobileNetV3's 1280-wide layer), as effbench
always did; ``drop`` ends every model at global average pooling of the last feature map (Keras'
``include_top=False, pooling="avg"``): VGG-16 then has 14.7 M parameters instead of 134.3 M.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torchvision import models
from torchvision.models import VGG, DenseNet, EfficientNet, MobileNetV2, MobileNetV3, ResNet

from effbench.backbones import generic
from effbench.backbones.base import Backbone, Preprocessing
from effbench.backbones.generic import ForeignKeys
from effbench.errors import EffbenchError

# The named torchvision backbones (conf/backbone/<arch>.yaml); any other torchvision
# classification model is reachable with backbone=torchvision backbone.name=<arch>.
ARCHS = (
    "resnet18",
    "resnet50",
    "resnet101",
    "resnet152",
    "densenet121",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "efficientnet_b3",
    "vgg16",
    "vgg19",
)
CLASSIFIER_LAYERS = ("keep", "drop")

# A stage part: the dotted name of one of the model's submodules, or a new (parameter-free) module.
Part = str | tuple[str, nn.Module]

# Kept for code that imported the older, torchvision-only name of the key-renaming hook.
TorchvisionKeys = ForeignKeys


def classification_models() -> list[str]:
    """torchvision's classification models (not detection, segmentation, video, quantized)."""
    return sorted(models.list_models(module=models))


@dataclass
class Split:
    """A torchvision model cut into stages, plus the classification layer left out of them."""

    stages: list[nn.Module]
    head: nn.Module
    feature_dim: int | None = None  # None: the head's in_features


def _stage(model: nn.Module, parts: Iterable[Part]) -> nn.Sequential:
    # Dotted torchvision names become ``_`` names, so stage state-dict keys stay recognisable.
    named = [(p.replace(".", "_"), model.get_submodule(p)) if isinstance(p, str) else p
             for p in parts]
    return nn.Sequential(OrderedDict(named))


def _flatten() -> tuple[str, nn.Module]:
    return ("flatten", nn.Flatten(1))


def _pool() -> tuple[str, nn.Module]:
    return ("avgpool", nn.AdaptiveAvgPool2d(1))


def _downsamples(block: nn.Module) -> bool:
    return any(max(m.stride) > 1 for m in block.modules() if isinstance(m, nn.Conv2d))


def _resolution_groups(model: nn.Module, names: list[str]) -> list[list[str]]:
    """Consecutive blocks grouped by resolution: a block with a strided conv opens a new group."""
    groups: list[list[str]] = []
    for name in names:
        if not groups or _downsamples(model.get_submodule(name)):
            groups.append([])
        groups[-1].append(name)
    return groups


def _by_resolution(model: nn.Module, tail: list[Part]) -> list[nn.Module]:
    """MobileNet / EfficientNet: ``features[0]`` is the stem, the other feature blocks are grouped
    by resolution, and the last group also gets the ``tail`` (pooling, flatten, ...)."""
    blocks = [f"features.{i}" for i in range(1, len(model.features))]
    groups = _resolution_groups(model, blocks)
    stages = [_stage(model, ["features.0"])]
    stages += [_stage(model, group) for group in groups[:-1]]
    stages.append(_stage(model, [*groups[-1], *tail]))
    return stages


def _all_but_last(model: nn.Module, sequential: str) -> list[Part]:
    return [f"{sequential}.{i}" for i in range(len(model.get_submodule(sequential)) - 1)]


def _split_resnet(model: ResNet, drop: bool = False) -> Split:
    stages = [_stage(model, ["conv1", "bn1", "relu", "maxpool"])]
    stages += [_stage(model, [f"layer{i}"]) for i in (1, 2, 3)]
    stages.append(_stage(model, ["layer4", "avgpool", _flatten()]))
    return Split(stages, model.fc)


def _split_densenet(model: DenseNet, drop: bool = False) -> Split:
    stages = [_stage(model, [f"features.{n}" for n in ("conv0", "norm0", "relu0", "pool0")])]
    stages += [_stage(model, [f"features.denseblock{i}", f"features.transition{i}"])
               for i in (1, 2, 3)]
    # DenseNet.forward applies the final ReLU and pooling functionally; here they are modules.
    tail: list[Part] = [("relu", nn.ReLU(inplace=True)), _pool(), _flatten()]
    stages.append(_stage(model, ["features.denseblock4", "features.norm5", *tail]))
    return Split(stages, model.classifier)


def _split_mobilenet_v2(model: MobileNetV2, drop: bool = False) -> Split:
    # MobileNetV2 pools functionally; its classifier (Dropout, Linear) is all head.
    return Split(_by_resolution(model, [_pool(), _flatten()]), model.classifier[-1])


def _split_mobilenet_v3(model: MobileNetV3, drop: bool = False) -> Split:
    # keep: classifier[:-1] (Linear, Hardswish, Dropout) is part of the features: 1280 / 1024
    # dims; drop: the features end at the pooled last conv (960 / 576), as Keras' MobileNetV3.
    if drop:
        return Split(_by_resolution(model, ["avgpool", _flatten()]), model.classifier[-1],
                     model.classifier[0].in_features)
    tail = ["avgpool", _flatten(), *_all_but_last(model, "classifier")]
    return Split(_by_resolution(model, tail), model.classifier[-1])


def _split_efficientnet(model: EfficientNet, drop: bool = False) -> Split:
    # The classifier (Dropout, Linear) is all head.
    return Split(_by_resolution(model, ["avgpool", _flatten()]), model.classifier[-1])


def _split_vgg(model: VGG, drop: bool = False) -> Split:
    """Five conv blocks, each ending at its MaxPool; keep: the last also gets the 7x7 pooling and
    classifier[:-1] (4096 dims); drop: global average pooling of the 512 channels instead."""
    groups: list[list[Part]] = [[]]
    for i, layer in enumerate(model.features):
        groups[-1].append(f"features.{i}")
        if isinstance(layer, nn.MaxPool2d):
            groups.append([])
    groups = [g for g in groups if g]
    if drop:
        groups[-1] += [_pool(), _flatten()]
        channels = [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)][-1]
        return Split([_stage(model, g) for g in groups], model.classifier[-1], channels)
    groups[-1] += ["avgpool", _flatten(), *_all_but_last(model, "classifier")]
    return Split([_stage(model, g) for g in groups], model.classifier[-1])


SPLITTERS: dict[type[nn.Module], Callable[..., Split]] = {
    ResNet: _split_resnet,
    DenseNet: _split_densenet,
    MobileNetV2: _split_mobilenet_v2,
    MobileNetV3: _split_mobilenet_v3,
    EfficientNet: _split_efficientnet,
    VGG: _split_vgg,
}


def _splitter(model: nn.Module) -> Callable[..., Split] | None:
    for cls in type(model).__mro__:
        if cls in SPLITTERS:
            return SPLITTERS[cls]
    return None


def split_model(model: nn.Module, drop: bool = False) -> Split:
    """Cut a torchvision classifier into stages with the splitter registered for its class."""
    splitter = _splitter(model)
    if splitter is None:
        known = ", ".join(c.__name__ for c in SPLITTERS)
        raise EffbenchError(f"torchvision model class {type(model).__name__} has no stage "
                            f"splitter; supported classes are {known} (any other model: "
                            f"build_torchvision_backbone cuts it generically).")
    return splitter(model, drop=drop)


def preprocessing_for(arch: str, image_size: int | None = None) -> Preprocessing:
    """The preprocessing of torchvision's DEFAULT weights (metadata only: nothing is downloaded)."""
    t = models.get_model_weights(arch).DEFAULT.transforms()
    interpolation = getattr(getattr(t, "interpolation", None), "value", "bilinear")
    pre = Preprocessing(crop_size=int(t.crop_size[0]), resize_size=int(t.resize_size[0]),
                        mean=tuple(t.mean), std=tuple(t.std), interpolation=str(interpolation),
                        source=f"torchvision weights {models.get_model_weights(arch).DEFAULT}")
    return pre.with_size(image_size)


def _build_model(arch: str, pretrained: bool) -> nn.Module:
    if not pretrained:
        return _without_aux(models.get_model(arch, weights=None, **_no_aux_kwargs(arch)))
    try:
        model = models.get_model(arch, weights=models.get_model_weights(arch).DEFAULT)
    except Exception as err:
        # Offline (URLError), disk (OSError), corrupt or truncated download (RuntimeError, EOFError,
        # hash mismatch): whatever the cause, the user's fixes are the same.
        reason = f"{type(err).__name__}: {str(err).strip()[:200]}"
        raise EffbenchError(
            f"Could not fetch torchvision's ImageNet weights for {arch} into the torch cache "
            f"{torch.hub.get_dir()} ({reason}); download them there once with network access, "
            f"or set backbone.weights=null (random init) or "
            f"backbone.weights=/path/to/state_dict.pt (a local file)."
        ) from err
    return _without_aux(model)


def _no_aux_kwargs(arch: str) -> dict[str, Any]:
    # GoogLeNet / Inception-v3 train auxiliary classifiers; effbench trains one head.
    return {"aux_logits": False, "init_weights": True} if arch in ("googlenet", "inception_v3") \
        else {}


def _without_aux(model: nn.Module) -> nn.Module:
    if getattr(model, "aux_logits", False):  # pretrained GoogLeNet / Inception-v3 come with them
        model.aux_logits = False
        for name in ("AuxLogits", "aux1", "aux2"):
            if getattr(model, name, None) is not None:
                setattr(model, name, None)
    return model


# kept for callers of the older name
_imagenet_model = partial(_build_model, pretrained=True)


def _final_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """The layer that produces the 1,000 ImageNet logits (a Linear, or SqueezeNet's 1x1 conv)."""
    found = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)):
            out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            if out == 1000:
                found = (name, m)
    if found is None:
        raise EffbenchError(f"torchvision model {type(model).__name__} has no final layer with "
                            f"1,000 outputs to replace with effbench's head.")
    return found


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


class _ModelForward:
    """Runner of a driven torchvision backbone: the model's own forward (classifier = Identity)."""

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(model(x), 1)


_TAIL = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Linear)


def _classifier_side(ordered: list[generic.Unit]) -> int:
    """Index of the first unit at or after global pooling (pooling, flatten, Linear layers)."""
    for i, (_, m) in enumerate(ordered):
        if isinstance(m, _TAIL) or (isinstance(m, nn.Sequential) and len(m)
                                    and isinstance(m[0], _TAIL)):
            return i
    return len(ordered)


def _generic(arch: str, model: nn.Module, drop: bool, pre: Preprocessing,
             image_size: int | None = None) -> Backbone:
    """Any torchvision classifier, cut from its children (see effbench.backbones.generic)."""
    head_name, _ = _final_layer(model)
    _set_submodule(model, head_name, nn.Identity())
    units = generic.module_units(model)
    native = models.get_model_weights(arch).DEFAULT.transforms().crop_size[0]
    runner = _ModelForward()
    probe = generic.trace(model, units, lambda x: runner(model, x),
                          generic.probe_sizes(image_size, native))
    generic.check_size(arch, probe, image_size)
    ordered = probe.called_in_order(units)
    x = generic.probe_input(probe.size)
    chain, chained = None, ordered
    if probe.each_called_once():
        chain = generic.chain_tail(ordered, probe, model, _TAILS)
        if chain is None:  # flattened functionally after pooling (AlexNet): make it a module
            chained = _flatten_after_pool(ordered)
            chain = generic.chain_tail(chained, probe, model, _TAILS)
    if chain is None:  # not a chain of its children: run the model's own forward
        # (classifier_layers=drop changes nothing here: none of these models has layers between
        # its global pooling and the final layer)
        groups = generic.merge_interleaved(_torchvision_groups(ordered), probe.calls)
        backbone: Backbone = generic.DrivenBackbone(arch, model, runner, groups,
                                                    probe.output.shape[1], pre)
    else:
        body, tail = (chained[:_classifier_side(chained)], _gap_flatten()) if drop \
            else (chained, chain)
        out = generic.run_sequence([m for _, m in body + tail], x, model)
        groups = _torchvision_groups(body)
        stages = [generic.sequential_stage(g) for g in groups[:-1]]
        stages.append(generic.sequential_stage(groups[-1] + tail))
        backbone = Backbone(arch, stages, out.shape[1], pre)
    generic.add_load_pre_hook(backbone, generic.foreign_keys(model, backbone, [head_name + "."]))
    return backbone


def _flatten_after_pool(ordered: list[generic.Unit]) -> list[generic.Unit]:
    pools = [i for i, (_, m) in enumerate(ordered)
             if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))]
    if not pools:
        return ordered
    i = pools[-1] + 1
    return [*ordered[:i], ("flatten", nn.Flatten(1)), *ordered[i:]]


def _gap_flatten() -> list[generic.Unit]:
    return [("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten(1))]


# How a chain of units may end before the features: flattened already-pooled maps (most models),
# or a functional global pooling in the model's forward (ShuffleNetV2's mean over H, W).
_TAILS: tuple[Callable[[], list[generic.Unit]], ...] = (
    lambda: [("flatten", nn.Flatten(1))],
    _gap_flatten,
)


def _torchvision_groups(ordered: list[generic.Unit]) -> list[list[generic.Unit]]:
    return generic.split_groups(generic.merge_empty(generic.group_by_resolution(ordered)))


def build_torchvision_backbone(arch: str, image_size: int | None = None,
                               pretrained: bool = False, classifier_layers: str = "keep"
                               ) -> Backbone:
    """torchvision ``arch`` as a Backbone, with ImageNet weights if ``pretrained``.

    ``image_size`` only sets the preprocessing: every model here ends in adaptive pooling. The
    returned backbone's ``load_state_dict`` also accepts the torchvision model's state dict.
    """
    if arch not in classification_models():
        from effbench.backbones.registry import unknown_name

        raise unknown_name(arch, classification_models(), "torchvision classification model",
                           "backbone.name")
    drop = check_classifier_layers(classifier_layers) == "drop"
    model = _build_model(arch, pretrained)
    pre = preprocessing_for(arch, image_size)
    if _splitter(model) is None:
        backbone = _generic(arch, model, drop, pre, image_size)
    else:
        split = split_model(model, drop=drop)
        dim = split.feature_dim if split.feature_dim is not None else split.head.in_features
        backbone = Backbone(arch, split.stages, dim, pre)
        head_name = next(name for name, m in model.named_modules() if m is split.head)
        generic.add_load_pre_hook(backbone, generic.foreign_keys(model, backbone,
                                                                 [head_name + "."]))
    backbone.source = "torchvision"
    backbone.classifier_layers = classifier_layers
    return backbone


def check_classifier_layers(value: str) -> str:
    value = str(value).lower()
    if value not in CLASSIFIER_LAYERS:
        raise EffbenchError(f"backbone.classifier_layers={value} is not an option; use keep (the "
                            f"model's layers up to its final Linear) or drop (end at global "
                            f"average pooling, as Keras' include_top=False).")
    return value


def _add_load_pre_hook(module: nn.Module, hook: ForeignKeys) -> None:  # older name
    generic.add_load_pre_hook(module, hook)


TORCHVISION_BACKBONES: dict[str, Callable[..., Backbone]] = {
    arch: partial(build_torchvision_backbone, arch) for arch in ARCHS
}
