"""Running a PT2E-converted int8 graph on x86 CPUs: what quantization measures and evaluates, and
what a saved int8 model is rebuilt into (effbench/model/saved.py): both compute the same numbers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from effbench.task import is_multilabel


def lower_x86(converted: torch.fx.GraphModule, example: torch.Tensor) -> torch.fx.GraphModule:
    """oneDNN int8 kernels; the lowered graph is specialised to ``example``'s shape."""
    # torchao registers its x86 int8 fusions (dequantize → conv → quantize into
    # onednn.qconv_pointwise on prepacked int8 weights) with inductor's freezing passes only when
    # its X86InductorQuantizer module is imported. A process that quantizes imports it; one that
    # only loads a saved model (effbench-eval) did not, and its lowering kept fp32 convolutions of
    # dequantized weights: another model than the one the run measured (probabilities 1e-6 off on
    # one CPU, an argmax off on another). Imported here, every lowering fuses alike.
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
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


def x86_quantizer(scope: str, fake_quant: bool) -> Any:
    """torchao's x86 int8 quantizer (per-channel symmetric weights, per-tensor activations) for
    the conv layers (``scope=conv``) or every conv and linear (``all``); ``fake_quant``: the
    config of quantization-aware training, else static post-training quantization."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    config = get_default_x86_inductor_quantization_config(is_qat=fake_quant)
    quantizer = X86InductorQuantizer()
    if scope == "all":
        return quantizer.set_global(config)
    return quantizer.set_module_type_qconfig(nn.Conv2d, config)


def drop_unused_tensors(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Removes parameters/buffers the graph no longer reads (conversion leaves the fp32 originals
    of the int8 weights behind), so the state dict holds what inference needs."""
    used = {n.target for n in graph.graph.nodes if n.op == "get_attr"}
    named = [*graph.named_parameters(), *graph.named_buffers()]
    for name, _ in named:
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            delattr(graph.get_submodule(owner) if owner else graph, leaf)
    return graph


def agreement(a: torch.Tensor, b: torch.Tensor, task: str) -> float:
    """Fraction of samples whose predicted label(s) are identical under both logits."""
    if is_multilabel(task):
        return float(((a > 0) == (b > 0)).all(dim=1).float().mean())
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def quantized_weight_bytes(float_model: nn.Module, scope: str) -> int:
    """fp32 bytes of the weights the scope quantizes (what int8 shrinks fourfold)."""
    types = (nn.Conv2d,) if scope == "conv" else (nn.Conv2d, nn.Linear)
    return sum(m.weight.numel() * 4 for m in float_model.modules() if isinstance(m, types))
