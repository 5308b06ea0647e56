"""The conversions of ``ptq``: the trained network as a float copy, static int8 PT2E quantization
calibrated on a few batches, and the float16 cast.

int8 is the stack ``qat`` uses (torchao's PT2E flow with the ``X86InductorQuantizer``), without
training in between: ``torch.export`` in eval mode → ``prepare_pt2e`` (observers; Conv-BN pairs
folded first, the model being in eval mode) → calibration (the observers record activation ranges)
→ ``convert_pt2e`` (int8 weights, fixed activation scales). The lowering to oneDNN kernels is
effbench/model/int8.py's, shared with qat and the saved model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

# Shared with qat rather than copied: the converted graph must be pruned of its fp32 originals
# the same way in both, or their sizes would not compare.
from effbench.model.int8 import drop_unused_tensors, x86_quantizer

SCOPES = ("conv", "all")


def float_network(system: nn.Module) -> nn.Module:
    """An fp32 eval-mode copy of backbone → head on CPU: the reference every figure compares
    with, and what is converted (the run's own system is left as it was tested)."""
    network = copy.deepcopy(nn.Sequential(system.backbone, system.head)).float().cpu().eval()
    # A frozen prefix runs under no_grad, which export cannot partition for quantization; in
    # eval-mode inference it changes nothing, so the copy runs it plainly.
    if getattr(network[0], "frozen_prefix", 0):
        network[0].frozen_prefix = 0
    return network


def prepare_int8(network: nn.Module, example: torch.Tensor, scope: str) -> torch.fx.GraphModule:
    """The network exported (eval mode, dynamic batch) with observers for ``scope``."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    batch = torch.export.Dim("batch", min=2)
    # strict=True for the reason qat gives: a module called twice (ResNet's relu) stays two
    # quantization partitions.
    graph = torch.export.export(network.eval(), (example,), dynamic_shapes=({0: batch},),
                                strict=True).module()
    return prepare_pt2e(graph, x86_quantizer(scope, fake_quant=False))


def calibrate(prepared: torch.fx.GraphModule, batches: Iterable[torch.Tensor]) -> tuple[int, int]:
    """Runs every batch through the observers; returns (batches, images) fed."""
    count = images = 0
    with torch.no_grad():
        for x in batches:
            # The export's batch dimension starts at 2; a repeated single image adds no range.
            prepared(x if len(x) > 1 else x.repeat(2, 1, 1, 1))
            count, images = count + 1, images + len(x)
    return count, images


def convert_int8(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """int8 weights and fixed activation scales; only the tensors inference reads are kept."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    return drop_unused_tensors(convert_pt2e(prepared))


class HalfNetwork(nn.Module):
    """The network with every floating tensor in float16, computing in float16 (the study's
    16-bit model); takes and returns float32 like the network it replaces."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = copy.deepcopy(network).half().eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x.half()).float()
