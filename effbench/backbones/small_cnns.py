"""The two small CNNs of the studies, built for square ``image_size`` RGB inputs (default 32)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from effbench.backbones.base import Backbone, Preprocessing
from effbench.errors import EffbenchError

DEFAULT_IMAGE_SIZE = 32
# Both networks are trained from scratch on inputs scaled to [-1, 1].
_HALF = (0.5, 0.5, 0.5)


def _preprocessing(size: int) -> Preprocessing:
    return Preprocessing(crop_size=size, resize_size=size, mean=_HALF, std=_HALF,
                         source="effbench: [-1, 1] scaling (trained from scratch)")


def _image_size(name: str, image_size: int | None, minimum: int, pretrained: bool) -> int:
    if pretrained:
        raise EffbenchError(f"{name} has no ImageNet weights; set backbone.weights=null (random "
                            f"init) or backbone.weights=/path/to/state_dict.pt (a local file).")
    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    if size < minimum:
        raise EffbenchError(f"{name} needs dataset.image_size >= {minimum}, got {size}.")
    return size


def _conv_relu(c_in: int, c_out: int, stride: int = 1, batch_norm: bool = False) -> list[nn.Module]:
    conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not batch_norm)
    norm = [nn.BatchNorm2d(c_out)] if batch_norm else []
    return [conv, *norm, nn.ReLU(inplace=True)]


def small_cnn(image_size: int | None = None, pretrained: bool = False) -> Backbone:
    """2 conv + Dense(512) CNN of the CIFAR-10 transfer-learning study (2,122,186 parameters with
    a Linear(512, 10) head at 32 px). Stages: conv block 1, conv block 2, flatten + dense."""
    size = _image_size("small_cnn", image_size, 4, pretrained)
    side = size // 4  # two 2x2 max-pools
    stages = [
        nn.Sequential(*_conv_relu(3, 32), nn.MaxPool2d(2)),
        nn.Sequential(*_conv_relu(32, 64), nn.MaxPool2d(2)),
        nn.Sequential(nn.Flatten(1), nn.Linear(64 * side * side, 512), nn.ReLU(inplace=True)),
    ]
    return Backbone("small_cnn", stages, 512, _preprocessing(size))


def _conv_group(c_in: int, c_out: int, n: int, first_stride: int = 1,
                batch_norm: bool = True) -> list[nn.Module]:
    layers = _conv_relu(c_in, c_out, first_stride, batch_norm=batch_norm)
    for _ in range(n - 1):
        layers += _conv_relu(c_out, c_out, batch_norm=batch_norm)
    return layers


def cifar_cnn14(image_size: int | None = None, pretrained: bool = False,
                batch_norm: bool = True) -> Backbone:
    """14-conv CIFAR-10 CNN of the data-subsampling study (002): 3x32 | pool | 4x64 | pool |
    4x128 (first stride 2) | pool | 3x128 | global average pool; one stage per group.

    ``batch_norm=False`` is the study's network as published (Table 1: conv + bias + ReLU,
    1,109,322 parameters with a Linear(128, 10) head). ``batch_norm=True`` (the default, a
    deliberate deviation) follows every conv with BatchNorm2d (and drops its bias), because a
    plain 14-conv ReLU stack trains poorly from scratch within the few epochs of cheap runs.
    """
    if not isinstance(batch_norm, bool):
        raise EffbenchError(f"backbone.batch_norm={batch_norm} must be true or false.")
    size = _image_size("cifar_cnn14", image_size, 16, pretrained)  # /16 before the last group
    bn = batch_norm
    stages = [
        nn.Sequential(*_conv_group(3, 32, 3, batch_norm=bn), nn.MaxPool2d(2)),
        nn.Sequential(*_conv_group(32, 64, 4, batch_norm=bn), nn.MaxPool2d(2)),
        nn.Sequential(*_conv_group(64, 128, 4, first_stride=2, batch_norm=bn), nn.MaxPool2d(2)),
        nn.Sequential(*_conv_group(128, 128, 3, batch_norm=bn), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(1)),
    ]
    return Backbone("cifar_cnn14", stages, 128, _preprocessing(size))


SMALL_CNNS: dict[str, Callable[..., Backbone]] = {
    "small_cnn": small_cnn,
    "cifar_cnn14": cifar_cnn14,
}
