"""An exported (PT2E-converted) FX graph as plain JSON + its tensors, and back.

Why not ``torch.export.save``/``load``: its loader falls back to ``torch.load(weights_only=False)``
(pickle) when a weights entry does not load safely, resolves a node's target by ``getattr`` on
the ``torch`` module (any public function: ``torch.load``, ``torch.hub.load``) and parses
symbolic shapes with sympy (``eval``). A file from outside must never run code, so this format
holds only what the int8 graph needs and the loader resolves nothing but registered operators:

- nodes: ``placeholder``, ``get_attr`` (a tensor of the weights file), ``call_function`` whose
  target is an ``OpOverload`` of the ``OP_NAMESPACES`` (``aten::conv2d.default``) or
  ``operator.getitem``, and ``output``;
- arguments: nodes, numbers, strings, None, lists, tuples, dicts and named dtypes / devices /
  memory formats / layouts.

Anything else is refused when saving (the model is then not saved, and the run says why) and
when loading (one sentence, nothing run).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn

# Operator libraries a saved graph may call: tensor maths and PT2E's (de)quantize ops.
OP_NAMESPACES = ("aten", "quantized_decomposed")
GETITEM = "operator.getitem"
# torch.export's shape-guard module: a Python function with no outputs that checks the input
# shape of the exported program; the saved graph has no guards (the loader checks the size).
GUARDS = "_guards_fn"
_NAMED = {"dtype": torch.dtype, "memory_format": torch.memory_format, "layout": torch.layout}


class GraphFormatError(ValueError):
    """A graph this format cannot hold, or a file that is not one."""


def _op_name(target: Any) -> str:
    if target is operator.getitem:
        return GETITEM
    if isinstance(target, torch._ops.OpOverload):
        namespace = target.namespace
        if namespace in OP_NAMESPACES:
            return f"{target._schema.name}.{target._overloadname}"
    raise GraphFormatError(f"operator {target} is outside the saved-graph format "
                           f"({', '.join(OP_NAMESPACES)} operators only)")


def resolve_op(name: str) -> Any:
    """``aten::conv2d.default`` → the registered operator; anything else is refused."""
    if name == GETITEM:
        return operator.getitem
    namespace, _, rest = str(name).partition("::")
    op, _, overload = rest.rpartition(".")
    if namespace not in OP_NAMESPACES or not op.isidentifier() or not overload.isidentifier():
        raise GraphFormatError(f"operator {name!r} is not one the saved-graph format allows")
    try:
        target = getattr(getattr(getattr(torch.ops, namespace), op), overload)
    except (AttributeError, RuntimeError) as err:
        raise GraphFormatError(f"operator {name!r} is not registered in this torch") from err
    if not isinstance(target, torch._ops.OpOverload):
        raise GraphFormatError(f"operator {name!r} is not an operator")
    return target


def _arg(value: Any) -> Any:
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_arg(v) for v in value]
        return items if isinstance(value, list) else {"tuple": items}
    if isinstance(value, dict):
        return {"dict": {str(k): _arg(v) for k, v in value.items()}}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    for kind, cls in _NAMED.items():
        if isinstance(value, cls):
            return {kind: str(value).removeprefix("torch.")}
    raise GraphFormatError(f"argument {value!r} ({type(value).__name__}) is outside the "
                           "saved-graph format")


def _unarg(value: Any, env: dict[str, torch.fx.Node]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_unarg(v, env) for v in value]
    if not (isinstance(value, dict) and len(value) == 1):
        raise GraphFormatError(f"argument {value!r} is not one the saved-graph format allows")
    (kind, inner), = value.items()
    if kind == "node":
        if inner not in env:
            raise GraphFormatError(f"node {inner!r} is used before it is defined")
        return env[inner]
    if kind == "tuple" and isinstance(inner, list):
        return tuple(_unarg(v, env) for v in inner)
    if kind == "dict" and isinstance(inner, dict):
        return {str(k): _unarg(v, env) for k, v in inner.items()}
    if kind == "device" and isinstance(inner, str):
        return torch.device(inner)
    if kind in _NAMED and isinstance(inner, str) and inner.isidentifier():
        named = getattr(torch, inner, None)
        if isinstance(named, _NAMED[kind]):
            return named
    raise GraphFormatError(f"argument {value!r} is not one the saved-graph format allows")


def _tensor(module: nn.Module, target: str) -> tuple[torch.Tensor, str]:
    owner, _, leaf = target.rpartition(".")
    parent = module.get_submodule(owner) if owner else module
    value = getattr(parent, leaf)
    if not isinstance(value, torch.Tensor):
        raise GraphFormatError(f"attribute {target} is a {type(value).__name__}, not a tensor")
    return value, "parameter" if leaf in parent._parameters else "buffer"


def to_json(module: torch.fx.GraphModule) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``({"nodes": [...], "tensors": {target: parameter|buffer}}, {target: tensor})``."""
    nodes: list[dict[str, Any]] = []
    kinds: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for node in module.graph.nodes:
        entry: dict[str, Any] = {"op": node.op, "name": node.name}
        if node.op == "call_module" and node.target == GUARDS and not node.users:
            continue
        if node.op == "placeholder":
            entry["target"] = str(node.target)
        elif node.op == "get_attr":
            tensors[node.target], kinds[node.target] = _tensor(module, node.target)
            entry["target"] = node.target
        elif node.op == "call_function":
            entry.update(target=_op_name(node.target), args=_arg(list(node.args)),
                         kwargs=_arg(dict(node.kwargs)))
        elif node.op == "output":
            entry["args"] = _arg(list(node.args))
        else:
            raise GraphFormatError(f"{node.op} node {node.name} is outside the saved-graph "
                                   "format")
        nodes.append(entry)
    return {"nodes": nodes, "tensors": kinds}, tensors


def from_json(spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
    """The graph module back; its tensors are registered as they were (parameter or buffer), and
    a single output is returned as a tensor (the exported module's unflattened output)."""
    root = nn.Module()
    for target, kind in dict(spec.get("tensors", {})).items():
        if target not in tensors:
            raise GraphFormatError(f"tensor {target!r} is missing from the weights file")
        owner, _, leaf = str(target).rpartition(".")
        parent = root
        for part in owner.split(".") if owner else []:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        if kind == "parameter":
            parent.register_parameter(leaf, nn.Parameter(tensors[target], requires_grad=False))
        else:
            parent.register_buffer(leaf, tensors[target])
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    for entry in spec.get("nodes", []):
        op, name = entry.get("op"), str(entry.get("name"))
        if op == "placeholder":
            node = graph.placeholder(name)
        elif op == "get_attr":
            if entry.get("target") not in spec.get("tensors", {}):
                raise GraphFormatError(f"node {name} reads an unlisted tensor")
            node = graph.create_node("get_attr", entry["target"], name=name)
        elif op == "call_function":
            node = graph.create_node("call_function", resolve_op(entry.get("target")),
                                     tuple(_unarg(entry.get("args", []), env)),
                                     _unarg(entry.get("kwargs", {"dict": {}}), env), name=name)
        elif op == "output":
            (result,) = _unarg(entry.get("args", []), env)
            if isinstance(result, (tuple, list)) and len(result) == 1:
                result = result[0]
            graph.output(result)
            continue
        else:
            raise GraphFormatError(f"node kind {op!r} is not one the saved-graph format allows")
        env[name] = node
    graph.lint()
    return torch.fx.GraphModule(root, graph)
