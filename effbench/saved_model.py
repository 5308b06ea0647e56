"""A run's model, saved to keep and reuse: ``<run>/model/``.

One format for every technique (docs/compression.md, "Models you can keep"):

- ``manifest.json``: format and version, ``kind`` (how the model is rebuilt), the technique that
  shaped it, the resolved ``backbone`` config node (the architecture), ``num_classes``, ``task``,
  class names, the image size and preprocessing (mean/std, normalize) of the run's test step, the
  head's layers, the test metrics the run recorded for this very model, and every file with its
  size and sha256;
- ``weights.safetensors``: the tensors (safetensors: a file from outside is read as data, never
  run as code, unlike a pickled ``torch.save``);
- ``graph.json`` for an int8 model (effbench/compression/graph.py: registered operators only).

Kinds: ``network`` is the backbone rebuilt from its config + the head from its layer list, with
the weights loaded (dense; ``prune`` stores mostly-zero tensors by their nonzeros and a bitmask,
and records the layer shapes that channel pruning shrank); ``int8_graph`` is qat's converted
graph, lowered to oneDNN int8 kernels as the run evaluated it.

``save`` is called at the end of a run (effbench/pipeline.py, global rank 0), ``load`` gives an
eval-mode module that takes uint8 images as the run's test step got them, and ``evaluate`` runs it
on the run's test split (``effbench-eval RUN_DIR``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from effbench.backbones.base import Preprocessing
from effbench.compression import sparse
from effbench.compression.graph import GraphFormatError, from_json, to_json
from effbench.compression.int8 import FixedBatch, lower_x86
from effbench.compression.structured import module_shapes, resize_to
from effbench.errors import EffbenchError
from effbench.metrics import build_metrics, split_scalars
from effbench.rundir import write_bytes_atomic

if TYPE_CHECKING:
    from effbench.context import RunContext

FORMAT, VERSION = "effbench-model", 1
MODEL_DIR, MANIFEST = "model", "manifest.json"
WEIGHTS, GRAPH = "weights.safetensors", "graph.json"
BACKBONE_TARGET = "effbench.backbones.build_backbone"
DATASET_TARGETS = "effbench.data."
_CHUNK = 1 << 20


@dataclass
class SavedModel:
    """What a technique hands to :func:`save` (``Technique.saved_model``)."""

    kind: str                                  # how it is rebuilt: a key of LOADERS
    tensors: dict[str, torch.Tensor]           # → weights.safetensors
    metrics: dict[str, float]                  # what the run recorded for this very model
    metric_prefix: str = "test"                # their prefix ("int8/test" for qat)
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
# Heads differ by technique (backbone.head for the shared fit, strategy.precomputed.head/hidden/
# dropout for precomputed); described from the module itself, any of them rebuilds the same way.
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
    for name, (cls, args) in HEAD_LAYERS.items():
        if type(module) is cls:
            return {"type": name, "args": args(module)}
    raise EffbenchError(f"the head layer {type(module).__name__} has no saved-model "
                        f"description (layers: Sequential, {', '.join(HEAD_LAYERS)}); add it to "
                        "effbench.saved_model.HEAD_LAYERS.")


def build_head(spec: dict[str, Any]) -> nn.Module:
    if spec.get("type") == "Sequential":
        return nn.Sequential(*(build_head(s) for s in spec.get("layers", [])))
    entry = HEAD_LAYERS.get(str(spec.get("type")))
    if entry is None:
        raise ValueError(f"unknown head layer {spec.get('type')!r}")
    return entry[0](**dict(spec.get("args", {})))


# -- what techniques save --------------------------------------------------------------------------
def _state(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def network_model(ctx: RunContext, compress: bool = False) -> SavedModel:
    """Backbone + head of ``ctx.system`` as they are (the generic default). ``compress``: mostly-
    zero tensors by their nonzeros, and the layer shapes (a channel-pruned model rebuilds
    smaller), what ``prune`` saves."""
    system = ctx.system
    if not system.backbone.state_dict():
        # A stand-in: precomputed's cache-hit fast path serves a job without building the
        # backbone, so there are no backbone weights here to keep (and building it now would
        # undo what the fast path saves).
        raise EffbenchError(f"the job's backbone ({type(system.backbone).__name__}) holds no "
                            "weights: the job was served from the feature cache and never built "
                            "it; keep strategy.precomputed.save_model=true (the default) to "
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
        "preprocessing": dataclasses.asdict(dm.preprocessing),
        "head": model.info.get("head"),
        "metric_prefix": model.metric_prefix, "metrics": model.metrics,
        "dataset": ctx.cfg.dataset.get("name"), "seed": ctx.cfg.get("seed"),
        "info": {k: v for k, v in model.info.items() if k != "head"},
        "files": {name: {"bytes": len(data), "sha256": _sha256(data)}
                  for name, data in files.items()},
    }
    text = json.dumps(manifest, indent=1).encode()
    write_bytes_atomic(model_dir / MANIFEST, text)
    return {"path": str(model_dir), "format": f"{FORMAT}/{VERSION}", "kind": model.kind,
            "produced_by": produced_by, "sparse": bool(model.info.get("sparse")),
            "bytes": len(text) + sum(len(d) for d in files.values())}


# -- reading -------------------------------------------------------------------------------------
def model_dir_of(path: str | Path) -> Path:
    """``path`` is a run dir (its ``model/``) or the model folder itself."""
    path = Path(path)
    if not path.exists():
        raise EffbenchError(f"RUN_DIR={path} does not exist; pass the folder of a completed run "
                            "(outputs/<time>_<techniques>_…) or its model/ folder.")
    if (path / MANIFEST).is_file():
        return path
    if not (path / MODEL_DIR / MANIFEST).is_file():
        raise EffbenchError(f"RUN_DIR={path} holds no saved model ({MODEL_DIR}/{MANIFEST} is "
                            "missing): a failed run, or one made before effbench saved models; "
                            "pass a completed run's folder, or run the job again.")
    return path / MODEL_DIR


def read_manifest(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The model folder and its manifest (format and version checked)."""
    model_dir = model_dir_of(path)
    where = model_dir / MANIFEST
    try:
        manifest = json.loads(where.read_text())
    except (OSError, ValueError) as err:
        raise EffbenchError(f"{where} is not a readable manifest ({err}); restore it from the "
                            "run, or run the job again.") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EffbenchError(f"{where} is not an {FORMAT} manifest; pass a folder written by an "
                            "effbench run.")
    if manifest.get("version") != VERSION or manifest.get("kind") not in LOADERS:
        raise EffbenchError(f"{where} has {FORMAT} version {manifest.get('version')} kind "
                            f"{manifest.get('kind')!r}, which this effbench cannot read (version "
                            f"{VERSION}: {', '.join(LOADERS)}); load it with the effbench that "
                            "wrote it.")
    return model_dir, manifest


def read_file(model_dir: Path, manifest: dict[str, Any], name: str) -> bytes:
    """A listed file's bytes, checked against the manifest's sha256 (the bytes that are then
    parsed are the ones checked)."""
    entry = (manifest.get("files") or {}).get(name)
    if not isinstance(entry, dict) or "/" in name or name.startswith("."):
        raise EffbenchError(f"{model_dir / MANIFEST} does not list {name}; restore the model "
                            "folder from the run, or run the job again.")
    path = model_dir / name
    try:
        data = path.read_bytes()
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
    if node.pop("_target_", None) != BACKBONE_TARGET:
        raise EffbenchError(f"the manifest's backbone._target_ is not {BACKBONE_TARGET}; a saved "
                            "model is rebuilt only by effbench's backbone factory.")
    node["weights"] = None
    return build_backbone(**node, image_size=manifest.get("image_size"))


def _load_network(model_dir: Path, manifest: dict[str, Any]) -> nn.Module:
    info = manifest.get("info") or {}
    stored = _tensors(model_dir, manifest)
    network = Network(rebuild_backbone(manifest), build_head(manifest.get("head") or {}))
    try:
        state = sparse.decode(stored, info.get("sparse") or {})
        resize_to(network, state, info.get("shapes") or {})
        network.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EffbenchError(f"the weights in {model_dir / WEIGHTS} do not fit the model the "
                            f"manifest describes ({first}); run the job again.") from err
    return network


def _load_int8_graph(model_dir: Path, manifest: dict[str, Any]) -> nn.Module:
    import torchao.quantization.pt2e  # noqa: F401 - registers the quantized_decomposed operators

    info = manifest.get("info") or {}
    try:
        spec = json.loads(read_file(model_dir, manifest, str(info.get("graph", GRAPH))))
        tensors = sparse.decode(_tensors(model_dir, manifest), info.get("sparse") or {})
        graph = from_json(spec, tensors)
    except (GraphFormatError, ValueError, TypeError, KeyError) as err:
        raise EffbenchError(f"{model_dir / GRAPH} is not a graph effbench can load ({err}); run "
                            "the job again.") from err
    batch, size = int(info.get("batch", 1)), int(manifest["preprocessing"]["crop_size"])
    # Lowering specialises the graph to this shape; the values do not matter.
    return FixedBatch(lower_x86(graph, torch.zeros(batch, 3, size, size)), batch)


# manifest "kind" → the network taking normalised float batches
LOADERS: dict[str, Callable[[Path, dict[str, Any]], nn.Module]] = {
    "network": _load_network, "int8_graph": _load_int8_graph}


def preprocessing_of(manifest: dict[str, Any]) -> Preprocessing:
    values = dict(manifest["preprocessing"])
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


# -- evaluation ----------------------------------------------------------------------------------
def _targets(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [str(node["_target_"])] if "_target_" in node else []
        return own + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def rebuild_test_data(run_dir: Path, model: LoadedModel) -> Any:
    """The run's test split, rebuilt from ``resolved_config.yaml`` (same dataset node, same
    split seed → same images), with the model's preprocessing."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    where = run_dir / "resolved_config.yaml"
    try:
        node = OmegaConf.to_container(OmegaConf.load(where).dataset, resolve=True)
    except Exception as err:  # noqa: BLE001 - missing, unreadable or no dataset node: one advice
        raise EffbenchError(f"{where} cannot be read as the run's config ({type(err).__name__}); "
                            "pass the run dir the model was saved in (it holds "
                            "resolved_config.yaml).") from err
    bad = [t for t in _targets(node) if not t.startswith(DATASET_TARGETS)]
    if bad:
        raise EffbenchError(f"{where}: dataset._target_={bad[0]} is not an effbench dataset; "
                            "restore the run's resolved_config.yaml.")
    dm = instantiate(node, _convert_="all")
    dm.configure(model.preprocessing)
    dm.setup()
    if list(dm.class_names) != list(model.manifest.get("class_names", [])):
        raise EffbenchError(f"the test data of {where} has classes {dm.class_names}, the model "
                            f"{model.manifest.get('class_names')}; point the dataset at the "
                            "data the run used.")
    return dm


def evaluate(model: LoadedModel, run_dir: str | Path | None = None) -> dict[str, Any]:
    """The model's metrics on the run's test split (the run's torchmetrics, the run's metric
    names) next to the ones the run recorded."""
    run_dir = Path(run_dir) if run_dir is not None else model.model_dir.parent
    dm = rebuild_test_data(run_dir, model)
    metrics = build_metrics(dm.task, dm.num_classes)
    with torch.no_grad():
        for images, y in dm.loader("test", shuffle=False):
            logits = model(images)
            metrics.update(logits.float(), y.long() if dm.task == "multilabel" else y)
    prefix = str(model.manifest.get("metric_prefix", "test"))
    scalars, _ = split_scalars(metrics.compute(), prefix, dm.class_names)
    recorded = dict(model.manifest.get("metrics") or {})
    return {"metrics": scalars, "recorded": {k: recorded.get(k) for k in scalars},
            "images": len(dm.labels["test"]), "dataset": dm.name}
