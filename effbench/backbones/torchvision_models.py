"""torchvision classifiers re-expressed as effbench ``Backbone``s.

The torchvision model is built as usual, then its modules (the very same objects, so weights are
shared) are regrouped into ordered stages and the final classification ``Linear`` is left out,
because effbench adds its own head. How a model is cut depends only on its torchvision class
(``SPLITTERS``), so another architecture of a known family needs no new code.
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

from effbench.backbones.base import Backbone, Preprocessing
from effbench.errors import EffbenchError

ARCHS = (
    "resnet18",
    "resnet50",
    "densenet121",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "vgg16",
)

# A stage part: the dotted name of one of the model's submodules, or a new (parameter-free) module.
Part = str | tuple[str, nn.Module]


@dataclass
class Split:
    """A torchvision model cut into stages, plus the classification ``Linear`` left out of them."""

    stages: list[nn.Module]
    head: nn.Linear


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


def _split_resnet(model: ResNet) -> Split:
    stages = [_stage(model, ["conv1", "bn1", "relu", "maxpool"])]
    stages += [_stage(model, [f"layer{i}"]) for i in (1, 2, 3)]
    stages.append(_stage(model, ["layer4", "avgpool", _flatten()]))
    return Split(stages, model.fc)


def _split_densenet(model: DenseNet) -> Split:
    stages = [_stage(model, [f"features.{n}" for n in ("conv0", "norm0", "relu0", "pool0")])]
    stages += [_stage(model, [f"features.denseblock{i}", f"features.transition{i}"])
               for i in (1, 2, 3)]
    # DenseNet.forward applies the final ReLU and pooling functionally; here they are modules.
    tail: list[Part] = [("relu", nn.ReLU(inplace=True)), _pool(), _flatten()]
    stages.append(_stage(model, ["features.denseblock4", "features.norm5", *tail]))
    return Split(stages, model.classifier)


def _split_mobilenet_v2(model: MobileNetV2) -> Split:
    # MobileNetV2 pools functionally; its classifier (Dropout, Linear) is all head.
    return Split(_by_resolution(model, [_pool(), _flatten()]), model.classifier[-1])


def _split_mobilenet_v3(model: MobileNetV3) -> Split:
    # classifier[:-1] (Linear, Hardswish, Dropout) is part of the features: 1280 / 1024 dims.
    tail = ["avgpool", _flatten(), *_all_but_last(model, "classifier")]
    return Split(_by_resolution(model, tail), model.classifier[-1])


def _split_efficientnet(model: EfficientNet) -> Split:
    # The classifier (Dropout, Linear) is all head.
    return Split(_by_resolution(model, ["avgpool", _flatten()]), model.classifier[-1])


def _split_vgg(model: VGG) -> Split:
    """Five conv blocks, each ending at its MaxPool; the last also gets classifier[:-1] (4096)."""
    groups: list[list[Part]] = [[]]
    for i, layer in enumerate(model.features):
        groups[-1].append(f"features.{i}")
        if isinstance(layer, nn.MaxPool2d):
            groups.append([])
    groups = [g for g in groups if g]
    groups[-1] += ["avgpool", _flatten(), *_all_but_last(model, "classifier")]
    return Split([_stage(model, g) for g in groups], model.classifier[-1])


SPLITTERS: dict[type[nn.Module], Callable[[Any], Split]] = {
    ResNet: _split_resnet,
    DenseNet: _split_densenet,
    MobileNetV2: _split_mobilenet_v2,
    MobileNetV3: _split_mobilenet_v3,
    EfficientNet: _split_efficientnet,
    VGG: _split_vgg,
}


def split_model(model: nn.Module) -> Split:
    """Cut a torchvision classifier into stages with the splitter registered for its class."""
    for cls in type(model).__mro__:
        if cls in SPLITTERS:
            return SPLITTERS[cls](model)
    known = ", ".join(c.__name__ for c in SPLITTERS)
    raise EffbenchError(f"torchvision model class {type(model).__name__} has no stage splitter; "
                        f"supported classes are {known}.")


class TorchvisionKeys:
    """``load_state_dict`` pre-hook that lets a Backbone load its torchvision model's state dict:
    torchvision keys are renamed to the backbone's and the dropped head's keys are ignored.
    (A class rather than a closure, so that backbones stay picklable and deep-copyable.)"""

    def __init__(self, aliases: dict[str, str], head_prefix: str) -> None:
        self.aliases = aliases
        self.head_prefix = head_prefix

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str,
                 *_: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            local = key[len(prefix):]
            if local in self.aliases:
                state_dict[prefix + self.aliases[local]] = state_dict.pop(key)
            elif local.startswith(self.head_prefix):
                del state_dict[key]


def _torchvision_keys(model: nn.Module, backbone: Backbone, head: nn.Linear) -> TorchvisionKeys:
    # The backbone holds the model's own tensors, so identical tensors pair up the two key sets.
    backbone_key = {id(t): k for k, t in backbone.state_dict(keep_vars=True).items()}
    aliases = {k: backbone_key[id(t)] for k, t in model.state_dict(keep_vars=True).items()
               if id(t) in backbone_key}
    head_name = next(name for name, m in model.named_modules() if m is head)
    return TorchvisionKeys(aliases, head_name + ".")


def preprocessing_for(arch: str, image_size: int | None = None) -> Preprocessing:
    """The preprocessing of torchvision's DEFAULT weights (metadata only: nothing is downloaded)."""
    t = models.get_model_weights(arch).DEFAULT.transforms()
    pre = Preprocessing(crop_size=int(t.crop_size[0]), resize_size=int(t.resize_size[0]),
                        mean=tuple(t.mean), std=tuple(t.std))
    return pre.with_size(image_size)


def _imagenet_model(arch: str) -> nn.Module:
    try:
        return models.get_model(arch, weights=models.get_model_weights(arch).DEFAULT)
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


def build_torchvision_backbone(arch: str, image_size: int | None = None,
                               pretrained: bool = False) -> Backbone:
    """torchvision ``arch`` as a Backbone, with ImageNet weights if ``pretrained``.

    ``image_size`` only sets the preprocessing: every model here ends in adaptive pooling. The
    returned backbone's ``load_state_dict`` also accepts the torchvision model's state dict.
    """
    model = _imagenet_model(arch) if pretrained else models.get_model(arch, weights=None)
    split = split_model(model)
    backbone = Backbone(arch, split.stages, split.head.in_features,
                        preprocessing_for(arch, image_size))
    _add_load_pre_hook(backbone, _torchvision_keys(model, backbone, split.head))
    return backbone


def _add_load_pre_hook(module: nn.Module, hook: TorchvisionKeys) -> None:
    # The public API arrived in torch 2.5; the private one (same hook signature with
    # with_module=True) covers torch 2.4, which pyproject still allows.
    register = getattr(module, "register_load_state_dict_pre_hook", None)
    if register is None:
        register = partial(module._register_load_state_dict_pre_hook, with_module=True)
    register(hook)


TORCHVISION_BACKBONES: dict[str, Callable[..., Backbone]] = {
    arch: partial(build_torchvision_backbone, arch) for arch in ARCHS
}
