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

import copy
import importlib
import sys
import types
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


# -- pattern exports, remembered -------------------------------------------------------------------
# torchao builds every rewrite's patterns with ``torch.export`` on each call: the Conv-BN fusion
# and folding patterns (27 exports, ~5 s on the 2-core CPU, for a model with BatchNorm) and the
# dropout/BatchNorm train↔eval patterns behind ``model.train()`` / ``model.eval()`` of an
# exported model (6 exports a switch, ~0.5 s). A pattern's graph depends only on the pattern
# function (its code and the plain values it closes over) and on the example inputs' shapes,
# dtypes and devices, so one export per pattern serves every later QAT job of the process (a
# sweep with Hydra's basic launcher, an Optuna study): those jobs then skip them. Each use gets
# its own deep copy, so a rewrite can never change the remembered graph. torchao offers no cache;
# the helper is wrapped for the duration of a call, as above.
PATTERN_MODULES = ("torchao.quantization.pt2e.utils", "torchao.quantization.pt2e.qat_utils",
                   "torchao.quantization.pt2e.reference_representation_rewrite")
PATTERN_HELPER = "_get_aten_graph_module_for_pattern"
_exported: dict[tuple, torch.fx.GraphModule] = {}
_PLAIN = (bool, int, float, str, type(None), torch.dtype)


def _described(value: Any) -> Any:
    """What of an example input the exported pattern depends on; None where unknown."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type, value.requires_grad)
    return ("plain", value) if isinstance(value, _PLAIN) else None


def pattern_key(pattern: Any, example_inputs: tuple, is_cuda: bool,
                kwargs: dict[str, Any]) -> tuple | None:
    """The remembered export's key, or None where the pattern's graph could depend on more than
    the key holds (then it is exported as torchao does)."""
    fn = getattr(pattern, "fn", pattern)  # torchao wraps pattern functions in a module
    code = getattr(fn, "__code__", None)
    if code is None or fn.__defaults__ or fn.__kwdefaults__:
        return None
    if isinstance(pattern, torch.nn.Module) and any(True for _ in pattern.state_dict()):
        return None
    cells = []
    for cell in fn.__closure__ or ():
        value = cell.cell_contents
        if not (isinstance(value, _PLAIN) or callable(value) and hasattr(value, "__qualname__")):
            return None
        cells.append(value)  # a function closed over (F.conv2d) is compared by identity
    inputs = tuple(_described(x) for x in example_inputs)
    named = tuple(sorted((k, _described(v)) for k, v in kwargs.items()))
    if None in inputs or any(d is None for _, d in named):
        return None
    return code, tuple(cells), inputs, named, bool(is_cuda)


def _remembering(helper: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(pattern: Any, example_inputs: tuple, is_cuda: bool = False,
                **kwargs: Any) -> torch.fx.GraphModule:
        key = pattern_key(pattern, example_inputs, is_cuda, kwargs)
        if key is None:
            return helper(pattern, example_inputs, is_cuda, **kwargs)
        if key not in _exported:
            _exported[key] = helper(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(_exported[key])

    wrapped.effbench_remembers = True  # type: ignore[attr-defined]
    return wrapped


@contextmanager
def remembered_pattern_exports() -> Iterator[None]:
    """Within this block, torchao's pattern exports are made once per process (see above)."""
    modules = [sys.modules.get(name) or _imported(name) for name in PATTERN_MODULES]
    originals = [(m, getattr(m, PATTERN_HELPER)) for m in modules
                 if m is not None and hasattr(m, PATTERN_HELPER)]
    wrapped = [(m, h) for m, h in originals if not getattr(h, "effbench_remembers", False)]
    for module, helper in wrapped:
        setattr(module, PATTERN_HELPER, _remembering(helper))
    try:
        yield
    finally:
        for module, helper in wrapped:
            setattr(module, PATTERN_HELPER, helper)


def _imported(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def remembering_train_eval(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``model.train()`` / ``model.eval()`` of an exported model (torchao's
    ``allow_exported_model_train_eval``) with their pattern exports remembered. (A deep copy of
    a GraphModule keeps neither torchao's switch nor this one: ``convert_int8`` moves its copy to
    eval itself.)"""
    for name in ("train", "eval"):
        method = getattr(model, name)
        if isinstance(method, types.MethodType) and method.__self__ is model:
            setattr(model, name, types.MethodType(_within_remembered(method.__func__), model))
    return model


def _within_remembered(fn: Callable[..., Any]) -> Callable[..., Any]:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        with remembered_pattern_exports():
            return fn(self, *args, **kwargs)

    return method
