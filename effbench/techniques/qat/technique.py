"""``qat``: quantization-aware training, conversion to int8, and what int8 is worth on CPU.

Path (see docs/compression.md for why): torchao's PT2E flow, the maintained successor of
``torch.ao.quantization``. torchao's module-swap QAT (``QATConfig``) only fakes-quantizes Linear and
Embedding layers, so for CNNs the graph flow is the one that quantizes convolutions:
``torch.export`` (strict, so reused modules such as ResNet's ``relu`` stay separate call sites) →
``prepare_qat_pt2e`` with the ``X86InductorQuantizer`` (per-channel int8 weights, int8 activations;
Conv-BN pairs are fused for training and folded at conversion) → training in the loop →
``convert_pt2e`` (int8 weights) → ``lower_pt2e_quantized_to_x86`` (oneDNN int8 kernels on CPU).

The backbone and head are exported together as one graph that replaces ``system.backbone`` (the head
becomes ``Identity``); ``qat_scope=conv`` quantizes the convolutions only, ``all`` every pattern the
quantizer supports (conv, linear, add, pooling, concatenation, ReLU). Fake quantization trains in
``32-true`` precision: mixed precision would hand the observers half-precision ranges.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from effbench.errors import EffbenchError
from effbench.metrics import build_metrics, probabilities, split_scalars
from effbench.model import cpu_latency_ms, module_bytes
from effbench.model.int8 import (
    agreement,
    drop_unused_tensors,
    lower_x86,
    padded_forward,
    quantized_weight_bytes,
    x86_quantizer,
)
from effbench.model.saved import SavedModel, int8_graph_model
from effbench.summary import state_dict_bytes
from effbench.task import is_multilabel
from effbench.technique import Technique, Train, register
from effbench.techniques.qat.patterns import (
    present_convolutions_only,
    remembered_pattern_exports,
    remembering_train_eval,
)

if TYPE_CHECKING:
    from effbench.context import RunContext

log = logging.getLogger(__name__)

QAT_SCOPES = ("conv", "all")
PRECISION = "32-true"


def prepare_qat(model: nn.Module, example: torch.Tensor, scope: str) -> torch.fx.GraphModule:
    """Exports ``model`` (train mode, dynamic batch) and inserts fake quantization for ``scope``."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    model.train()
    batch = torch.export.Dim("batch", min=2)
    # strict=True: dynamo names each call site, so a module called twice (ResNet's relu) is two
    # quantization partitions, not one with two outputs (which the x86 quantizer rejects).
    graph = torch.export.export(model, (example,), dynamic_shapes=({0: batch},),
                                strict=True).module()
    # Conv-BN fusion patterns only for convolutions it has, each exported once per process.
    with present_convolutions_only(), remembered_pattern_exports():
        prepared = prepare_qat_pt2e(graph, x86_quantizer(scope, fake_quant=True))
    allow_exported_model_train_eval(prepared)  # Lightning's .train()/.eval() switch BN & dropout
    return remembering_train_eval(prepared)


def convert_int8(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """int8 weights, BN folded (a converted copy; the fake-quant model is left as it is)."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    model = copy.deepcopy(prepared)
    # BN folding patterns only for convolutions it has; every pattern exported once per process.
    with present_convolutions_only(), remembered_pattern_exports():
        move_exported_model_to_eval(model)
        return drop_unused_tensors(convert_pt2e(model))


@register
class Qat(Technique):
    """Quantization-aware training (see the module docstring)."""

    requires_precision = PRECISION  # fake quantization runs in fp32 (the hardware plan obeys)

    name = "qat"
    order = 40
    acts_on = frozenset({"model", "export"})
    needs = frozenset({"backbone_grad"})

    def __init__(self, name: str = "qat", qat_scope: str = "conv", latency_batch: int = 16,
                 latency_min_time: float = 1.0, int8_eval: bool = True,
                 finetune_epochs: int | None = None) -> None:
        super().__init__(name)
        if qat_scope not in QAT_SCOPES:
            raise EffbenchError(f"strategy.qat.qat_scope={qat_scope!r} is not one of "
                                f"{', '.join(QAT_SCOPES)}; set strategy.qat.qat_scope=conv or all.")
        if int(latency_batch) < 1:
            raise EffbenchError(f"strategy.qat.latency_batch={latency_batch} must be >= 1, e.g. "
                                "16.")
        self.qat_scope, self.latency_batch = qat_scope, int(latency_batch)
        self.latency_min_time, self.int8_eval = float(latency_min_time), bool(int8_eval)
        if finetune_epochs is not None and int(finetune_epochs) < 1:
            raise EffbenchError(f"strategy.qat.finetune_epochs={finetune_epochs} must be >= 1.")
        self.finetune_epochs = None if finetune_epochs is None else int(finetune_epochs)
        self.precision = PRECISION
        self._float: nn.Module | None = None
        self._converted: torch.fx.GraphModule | None = None
        self._int8_metrics: dict[str, float] = {}
        self._deferred = False

    def incompatible(self, other: Technique) -> str | None:
        if other.unfreezes_during_fit:
            return (f"gradual unfreezing changes which weights train after {self.name} has "
                    "exported the model graph; freeze a fixed set "
                    f"(strategy.{other.name}.unfreeze_at_epochs=[])")
        return None

    def check(self, ctx: RunContext) -> None:
        # Stacked after a technique whose model changes are hooks (prune's masks), QAT is a
        # second phase (refit): that technique trains first, the pipeline makes its changes
        # permanent, then QAT fine-tunes the result (finetune_epochs) and converts it to int8.
        self._deferred = any(t.reparametrizes for t in ctx.techniques if t is not self)
        if ctx.plan is not None and ctx.plan.compile_mode:
            raise EffbenchError(f"strategy={self.name} trains its exported fake-quantized graph "
                                "in place of the backbone and head that hardware.compile "
                                "compiles, so hardware.compile cannot take effect; remove "
                                "hardware.compile=… .")
        if self.finetune_epochs is not None and not self._deferred:
            raise EffbenchError("strategy.qat.finetune_epochs only takes effect after another "
                                "technique's training phase (strategy=[prune,qat]); alone, QAT "
                                "runs through trainer.max_epochs: remove it.")
        held = next((t for t in ctx.techniques if t.holds_batchnorm_in_eval), None)
        if held is not None and _frozen_batchnorm(ctx.system.backbone):
            raise EffbenchError(f"strategy=[{held.name},{self.name}]: QAT folds BatchNorm into the "
                                "fake-quantized convolutions of the exported graph, where frozen "
                                "BatchNorm layers cannot stay in eval mode; set "
                                f"strategy.{held.name}.frozen_bn_eval=false (their running "
                                f"statistics then adapt) or run {held.name} alone.")

    def configure_model(self, ctx: RunContext) -> None:
        _import_torchao()
        if not self._deferred:
            self._prepare(ctx)

    def _prepare(self, ctx: RunContext) -> None:
        system, backbone = ctx.system, ctx.system.backbone
        x = _example(ctx, 2)
        float_model = nn.Sequential(backbone, system.head)
        self._float = copy.deepcopy(float_model).eval()  # the fp32 reference for size & latency
        # A frozen prefix runs under no_grad, which export cannot partition for quantization;
        # frozen parameters keep requires_grad=False in the graph (it shares them), so they
        # still do not train.
        prefix = getattr(backbone, "frozen_prefix", 0)
        if prefix:
            backbone.frozen_prefix = 0
        try:
            system.backbone = prepare_qat(float_model, x, self.qat_scope)
        finally:
            if prefix:
                backbone.frozen_prefix = prefix
        system.head = nn.Identity()

    def refit(self, ctx: RunContext, train: Train) -> None:
        """[prune,qat]: the pruned model (settled; its zeros kept by ``train``) is fine-tuned
        with fake quantization."""
        if not self._deferred:
            return
        self._prepare(ctx)
        epochs = self.finetune_epochs or max(1, int(ctx.cfg.trainer.max_epochs) // 4)
        self.finetune_epochs = epochs
        train([], subdir="qat", max_epochs=epochs)

    def headline(self, summary: dict[str, Any]) -> str | None:
        s, m = self.facts(summary), summary["model"]
        lat = s.get("latency_ms") or {}
        speed = lat.get("speedup") or 0
        verdict = f"{speed:.2f}× faster" if speed >= 1 else f"{1 / speed:.2f}× SLOWER" if speed \
            else "n/a"
        acc = (s.get("int8_metrics") or {}).get("int8/test/acc")
        acc_text = f"{acc:.4f}" if acc is not None else "not evaluated"
        return (f"int8 size {m.get('size_bytes_int8', 0) / 2**20:.2f} MB "
                f"({m.get('compression_ratio', 0):.2f}× smaller than fp32)   int8 test acc "
                f"{acc_text}   CPU latency fp32 {lat.get('fp32', 0):.1f} ms → int8 "
                f"{lat.get('int8', 0):.1f} ms ({verdict})")

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        assert self._float is not None, "configure_model runs first"
        system = ctx.system.cpu().eval()
        x = _example(ctx, self.latency_batch)
        progress = _progress(ctx)
        with ctx.phase("convert"), tqdm(total=2, desc="int8 conversion", disable=not progress,
                                        leave=False) as bar:
            converted = convert_int8(system.backbone)
            bar.update()
            lowered = lower_x86(converted, x)
            bar.update()
        out: dict[str, Any] = {}
        if self.int8_eval:
            with ctx.phase("int8_eval"):
                out.update(self.evaluate(ctx, system.backbone, lowered))
        self._converted, self._int8_metrics = converted, dict(out.get("int8_metrics", {}))
        with ctx.phase("latency"):
            fp32_ms = cpu_latency_ms(self._float, x, self.latency_min_time,
                                     progress="latency fp32" if progress else None)
            int8_ms = cpu_latency_ms(lowered, x, self.latency_min_time,
                                     progress="latency int8" if progress else None)
        fp32_bytes, int8_bytes = state_dict_bytes(self._float), state_dict_bytes(converted)
        q_fp32 = quantized_weight_bytes(self._float, self.qat_scope)
        q_int8 = module_bytes(converted).get("int8", 0)
        out.update({
            "backend": "torchao.pt2e X86InductorQuantizer",
            "latency_ms": {"batch": self.latency_batch, "threads": torch.get_num_threads(),
                           "fp32": fp32_ms, "int8": int8_ms, "speedup": fp32_ms / int8_ms},
            "quantized_weights_bytes": {"fp32": q_fp32, "int8": q_int8,
                                        "ratio": q_fp32 / q_int8 if q_int8 else None},
            # The study's Keras QAT stored 16-bit values: its theoretical size, next to real int8.
            "model": {"size_bytes_fp32": fp32_bytes, "size_bytes_fp16": _fp16_bytes(self._float),
                      "size_bytes_int8": int8_bytes,
                      "compression_ratio": fp32_bytes / int8_bytes},
        })
        return out

    def saved_model(self, ctx: RunContext) -> SavedModel | None:
        # The int8 model as the run evaluated it: the converted graph (int8 weights, BN folded),
        # lowered at load to the same oneDNN kernels at the same batch size.
        assert self._converted is not None, "finalize runs first"
        return int8_graph_model(self._converted, self.latency_batch, self._int8_metrics,
                                "int8/test")

    def evaluate(self, ctx: RunContext, fake_quant: nn.Module,
                 lowered: nn.Module) -> dict[str, Any]:
        """Test split on CPU: metrics of the int8 model and its agreement with fake quantization."""
        dm = ctx.datamodule
        metrics = build_metrics(dm.task, dm.num_classes)
        fq_all, q_all = [], []
        with torch.no_grad():
            loader = dm.loader("test")
            for images, y in tqdm(loader, desc="int8 evaluation", disable=not _progress(ctx),
                                  leave=False):
                xb = dm.normalize(images)
                fq, q = fake_quant(xb), padded_forward(lowered, xb, self.latency_batch)
                metrics.update(q.float(), y.long() if is_multilabel(dm.task) else y)
                fq_all.append(fq)
                q_all.append(q)
        scalars, per_class = split_scalars(metrics.compute(), "int8/test", dm.class_names)
        if ctx.system.test_predictions:  # beside the fp32 model's in <run>/predictions.npz
            ctx.system.test_predictions["int8_probs"] = probabilities(torch.cat(q_all).float(),
                                                                      dm.task)
        return {"int8_metrics": scalars, "int8_per_class": per_class,
                "int8_agreement": agreement(torch.cat(fq_all), torch.cat(q_all), dm.task)}


def _progress(ctx: RunContext) -> bool:
    """Bars for the steps after training, as Lightning has for training
    (trainer.enable_progress_bar)."""
    shown = ctx.cfg.trainer.get("enable_progress_bar")
    return shown is None or bool(shown)  # None: Lightning's default, a bar


def _fp16_bytes(model: nn.Module) -> int:
    """Bytes of the state dict with every floating tensor in 16 bits (a figure; nothing saved)."""
    return sum(t.numel() * (2 if t.is_floating_point() else t.element_size())
               for t in model.state_dict().values())


def _frozen_batchnorm(backbone: nn.Module) -> bool:
    """True when a BatchNorm layer of the backbone has frozen (non-trainable) parameters."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm)
               and any(not p.requires_grad for p in m.parameters(recurse=False))
               for m in backbone.modules())


def _example(ctx: RunContext, n: int) -> torch.Tensor:
    """``n`` normalised training images (repeated if the split is smaller), on CPU."""
    dm = ctx.datamodule
    images, _ = next(iter(dm.loader("train", shuffle=False, batch_size=n)))
    x = dm.normalize(images)
    return x.repeat((n + len(x) - 1) // len(x), 1, 1, 1)[:n].contiguous()


def _import_torchao() -> None:
    try:
        import torchao  # noqa: F401
    except ImportError as err:
        raise EffbenchError("strategy=qat needs torchao; install it with "
                            "`.venv/bin/pip install torchao` (or `pip install -e .`).") from err
