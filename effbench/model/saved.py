"""A run's model, saved to keep and reuse: ``<run>/model/``.

One format for every technique (docs/compression.md, "Models you can keep"):

- ``manifest.json``: format and version, ``kind`` (how the model is rebuilt), the technique that
  shaped it, the resolved ``backbone`` config node (the architecture), ``num_classes``, ``task``,
  class names, the image size and preprocessing (mean/std, normalize) of the run's test step, the
  head's layers, the test metrics the run recorded for this very model, and every file with its
  size and sha256;
- ``weights.safetensors``: the tensors (safetensors: a file from outside is read as data, never
  run as code, unlike a pickled ``torch.save``);
- ``graph.json`` for an int8 model (effbench/model/graph.py: registered operators only).

Kinds: ``network`` is the backbone rebuilt from its config + the head from its layer list, with
the weights loaded (dense; a compressed one stores mostly-zero tensors by their nonzeros and a
bitmask, and records the layer shapes that removing channels shrank); ``int8_graph`` is a converted
graph, lowered to oneDNN int8 kernels as the run evaluated it.

``save`` is called at the end of a run (effbench/pipeline.py, global rank 0), ``load`` gives an
eval-mode module that takes uint8 images as the run's test step got them, and ``evaluate`` runs it
on the run's test split (``effbench-eval RUN_DIR``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from effbench.backbones.base import Preprocessing
from effbench.errors import EffbenchError
from effbench.metrics import build_metrics, probabilities, split_scalars
from effbench.model import sparse
from effbench.model.graph import GraphFormatError, from_json, to_json
from effbench.model.int8 import FixedBatch, lower_x86
from effbench.model.shapes import module_shapes, resize_to
from effbench.predictions import max_abs_diff
from effbench.received import (
    RefusedFile,
    accepted_parameters,
    first_line,
    is_plain,
    plain_options,
    read_json,
    read_regular,
    read_yaml,
    shown,
)
from effbench.rundir import write_bytes_atomic
from effbench.task import TASKS as TASK_NAMES
from effbench.task import is_multilabel

if TYPE_CHECKING:
    from effbench.context import RunContext

FORMAT, VERSION = "effbench-model", 1
MODEL_DIR, MANIFEST = "model", "manifest.json"
WEIGHTS, GRAPH = "weights.safetensors", "graph.json"
BACKBONE_TARGET = "effbench.backbones.build_backbone"
_CHUNK = 1 << 20


@dataclass
class SavedModel:
    """What a technique hands to :func:`save` (``Technique.saved_model``)."""

    kind: str                                  # how it is rebuilt: a key of LOADERS
    tensors: dict[str, torch.Tensor]           # → weights.safetensors
    metrics: dict[str, float]                  # what the run recorded for this very model
    metric_prefix: str = "test"                # their prefix ("int8/test" for an int8 model)
    info: dict[str, Any] = field(default_factory=dict)  # kind-specific manifest entries
    files: dict[str, bytes] = field(default_factory=dict)  # further files (graph.json)


class Network(nn.Module):
    """Backbone → head, with the parameter names of the run's ``ClassifierSystem``."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# -- the head as a list of layers ----------------------------------------------------------------
# Heads differ by technique (backbone.head for the shared fit, a technique's own head options);
# described from the module itself, any of them rebuilds the same way.
def _no_args(m: nn.Module) -> dict[str, Any]:
    return {}


HEAD_LAYERS: dict[str, tuple[type[nn.Module], Callable[[Any], dict[str, Any]]]] = {
    "Linear": (nn.Linear, lambda m: {"in_features": m.in_features,
                                     "out_features": m.out_features,
                                     "bias": m.bias is not None}),
    "BatchNorm1d": (nn.BatchNorm1d, lambda m: {"num_features": m.num_features, "eps": m.eps,
                                               "momentum": m.momentum, "affine": m.affine,
                                               "track_running_stats": m.track_running_stats}),
    "Dropout": (nn.Dropout, lambda m: {"p": m.p}),
    "Flatten": (nn.Flatten, lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim}),
    "GELU": (nn.GELU, lambda m: {"approximate": m.approximate}),
    "ReLU": (nn.ReLU, _no_args), "SiLU": (nn.SiLU, _no_args), "Tanh": (nn.Tanh, _no_args),
    "Hardswish": (nn.Hardswish, _no_args), "Identity": (nn.Identity, _no_args),
}


def describe_head(module: nn.Module) -> dict[str, Any]:
    """``{"type": "Sequential", "layers": [...]}`` or ``{"type": "Linear", "args": {...}}``."""
    if type(module) is nn.Sequential:
        return {"type": "Sequential", "layers": [describe_head(m) for m in module]}
    # A layer that differs from a listed one only while training (how it draws a dropout mask)
    # names that one as ``saved_as``: the saved model rebuilds it, identical in evaluation.
    kind = getattr(type(module), "saved_as", type(module))
    for name, (cls, args) in HEAD_LAYERS.items():
        if kind is cls:
            return {"type": name, "args": args(module)}
    raise EffbenchError(f"the head layer {type(module).__name__} has no saved-model "
                        f"description (layers: Sequential, {', '.join(HEAD_LAYERS)}); add it to "
                        "effbench.model.saved.HEAD_LAYERS.")


# A head from a manifest is built from these layer types only, with arguments of these types:
# numbers within bounds a head can have (a crafted 10^6 × 10^6 Linear would exhaust memory).
MAX_WIDTH, MAX_WEIGHTS, MAX_DEPTH = 1 << 20, 1 << 28, 64


def _head_error(where: str, what: str) -> EffbenchError:
    return EffbenchError(f"{where}: the head {what}; restore the model folder from the run, or "
                         "run the job again.")


def _layer_args(name: str, args: Any, where: str) -> dict[str, Any]:
    cls = HEAD_LAYERS[name][0]
    if not isinstance(args, dict):
        raise _head_error(where, f"layer {name} has args {shown(args)}, not a mapping")
    accepted = accepted_parameters(cls) - {"device", "dtype", "inplace"}
    for key, value in args.items():
        if key not in accepted:
            raise _head_error(where, f"layer {name} has no argument {shown(key)} (it takes "
                                     f"{', '.join(sorted(accepted)) or 'none'})")
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int) and not 0 <= value <= MAX_WIDTH and key.endswith("features"):
            raise _head_error(where, f"layer {name} has {key}={shown(value)}, outside "
                                     f"0..{MAX_WIDTH}")
        if not isinstance(value, (int, float, str)):
            raise _head_error(where, f"layer {name} has {key}={shown(value)}, not a number, "
                                     "string or boolean")
    if name == "Linear" and isinstance(args.get("in_features"), int) \
            and isinstance(args.get("out_features"), int) \
            and args["in_features"] * args["out_features"] > MAX_WEIGHTS:
        raise _head_error(where, f"layer Linear has {args['in_features']}×{args['out_features']} "
                                 f"weights, more than the {MAX_WEIGHTS:,} a head can have")
    return dict(args)


def build_head(spec: Any, where: str = MANIFEST, depth: int = 0) -> nn.Module:
    """The head a manifest describes, from :data:`HEAD_LAYERS` only; any other layer type or
    argument is one sentence (a manifest is a file from outside)."""
    if not isinstance(spec, dict):
        raise _head_error(where, f"is {shown(spec)}, not a layer description")
    kind = spec.get("type")
    if kind == "Sequential":
        layers = spec.get("layers", [])
        if not isinstance(layers, list) or depth >= MAX_DEPTH or len(layers) > MAX_DEPTH:
            raise _head_error(where, "has a Sequential whose layers are not a short list")
        return nn.Sequential(*(build_head(s, where, depth + 1) for s in layers))
    if not isinstance(kind, str) or kind not in HEAD_LAYERS:
        raise _head_error(where, f"layer type {shown(kind)} is not one effbench saves (layers: "
                                 f"Sequential, {', '.join(HEAD_LAYERS)})")
    args = _layer_args(kind, spec.get("args", {}), where)
    try:
        return HEAD_LAYERS[kind][0](**args)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise _head_error(where, f"layer {kind}({shown(args)}) cannot be built "
                                 f"({type(err).__name__}: {first_line(err)})") from err


# -- what techniques save --------------------------------------------------------------------------
def _state(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def network_model(ctx: RunContext, compress: bool = False) -> SavedModel:
    """Backbone + head of ``ctx.system`` as they are (the generic default). ``compress``: mostly-
    zero tensors by their nonzeros, and the layer shapes (a channel-pruned model rebuilds
    smaller), what a technique that removes weights saves."""
    system = ctx.system
    if not system.backbone.state_dict():
        # A stand-in: a technique's cache-hit fast path serves a job without building the
        # backbone, so there are no backbone weights here to keep (and building it now would
        # undo what the fast path saves).
        owner = next((t.name for t in ctx.techniques if t.replaces_loop), "<technique>")
        raise EffbenchError(f"the job's backbone ({type(system.backbone).__name__}) holds no "
                            "weights: the job was served from the feature cache and never built "
                            f"it; keep strategy.{owner}.save_model=true (the default) to "
                            "have it rebuilt and saved.")
    tensors = {**_state(system.backbone, "backbone"), **_state(system.head, "head")}
    info: dict[str, Any] = {"head": describe_head(system.head)}
    if compress:
        tensors, info["sparse"] = sparse.encode(tensors)
        info["shapes"] = module_shapes(Network(system.backbone, system.head))
    return SavedModel("network", tensors, dict(system.test_results.get("scalars", {})),
                      info=info)


def int8_graph_model(converted: torch.fx.GraphModule, batch: int,
                     metrics: dict[str, float], prefix: str) -> SavedModel:
    """A PT2E-converted int8 graph, run at ``batch`` images per call as the run evaluated it.
    Mostly-zero tensors (a pruned model's int8 weights) are stored by their nonzeros."""
    try:
        spec, tensors = to_json(converted)
    except GraphFormatError as err:
        raise EffbenchError(f"the int8 graph cannot be saved: {err}.") from err
    tensors, encoded = sparse.encode(tensors)
    return SavedModel("int8_graph", tensors, dict(metrics), prefix,
                      info={"graph": GRAPH, "batch": int(batch), "lowering": "x86",
                            "sparse": encoded},
                      files={GRAPH: json.dumps(spec).encode()})


# -- writing ------------------------------------------------------------------------------------
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _plain(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous CPU tensors that share no storage (tied or channels-last
    # weights otherwise): one copy each.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def _preprocessing_record(pre: Any, weights: Any) -> dict[str, Any]:
    """The test step's preprocessing; for a randomly initialised model its ``source`` says that
    only the numbers come from the named weights (the model never had those weights)."""
    out = dataclasses.asdict(pre)
    if weights is None or str(weights).strip().lower() in ("", "null", "none"):
        out["source"] = (f"the sizes and mean/std of {pre.source}; the model's weights are a "
                         "random initialisation (backbone.weights=null)")
    return out


def save(ctx: RunContext, model: SavedModel, produced_by: str) -> dict[str, Any]:
    """Writes ``<run>/model/`` (each file atomically, the manifest last: a manifest on disk
    always lists complete files) and returns what ``summary.model.saved`` records."""
    from omegaconf import OmegaConf
    from safetensors.torch import save as safetensors_bytes

    model_dir = Path(ctx.run_dir) / MODEL_DIR
    files = {WEIGHTS: safetensors_bytes(_plain(model.tensors)), **model.files}
    for name, data in files.items():
        write_bytes_atomic(model_dir / name, data)
    dm = ctx.datamodule
    manifest = {
        "format": FORMAT, "version": VERSION, "kind": model.kind, "produced_by": produced_by,
        "techniques": [t.name for t in ctx.techniques],
        "backbone": OmegaConf.to_container(ctx.cfg.backbone, resolve=True),
        "image_size": ctx.cfg.dataset.get("image_size"),
        "num_classes": dm.num_classes, "task": dm.task, "class_names": list(dm.class_names),
        "preprocessing": _preprocessing_record(dm.preprocessing, ctx.cfg.backbone.get("weights")),
        "head": model.info.get("head"),
        "metric_prefix": model.metric_prefix, "metrics": model.metrics,
        "dataset": ctx.cfg.dataset.get("name"), "seed": ctx.cfg.get("seed"),
        # A relative dataset.root is relative to this folder; effbench-eval run elsewhere
        # resolves it here, and checks it rebuilt this very test split.
        "cwd": os.getcwd(), **test_split_record(dm),
        "info": {k: v for k, v in model.info.items() if k != "head"},
        "files": {name: {"bytes": len(data), "sha256": _sha256(data)}
                  for name, data in files.items()},
    }
    text = json.dumps(manifest, indent=1).encode()
    write_bytes_atomic(model_dir / MANIFEST, text)
    return {"path": str(model_dir), "format": f"{FORMAT}/{VERSION}", "kind": model.kind,
            "produced_by": produced_by,
            # Sparse = made sparse by a technique that zeroes weights: an int8 model also stores
            # a few mostly-zero tensors by their nonzeros (counted apart), which does not.
            "sparse": bool(model.info.get("sparse")) and any(t.sparsifies
                                                             for t in ctx.techniques),
            "tensors_stored_sparse": len(model.info.get("sparse") or {}),
            "bytes": len(text) + sum(len(d) for d in files.values())}


# -- reading -------------------------------------------------------------------------------------
def model_dir_of(path: str | Path) -> Path:
    """``path`` is a run dir (its ``model/``) or the model folder itself."""
    path = Path(path)
    if not path.exists():
        raise EffbenchError(f"RUN_DIR={path} does not exist; pass the folder of a completed run "
                            "(outputs/<time>_<techniques>_…) or its model/ folder.")
    # lexists: a manifest that is there but not a file (a link to a device) is refused by
    # read_manifest with the reason, not reported missing.
    if os.path.lexists(path / MANIFEST):
        return path
    if not os.path.lexists(path / MODEL_DIR / MANIFEST):
        raise EffbenchError(f"RUN_DIR={path} holds no saved model ({MODEL_DIR}/{MANIFEST} is "
                            "missing): a failed run, or one made before effbench saved models; "
                            "pass a completed run's folder, or run the job again.")
    return path / MODEL_DIR


def read_manifest(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The model folder and its manifest (format and version checked)."""
    model_dir = model_dir_of(path)
    where = model_dir / MANIFEST
    try:
        manifest = read_json(where)
    except RefusedFile as err:
        raise EffbenchError(f"{where} is not read: {err}; restore it from the run, or run the "
                            "job again.") from err
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError too
        raise EffbenchError(f"{where} is not a readable manifest ({first_line(err)}); restore "
                            "it from the run, or run the job again.") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EffbenchError(f"{where} is not an {FORMAT} manifest; pass a folder written by an "
                            "effbench run.")
    if manifest.get("version") != VERSION or manifest.get("kind") not in LOADERS:
        raise EffbenchError(f"{where} has {FORMAT} version {shown(manifest.get('version'))} "
                            f"kind {shown(manifest.get('kind'))}, which this effbench cannot read "
                            f"(version {VERSION}: {', '.join(LOADERS)}); load it with the "
                            "effbench that wrote it.")
    check_manifest(manifest, where)
    return model_dir, manifest


# What every manifest entry that loading reads must be (a manifest is a file from outside: a
# wrong type is one sentence here, not a traceback somewhere later).
def _is_int(v: Any, low: int = 0, high: int = 1 << 20) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _triple(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 3 and all(_is_number(x) for x in v)


MANIFEST_ENTRIES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "techniques": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
                   "a list of technique names"),
    "produced_by": (lambda v: isinstance(v, str), "a string"),
    "backbone": (lambda v: isinstance(v, dict), "the backbone's config (a mapping)"),
    "image_size": (lambda v: v is None or _is_int(v, 1, 4096), "null or a size in pixels"),
    "num_classes": (lambda v: _is_int(v, 1), "a number of classes"),
    "task": (lambda v: v in TASK_NAMES, " or ".join(TASK_NAMES)),
    "class_names": (lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
                    "a list of class names"),
    "preprocessing": (lambda v: isinstance(v, dict), "the test step's preprocessing"),
    "metric_prefix": (lambda v: isinstance(v, str), "a string"),
    "metrics": (lambda v: isinstance(v, dict) and all(_is_number(x) or x is None
                                                      for x in v.values()),
                "a mapping of metric names to numbers"),
    "info": (lambda v: isinstance(v, dict), "a mapping"),
    "files": (lambda v: isinstance(v, dict) and all(isinstance(e, dict) for e in v.values()),
              "a mapping of file names to their size and sha256"),
}
# Preprocessing fields: sizes, mean/std triples (std nonzero), names.
PREPROCESSING: dict[str, tuple[Callable[[Any], bool], str]] = {
    "crop_size": (lambda v: _is_int(v, 1, 4096), "a size in pixels"),
    "resize_size": (lambda v: _is_int(v, 1, 4096), "a size in pixels"),
    "mean": (_triple, "3 numbers"),
    "std": (lambda v: _triple(v) and all(x != 0 for x in v), "3 nonzero numbers"),
    "interpolation": (lambda v: isinstance(v, str), "a string"),
    "source": (lambda v: isinstance(v, str), "a string"),
    "normalize": (lambda v: isinstance(v, bool), "true or false"),
    "expected_mean": (lambda v: v is None or _triple(v), "null or 3 numbers"),
    "expected_std": (lambda v: v is None or _triple(v), "null or 3 numbers"),
    "resize": (lambda v: v in ("crop", "whole"), "crop or whole"),
}
REQUIRED_PREPROCESSING = ("crop_size", "resize_size", "mean", "std")


def _refuse(where: Path, key: str, value: Any, should: str) -> EffbenchError:
    return EffbenchError(f"{where}: {key}={shown(value)} is not {should}; restore the model "
                         "folder from the run, or run the job again.")


def check_manifest(manifest: dict[str, Any], where: Path) -> None:
    """Every entry that loading reads has the type it must have (one sentence otherwise)."""
    for key in ("preprocessing", "class_names", "num_classes", "task", "files"):
        if key not in manifest:
            raise EffbenchError(f"{where} has no {key}; restore the model folder from the run, "
                                "or run the job again.")
    for key, (ok, should) in MANIFEST_ENTRIES.items():
        if key in manifest and not ok(manifest[key]):
            raise _refuse(where, key, manifest[key], should)
    pre = manifest["preprocessing"]
    missing = [k for k in REQUIRED_PREPROCESSING if k not in pre]
    if missing:
        raise EffbenchError(f"{where}: preprocessing has no {', '.join(missing)}; restore the "
                            "model folder from the run, or run the job again.")
    for key, value in pre.items():
        if key not in PREPROCESSING or not PREPROCESSING[key][0](value):
            should = PREPROCESSING[key][1] if key in PREPROCESSING else "a preprocessing field"
            raise _refuse(where, f"preprocessing.{key}", value, should)


def read_file(model_dir: Path, manifest: dict[str, Any], name: str) -> bytes:
    """A listed file's bytes, checked against the manifest's sha256 (the bytes that are then
    parsed are the ones checked)."""
    entry = (manifest.get("files") or {}).get(name)
    if not isinstance(entry, dict) or "/" in name or name.startswith("."):
        raise EffbenchError(f"{model_dir / MANIFEST} does not list {name}; restore the model "
                            "folder from the run, or run the job again.")
    path = model_dir / name
    size = entry.get("bytes")
    if not _is_int(size, 0, 1 << 40):
        raise _refuse(model_dir / MANIFEST, f"files.{name}.bytes", size, "a size in bytes")
    try:
        data = read_regular(path, limit=size)
    except RefusedFile as err:
        raise EffbenchError(f"{path} is not read: {err} (the manifest lists {size:,} bytes); "
                            "restore the file from the run, or run the job again.") from err
    except OSError as err:
        raise EffbenchError(f"{path} cannot be read ({err.strerror or err}); restore it from the "
                            "run, or run the job again.") from err
    if _sha256(data) != entry.get("sha256"):
        raise EffbenchError(f"{path} does not match its sha256 in {MANIFEST} (changed or "
                            "truncated after the run); restore the file from the run, or run the "
                            "job again.")
    return data


def _tensors(model_dir: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as safetensors_load

    data = read_file(model_dir, manifest, WEIGHTS)
    try:
        return safetensors_load(data)
    except Exception as err:  # noqa: BLE001 - any parse failure means the same to the user
        raise EffbenchError(f"{model_dir / WEIGHTS} is not a readable safetensors file "
                            f"({type(err).__name__}); run the job again.") from err


def rebuild_backbone(manifest: dict[str, Any]) -> nn.Module:
    """The architecture from the resolved ``backbone`` node, without downloading or reading any
    weights (the saved ones are loaded next). Only effbench's own factory is called: a manifest
    naming another ``_target_`` could otherwise run any code."""
    from effbench.backbones import build_backbone

    node = dict(manifest.get("backbone") or {})
    target = node.pop("_target_", None)
    if target != BACKBONE_TARGET:
        raise EffbenchError(f"the manifest's backbone._target_={shown(target)} is not "
                            f"{BACKBONE_TARGET}, so it is not called: a saved model is rebuilt "
                            "only by effbench's backbone factory, from registered names.")
    for key, value in node.items():
        plain = is_plain(value) or (key == "head" and isinstance(value, dict)
                                    and all(is_plain(v) for v in value.values()))
        if not isinstance(key, str) or key.startswith("_") or not plain:
            raise EffbenchError(f"the manifest's backbone.{shown(key)}={shown(value)} is not a "
                                "plain option of effbench's backbone factory; restore the model "
                                "folder from the run, or run the job again.")
    node["weights"] = None
    try:
        return build_backbone(**node, image_size=manifest.get("image_size"))
    except EffbenchError as err:
        raise EffbenchError(f"the manifest's backbone cannot be rebuilt: {err}") from err
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        raise EffbenchError(f"the manifest's backbone cannot be rebuilt ({type(err).__name__}: "
                            f"{first_line(err)}); restore the model folder from the run, or run "
                            "the job again.") from err


def _sparse_specs(stored: dict[str, torch.Tensor], info: dict[str, Any],
                  where: Path) -> dict[str, Any]:
    """``info.sparse``, checked against the stored tensors before anything is allocated: each
    entry's shape holds no more elements than its bitmask has bits (a crafted shape could
    otherwise ask for terabytes)."""
    specs = info.get("sparse") or {}
    if not isinstance(specs, dict):
        raise _refuse(where, "info.sparse", specs, "a mapping of tensor names")
    for name, spec in specs.items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        mask = stored.get(f"{name}{sparse.MASK}")
        if not (isinstance(shape, list) and all(_is_int(s, 0, 1 << 31) for s in shape)) \
                or mask is None or math.prod(shape) > 8 * mask.numel():
            raise _refuse(where, f"info.sparse.{name}", spec,
                          "the shape of a tensor stored with its bitmask")
    return specs


def _load_network(model_dir: Path, manifest: dict[str, Any]) -> nn.Module:
    info = manifest.get("info") or {}
    stored = _tensors(model_dir, manifest)
    specs = _sparse_specs(stored, info, model_dir / MANIFEST)
    network = Network(rebuild_backbone(manifest),
                      build_head(manifest.get("head"), str(model_dir / MANIFEST)))
    try:
        state = sparse.decode(stored, specs)
        resize_to(network, state, info.get("shapes") or {})
        network.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        raise EffbenchError(f"the weights in {model_dir / WEIGHTS} do not fit the model the "
                            f"manifest describes ({first_line(err)}); run the job again.") from err
    return network


def _load_int8_graph(model_dir: Path, manifest: dict[str, Any]) -> nn.Module:
    import torchao.quantization.pt2e  # noqa: F401 - registers the quantized_decomposed operators

    info = manifest.get("info") or {}
    stored = _tensors(model_dir, manifest)
    specs = _sparse_specs(stored, info, model_dir / MANIFEST)
    try:
        spec = json.loads(read_file(model_dir, manifest, str(info.get("graph", GRAPH))))
        graph = from_json(spec, sparse.decode(stored, specs))
    except (GraphFormatError, ValueError, TypeError, KeyError, AttributeError,
            IndexError, RuntimeError) as err:
        raise EffbenchError(f"{model_dir / GRAPH} is not a graph effbench can load "
                            f"({first_line(err)}); run the job again.") from err
    batch, size = info.get("batch", 1), manifest["preprocessing"]["crop_size"]
    if not _is_int(batch, 1, 1 << 16):
        raise _refuse(model_dir / MANIFEST, "info.batch", batch, "a batch size")
    # Lowering specialises the graph to this shape; the values do not matter.
    return FixedBatch(lower_x86(graph, torch.zeros(batch, 3, size, size)), batch)


# manifest "kind" → the network taking normalised float batches
LOADERS: dict[str, Callable[[Path, dict[str, Any]], nn.Module]] = {
    "network": _load_network, "int8_graph": _load_int8_graph}


def preprocessing_of(manifest: dict[str, Any]) -> Preprocessing:
    values = dict(manifest["preprocessing"])  # types checked by check_manifest
    for key in ("mean", "std", "expected_mean", "expected_std"):
        if values.get(key) is not None:
            values[key] = tuple(float(v) for v in values[key])
    return Preprocessing(**values)


class LoadedModel(nn.Module):
    """A saved model for uint8 images ``(N, 3 or 1, H, W)``: normalised as the run's test step
    did (÷255, minus mean, over std; resized to the run's size first when it differs), then the
    network. ``network`` takes already-normalised float batches; ``manifest`` says what it is."""

    def __init__(self, network: nn.Module, manifest: dict[str, Any], model_dir: Path) -> None:
        super().__init__()
        self.network, self.manifest, self.model_dir = network, manifest, model_dir
        self.preprocessing = preprocessing_of(manifest)
        self.register_buffer("mean", torch.tensor(self.preprocessing.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.preprocessing.std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"a loaded effbench model takes uint8 images (0..255), not "
                            f"{images.dtype}; call model.network(x) for normalised float input")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        size = self.preprocessing.crop_size
        if tuple(images.shape[-2:]) != (size, size):
            from effbench.data.base import resize_crop

            images = resize_crop(images, self.preprocessing)
        # Exactly ImageDataModule.normalize (test batches): the same numbers as in the run.
        x = images.float().div_(255.0)
        return self.network((x - self.mean) / self.std)


def load(path: str | Path) -> LoadedModel:
    """The model a run saved (``path``: the run dir or its ``model/``), in eval mode on CPU."""
    model_dir, manifest = read_manifest(path)
    network = LOADERS[manifest["kind"]](model_dir, manifest)
    return LoadedModel(network, manifest, model_dir).eval()


# -- datasets by their registered names ------------------------------------------------------------
@cache
def dataset_registry() -> dict[str, str]:
    """``_target_`` → option name of every dataset effbench ships (``conf/dataset/*.yaml``): the
    only classes a received config may name."""
    from effbench.config import CONF_DIR

    out: dict[str, str] = {}
    for path in sorted((Path(CONF_DIR) / "dataset").glob("*.yaml")):
        node = read_yaml(path)
        if isinstance(node, dict) and isinstance(node.get("_target_"), str):
            out[node["_target_"]] = path.stem
    return out


def dataset_class(target: Any, where: str) -> type:
    """The datamodule class a registered ``_target_`` names; anything else, one sentence."""
    registry = dataset_registry()
    if not isinstance(target, str) or target not in registry:
        raise EffbenchError(f"{where}: dataset._target_={shown(target)} is not one of effbench's "
                            f"datasets ({', '.join(sorted(registry.values()))}), so it is not "
                            "called; restore the run's resolved_config.yaml.")
    module, _, name = target.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    from effbench.data.base import ImageDataModule

    if not (isinstance(cls, type) and issubclass(cls, ImageDataModule)):  # a broken conf/ tree
        raise EffbenchError(f"conf/dataset/{registry[target]}.yaml names {target}, which is not "
                            "an effbench datamodule; reinstall effbench.")
    return cls


def dataset_options(node: Any, where: str) -> tuple[type, dict[str, Any]]:
    """The class and validated options of a received ``dataset`` config node."""
    if not isinstance(node, dict):
        raise EffbenchError(f"{where} has no dataset section (a mapping with _target_); restore "
                            "the run's resolved_config.yaml.")
    node = dict(node)
    cls = dataset_class(node.pop("_target_", None), where)
    return cls, plain_options(node, accepted_parameters(cls), where, "dataset")


def build_dataset(cls: type, options: dict[str, Any], where: str) -> Any:
    """``cls(**options)``; what the constructor refuses becomes one sentence."""
    try:
        return cls(**options)
    except EffbenchError:
        raise
    except (TypeError, ValueError, OverflowError) as err:
        raise EffbenchError(f"{where}: the dataset options are not valid for "
                            f"{cls.__name__} ({type(err).__name__}: {first_line(err)}); restore "
                            "the run's resolved_config.yaml.") from err


# -- evaluation ----------------------------------------------------------------------------------
def test_split_record(dm: Any) -> dict[str, Any]:
    """What identifies the test split a model was scored on (its size and a hash of its labels in
    order), so ``effbench-eval`` can tell the rebuilt split from other images."""
    labels = getattr(dm, "labels", {}).get("test")
    if labels is None:
        return {}
    data = labels.detach().to("cpu").contiguous().numpy().tobytes()
    return {"test_images": len(labels), "test_labels_sha256": _sha256(data)}


def _data_error(what: str) -> EffbenchError:
    return EffbenchError(f"{what}; pass --data-root DIR pointing at the images the run used "
                         "(effbench-eval never scores a model on other images).")


def received_dataset_options(options: dict[str, Any], manifest: dict[str, Any], where: Path,
                             data_root: str | Path | None) -> dict[str, Any]:
    """Where a received config's dataset reads and writes, settled here and not by the file: the
    images under the root the run used (a relative root joins the folder the run ran in, recorded
    in the manifest as ``cwd``; or ``data_root``), this user's cache, no download."""
    from effbench.config import user_cache_dir

    options = dict(options)
    if "cache_dir" in options:  # never write caches where a received file says
        options["cache_dir"] = os.environ.get("EFFBENCH_CACHE_DIR") or user_cache_dir()
    if "download" in options:  # the run's images or none: a missing copy is refused below
        options["download"] = False
    if isinstance(options.get("num_workers"), int):  # this machine's cores, not the file's
        options["num_workers"] = max(0, min(options["num_workers"], os.cpu_count() or 1))
    root = options.get("root")
    if data_root is not None:
        root = str(Path(data_root).expanduser().resolve())
    elif isinstance(root, str) and not Path(root).expanduser().is_absolute():
        cwd = manifest.get("cwd")
        if not (isinstance(cwd, str) and Path(cwd).is_absolute()):
            raise _data_error(f"dataset.root={shown(root)} in {where} is relative, and the "
                                     "model's manifest does not record the folder the run was "
                                     "started in")
        root = str(Path(cwd) / root)
    if isinstance(root, str) and not Path(root).expanduser().exists():
        raise _data_error(f"the run's images are not here: dataset.root={shown(root)} does "
                                 "not exist")
    if "root" in options or data_root is not None:
        options["root"] = root
    return options


def rebuild_test_data(run_dir: Path, model: LoadedModel,
                      data_root: str | Path | None = None) -> Any:
    """The run's test split, rebuilt from ``resolved_config.yaml`` (same dataset, same options,
    same split seed → same images), with the model's preprocessing.

    The file is read as data (``effbench.received``): the dataset is the one that effbench's own
    ``conf/dataset`` registers under the file's ``_target_``, built with the file's plain options;
    nothing the file names is called. The rebuilt split must have the classes, size and labels
    (in order) that the run tested."""
    import yaml

    where = run_dir / "resolved_config.yaml"
    try:
        config = read_yaml(where)
    except RefusedFile as err:
        raise EffbenchError(f"{where} is not read: {err}; restore the run's "
                            "resolved_config.yaml.") from err
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise EffbenchError(f"{where} cannot be read as the run's config ({type(err).__name__}); "
                            "pass the run dir the model was saved in (it holds "
                            "resolved_config.yaml).") from err
    cls, options = dataset_options(config.get("dataset") if isinstance(config, dict) else None,
                                   str(where))
    options = received_dataset_options(options, model.manifest, where, data_root)
    dm = build_dataset(cls, options, str(where))
    dm.configure(model.preprocessing)
    dm.setup()
    manifest = model.manifest
    if list(dm.class_names) != list(manifest["class_names"]):
        raise _data_error(f"the test data of {where} has classes "
                                 f"{shown(list(dm.class_names))}, the model "
                                 f"{shown(manifest['class_names'])}")
    record = test_split_record(dm)
    for key in ("test_images", "test_labels_sha256"):
        if key in manifest and manifest[key] != record.get(key):
            raise _data_error(f"the test split rebuilt from {where} is not the one the run "
                                     f"tested ({record.get('test_images')} images, the run "
                                     f"{shown(manifest.get('test_images'))}; {key} differs)")
    return dm


def evaluate(model: LoadedModel, run_dir: str | Path | None = None,
             data_root: str | Path | None = None) -> dict[str, Any]:
    """The model's metrics on the run's test split (the run's torchmetrics, the run's metric
    names) next to the ones the run recorded. ``data_root``: where the run's images are, when
    not where the run had them."""
    run_dir = Path(run_dir) if run_dir is not None else model.model_dir.parent
    dm = rebuild_test_data(run_dir, model, data_root)
    metrics = build_metrics(dm.task, dm.num_classes)
    probs = []  # compared with the run's predictions.npz
    try:
        with torch.no_grad():
            for images, y in dm.loader("test", shuffle=False):
                logits = model(images)
                metrics.update(logits.float(), y.long() if is_multilabel(dm.task) else y)
                probs.append(probabilities(logits.float(), dm.task))
    except RuntimeError as err:  # shapes of a manifest that does not describe this model
        raise EffbenchError(f"the model in {model.model_dir} does not run on the test images "
                            f"of {run_dir / 'resolved_config.yaml'} ({first_line(err)}); "
                            "restore the run folder, or run the job again.") from err
    prefix = str(model.manifest.get("metric_prefix", "test"))
    scalars, _ = split_scalars(metrics.compute(), prefix, dm.class_names)
    recorded = dict(model.manifest.get("metrics") or {})
    return {"metrics": scalars, "recorded": {k: recorded.get(k) for k in scalars},
            "images": len(dm.labels["test"]), "dataset": dm.name,
            "predictions": max_abs_diff(run_dir, torch.cat(probs).numpy() if probs else None,
                                        int8=prefix.startswith("int8"))}
