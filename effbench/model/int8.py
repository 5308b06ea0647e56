"""Running a PT2E-converted int8 graph on x86 CPUs: what quantization measures and evaluates, and
what a saved int8 model is rebuilt into (effbench/model/saved.py): both compute the same numbers."""

from __future__ import annotations

import torch
from torch import nn


def lower_x86(converted: torch.fx.GraphModule, example: torch.Tensor) -> torch.fx.GraphModule:
    """oneDNN int8 kernels; the lowered graph is specialised to ``example``'s shape."""
    from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86

    with torch.no_grad():
        lowered = lower_pt2e_quantized_to_x86(converted, (example,))
    # oneDNN's int8 convolutions may hand back channels-last tensors, which ``flatten``'s exported
    # ``view`` cannot take; ``reshape`` is the same op where a view is possible.
    for node in lowered.graph.nodes:
        if node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
    lowered.recompile()
    return lowered


def padded_forward(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    """Runs a fixed-batch model on ``x`` of any length (the last chunk padded by repetition)."""
    outs = []
    for chunk in x.split(batch):
        n = len(chunk)
        if n < batch:
            chunk = torch.cat([chunk, chunk[-1:].expand(batch - n, *chunk.shape[1:])])
        outs.append(model(chunk)[:n])
    return torch.cat(outs)


class FixedBatch(nn.Module):
    """A lowered int8 graph (fixed batch size) that takes batches of any length."""

    def __init__(self, lowered: nn.Module, batch: int) -> None:
        super().__init__()
        self.lowered, self.batch = lowered, int(batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return padded_forward(self.lowered, x, self.batch)

    def train(self, mode: bool = True) -> FixedBatch:
        # An exported graph refuses train()/eval() (it has no train mode: it is inference only).
        self.training = mode
        return self
