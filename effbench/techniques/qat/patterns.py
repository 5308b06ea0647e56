"""Conv-BN pattern rewriting of torchao's QAT flow, limited to the convolution kinds in the graph.

``prepare_qat_pt2e`` (fusing Conv-BN for training) and ``convert_pt2e`` (folding BN back into the
int8 conv) rewrite the graph once per convolution kind — conv1d, conv2d, conv_transpose1d,
conv_transpose2d, and each again for CUDA where a GPU is present — and each rewrite first builds
its match and replacement patterns with ``torch.export`` (12 pattern pairs per kind at
conversion). That is ~100 exports whatever the model holds: measured on the 2-core CPU,
``convert`` took 16.0 s of a 27-s resnet18 ``strategy=qat`` run with 64 images, nearly all of it
exporting patterns for convolutions resnet18 does not have. A rewrite for a convolution kind
that is absent from the graph matches nothing, so it is skipped here: the same graph comes out
(``tests/techniques/test_qat.py`` compares the converted models with and without the skip).

torchao offers no option for this, so the two private helpers are wrapped for the duration of
one call; if a torchao release renames them, nothing is wrapped and the flow runs as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention

# The helpers torchao calls once per convolution kind (torchao.quantization.pt2e.qat_utils).
HELPERS = ("_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper")
# A convolution kind as the exported graph's aten op names it.
CONV_OPS = {F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv_transpose1d: "conv_transpose1d",
            F.conv_transpose2d: "conv_transpose2d"}


def conv_kinds(graph: torch.fx.GraphModule) -> set[str] | None:
    """The convolution kinds ``graph`` calls (``conv2d``, …), or None where a generic
    ``aten.convolution`` could be any of them (then nothing may be skipped)."""
    ops = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    if any(op.startswith("aten.convolution") for op in ops):
        return None
    return {kind for kind in CONV_OPS.values() if any(op.startswith(f"aten.{kind}.") for op in ops)}


def _skipping(helper: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(m: torch.fx.GraphModule, conv_fn: Callable, *args: Any, **kwargs: Any) -> Any:
        kinds = conv_kinds(m)
        kind = CONV_OPS.get(conv_fn)
        if kinds is not None and kind is not None and kind not in kinds:
            return m  # no such convolution in the graph: the rewrite would match nothing
        return helper(m, conv_fn, *args, **kwargs)

    return wrapped


@contextmanager
def present_convolutions_only() -> Iterator[None]:
    """Within this block, torchao's QAT Conv-BN rewrites run only for convolution kinds present in
    the graph they rewrite (see the module docstring)."""
    try:
        from torchao.quantization.pt2e import qat_utils
    except ImportError:
        yield
        return
    originals = {name: getattr(qat_utils, name) for name in HELPERS if hasattr(qat_utils, name)}
    if len(originals) != len(HELPERS):
        yield
        return
    for name, helper in originals.items():
        setattr(qat_utils, name, _skipping(helper))
    try:
        yield
    finally:
        for name, helper in originals.items():
            setattr(qat_utils, name, helper)
