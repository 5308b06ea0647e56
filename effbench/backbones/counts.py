"""Parameter counts as Keras reports them, to compare effbench models with the Keras studies.

PyTorch counts trainable tensors only; Keras' ``count_params()`` also counts BatchNormalization's
moving mean and variance (2 per channel, "non-trainable params"). Keras' ResNet (v1) convs also
carry a bias before every BatchNorm (``Conv2D`` default ``use_bias=True``), which torchvision's
ResNet leaves out (``bias=False``): with ``conv_bias=True`` those are counted too. See
docs/backbones.md for the study's nine backbones.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def bn_moving_stats(module: nn.Module) -> int:
    """Moving mean + variance entries of every BatchNorm (Keras counts them as parameters)."""
    return sum(2 * m.num_features for m in module.modules()
               if isinstance(m, _BatchNorm) and m.track_running_stats)


def missing_conv_biases(module: nn.Module) -> int:
    """Bias entries the bias-free convolutions would have (Keras ResNet convs have them)."""
    return sum(m.out_channels for m in module.modules()
               if isinstance(m, nn.Conv2d) and m.bias is None)


def keras_param_count(module: nn.Module, conv_bias: bool = False) -> int:
    """``module``'s parameters counted the Keras way (see the module docstring)."""
    params = sum(p.numel() for p in module.parameters())
    return params + bn_moving_stats(module) + (missing_conv_biases(module) if conv_bias else 0)
