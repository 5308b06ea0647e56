"""``ptq``: post-training quantization. The model trains exactly as the plain recipe trains it
(``ptq`` changes nothing before or during the shared fit); after the test of the best checkpoint,
``finalize`` converts a copy of it and measures what the conversion is worth on CPU:

- ``dtype=int8``: static int8 PT2E quantization (torchao's ``X86InductorQuantizer``, the stack
  ``qat`` uses), its activation ranges calibrated on ``calibration_batches`` training batches;
- ``dtype=fp16``: every floating tensor cast to float16, computing in float16 (the 16-bit form of
  study 004, Table 12).

Facts: the converted model's test metrics on CPU (``int8/test/…`` or ``fp16/test/…``), its
agreement with the fp32 model, sizes and CPU latency of both. The run's model (``<run>/model``)
is the converted one: an ``int8_graph`` for int8, a ``network`` holding float16 tensors for fp16.
See docs/ptq.md.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from effbench.data.base import EpochShuffle
from effbench.errors import EffbenchError
from effbench.metrics import build_metrics, probabilities, split_scalars
from effbench.model import cpu_latency_ms, module_bytes, sparse
from effbench.model.int8 import agreement, lower_x86, padded_forward, quantized_weight_bytes
from effbench.model.saved import Network, SavedModel, int8_graph_model, network_model
from effbench.model.shapes import module_shapes
from effbench.summary import state_dict_bytes
from effbench.task import is_multilabel
from effbench.technique import Technique, register
from effbench.techniques.ptq import convert

if TYPE_CHECKING:
    from effbench.context import RunContext
    from effbench.data.base import ImageDataModule

log = logging.getLogger(__name__)

DTYPES = ("int8", "fp16")
DEFAULT_SCOPE, DEFAULT_CALIBRATION_BATCHES = "conv", 8
# Options that only int8 reads (fp16 has nothing to calibrate and casts every layer).
INT8_ONLY = ("scope", "calibration_batches")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@register
class Ptq(Technique):
    """Post-training quantization (see the module docstring)."""

    name = "ptq"
    # Last: it converts whatever the others delivered (a settled pruned model included), and the
    # save phase asks the last technique first, so the converted form is the one kept.
    order = 70
    acts_on = frozenset({"export"})

    def __init__(self, name: str = "ptq", dtype: str = "int8",
                 calibration_batches: int | None = None, scope: str | None = None,
                 latency_batch: int = 16, latency_min_time: float = 1.0) -> None:
        super().__init__(name)
        self.dtype = self._checked_dtype(dtype)
        self._check_int8_only({"scope": scope, "calibration_batches": calibration_batches})
        int8 = self.dtype == "int8"
        self.scope = self._checked_scope(scope) if int8 else "all"  # fp16 casts every layer
        self.calibration_batches = self._checked_batches(calibration_batches) if int8 else 0
        if not _positive_int(latency_batch):
            raise EffbenchError(f"strategy.{self.name}.latency_batch={latency_batch!r} must be an "
                                "integer >= 1, e.g. 16.")
        if isinstance(latency_min_time, bool) or not isinstance(latency_min_time, int | float) \
                or not latency_min_time > 0:
            raise EffbenchError(f"strategy.{self.name}.latency_min_time={latency_min_time!r} must "
                                "be a number of seconds > 0, e.g. 1.0.")
        self.latency_batch, self.latency_min_time = latency_batch, float(latency_min_time)
        self._converted: torch.fx.GraphModule | None = None  # int8: the graph kept
        self._metrics: dict[str, float] = {}  # the converted model's, recorded in its manifest

    # -- options ----------------------------------------------------------------------------------
    def _checked_dtype(self, dtype: Any) -> str:
        if dtype not in DTYPES:
            raise EffbenchError(f"strategy.{self.name}.dtype={dtype!r} is not one of "
                                f"{', '.join(DTYPES)}; set strategy.{self.name}.dtype=int8 or "
                                "fp16.")
        return str(dtype)

    def _check_int8_only(self, given: dict[str, Any]) -> None:
        if self.dtype == "int8":
            return
        for key in INT8_ONLY:
            if given[key] is not None:
                raise EffbenchError(f"strategy.{self.name}.{key}={given[key]!r} only takes effect "
                                    f"with strategy.{self.name}.dtype=int8 (fp16 casts every "
                                    "layer and calibrates nothing); remove it.")

    def _checked_scope(self, scope: str | None) -> str:
        scope = DEFAULT_SCOPE if scope is None else scope
        if scope not in convert.SCOPES:
            raise EffbenchError(f"strategy.{self.name}.scope={scope!r} is not one of "
                                f"{', '.join(convert.SCOPES)}; set strategy.{self.name}.scope="
                                "conv or all.")
        return scope

    def _checked_batches(self, batches: int | None) -> int:
        batches = DEFAULT_CALIBRATION_BATCHES if batches is None else batches
        if not _positive_int(batches):
            raise EffbenchError(f"strategy.{self.name}.calibration_batches={batches!r} must be an "
                                "integer >= 1, e.g. 8.")
        return batches

    # -- composition and hooks --------------------------------------------------------------------
    def incompatible(self, other: Technique) -> str | None:
        if "export" in other.acts_on:
            return (f"both convert the trained model ({other.name} to its own form, "
                    f"{self.name} to {self.dtype}), and a run keeps one converted model")
        return None

    def check(self, ctx: RunContext) -> None:
        if self.dtype == "int8":
            try:
                import torchao  # noqa: F401
            except ImportError as err:
                raise EffbenchError(f"strategy.{self.name}.dtype=int8 needs torchao; install it "
                                    "with `.venv/bin/pip install torchao` (or `pip install -e "
                                    f".`), or set strategy.{self.name}.dtype=fp16.") from err

    def finalize(self, ctx: RunContext) -> dict[str, Any]:
        network = convert.float_network(ctx.system)
        x = _example(ctx.datamodule, self.latency_batch)
        if self.dtype == "int8":
            run, out = self._int8(ctx, network, x)
        else:
            run, out = self._fp16(ctx, network)
        with ctx.phase(f"{self.dtype}_eval"):
            out.update(self._evaluate(ctx, network, run))
        self._metrics = dict(out[f"{self.dtype}_metrics"])
        with ctx.phase("latency"):
            out["latency_ms"] = self._latency(ctx, network, run, x)
        return out

    def saved_model(self, ctx: RunContext) -> SavedModel | None:
        # The converted model as the run evaluated it: int8, the converted graph lowered at load
        # to the same oneDNN kernels at the same batch size; fp16, its float16 tensors.
        if self.dtype == "fp16":
            return self._fp16_saved(ctx)
        assert self._converted is not None, "finalize runs first"
        return int8_graph_model(self._converted, self.latency_batch, self._metrics, "int8/test")

    def headline(self, summary: dict[str, Any]) -> str | None:
        s, m, p = self.facts(summary), summary.get("model", {}), self.dtype
        lat = s.get("latency_ms") or {}
        speed = lat.get("speedup") or 0
        verdict = (f"{speed:.2f}× faster" if speed >= 1 else f"{1 / speed:.2f}× SLOWER") \
            if speed else "n/a"
        how = (f"static, {s.get('calibration_batches_used', 0)} calibration batches"
               if p == "int8" else "cast")
        acc = _text((s.get(f"{p}_metrics") or {}).get(f"{p}/test/acc"))
        fp32_acc = _text((summary.get("metrics") or {}).get("test/acc"))
        return (f"{p} ({how}) size {m.get(f'size_bytes_{p}', 0) / 2**20:.2f} MB "
                f"({m.get('compression_ratio', 0):.2f}× smaller than fp32)   test acc fp32 "
                f"{fp32_acc} → {p} {acc} (agreement {_text(s.get(f'{p}_agreement'), 3)})   "
                f"CPU latency fp32 {lat.get('fp32', 0):.1f} ms → {p} {lat.get(p, 0):.1f} ms "
                f"({verdict})")

    # -- the conversions --------------------------------------------------------------------------
    def _int8(self, ctx: RunContext, network: nn.Module, x: torch.Tensor,
              ) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
        dm, bar = ctx.datamodule, _progress(ctx)
        with ctx.phase("calibrate"):
            prepared = convert.prepare_int8(network, x, self.scope)
            batches = tqdm(calibration_batches(dm, self.calibration_batches),
                           total=self.calibration_batches, desc="int8 calibration",
                           disable=not bar, leave=False)
            used, images = convert.calibrate(prepared, batches)
        if used < self.calibration_batches:
            log.warning("the training split has %d batches: int8 is calibrated on those, not on "
                        "strategy.%s.calibration_batches=%d", used, self.name,
                        self.calibration_batches)
        with ctx.phase("convert"):
            converted = convert.convert_int8(prepared)
            lowered = lower_x86(converted, x)
        self._converted = converted
        fp32_bytes, int8_bytes = state_dict_bytes(network), state_dict_bytes(converted)
        q_fp32 = quantized_weight_bytes(network, self.scope)
        q_int8 = module_bytes(converted).get("int8", 0)
        return (lambda xb: padded_forward(lowered, xb, self.latency_batch)), {
            "backend": "torchao.pt2e X86InductorQuantizer (static)",
            "calibration_batches_used": used, "calibration_images": images,
            "quantized_weights_bytes": {"fp32": q_fp32, "int8": q_int8,
                                        "ratio": q_fp32 / q_int8 if q_int8 else None},
            "model": {"size_bytes_fp32": fp32_bytes, "size_bytes_int8": int8_bytes,
                      "compression_ratio": fp32_bytes / int8_bytes},
        }

    def _fp16(self, ctx: RunContext, network: nn.Module,
              ) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
        with ctx.phase("convert"):
            half = convert.HalfNetwork(network)
        fp32_bytes, fp16_bytes = state_dict_bytes(network), state_dict_bytes(half.network)
        return half, {
            "backend": "torch float16 cast (float16 compute on CPU)",
            "calibration_batches_used": 0, "calibration_images": 0,
            # size_bytes_effective: what effbench-compare's Δ size takes for this run (it knows
            # int8 and compressed sizes by name, not a 16-bit one).
            "model": {"size_bytes_fp32": fp32_bytes, "size_bytes_fp16": fp16_bytes,
                      "size_bytes_effective": fp16_bytes,
                      "compression_ratio": fp32_bytes / fp16_bytes},
        }

    def _fp16_saved(self, ctx: RunContext) -> SavedModel:
        """The ``network`` form with float16 tensors (the loader copies them into an fp32
        network: fp16 values, fp32 compute). Mostly-zero tensors (a pruned model's) are stored by
        their nonzeros and the layer shapes recorded, as prune saves its model."""
        model = network_model(ctx)
        half = {k: v.half() if v.is_floating_point() else v for k, v in model.tensors.items()}
        model.tensors, model.info["sparse"] = sparse.encode(half)
        model.info["shapes"] = module_shapes(Network(ctx.system.backbone, ctx.system.head))
        model.info["dtype"] = "float16"
        model.metrics, model.metric_prefix = dict(self._metrics), "fp16/test"
        return model

    # -- what the converted model is worth --------------------------------------------------------
    def _evaluate(self, ctx: RunContext, network: nn.Module,
                  run: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        """Test split on CPU: the converted model's metrics, its agreement with fp32."""
        dm, p = ctx.datamodule, self.dtype
        metrics = build_metrics(dm.task, dm.num_classes)
        ref_all, out_all = [], []
        with torch.no_grad():
            for images, y in tqdm(dm.loader("test"), desc=f"{p} evaluation",
                                  disable=not _progress(ctx), leave=False):
                xb = dm.normalize(images)
                ref, out = network(xb), run(xb).float()
                metrics.update(out, y.long() if is_multilabel(dm.task) else y)
                ref_all.append(ref)
                out_all.append(out)
        scalars, per_class = split_scalars(metrics.compute(), f"{p}/test", dm.class_names)
        if p == "int8" and ctx.system.test_predictions:  # predictions.npz holds int8's only
            ctx.system.test_predictions["int8_probs"] = probabilities(torch.cat(out_all), dm.task)
        return {f"{p}_metrics": scalars, f"{p}_per_class": per_class,
                f"{p}_agreement": agreement(torch.cat(ref_all), torch.cat(out_all), dm.task)}

    def _latency(self, ctx: RunContext, network: nn.Module,
                 run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> dict[str, Any]:
        bar = _progress(ctx)
        fp32_ms = cpu_latency_ms(network, x, self.latency_min_time,
                                 progress="latency fp32" if bar else None)
        ms = cpu_latency_ms(run, x, self.latency_min_time,
                            progress=f"latency {self.dtype}" if bar else None)
        return {"batch": self.latency_batch, "threads": torch.get_num_threads(),
                "fp32": fp32_ms, self.dtype: ms, "speedup": fp32_ms / ms}


def calibration_batches(dm: ImageDataModule, n: int) -> Iterator[torch.Tensor]:
    """The first ``n`` normalised batches of a seeded shuffle of the training split (a sorted
    file list would otherwise calibrate on one class); independent of any technique's sampler,
    without augmentation."""
    dm.setup()
    order = EpochShuffle(len(dm.datasets["train"]), dm.shuffle_seed)
    loader = dm.loader("train", shuffle=False, sampler=order)
    for images, _ in itertools.islice(loader, n):
        yield dm.normalize(images)


def _example(dm: ImageDataModule, n: int) -> torch.Tensor:
    """``n`` normalised training images (repeated if the split is smaller): the shape the
    int8 graph is lowered to and latency is measured at."""
    images, _ = next(iter(dm.loader("train", shuffle=False, sampler=None, batch_size=n)))
    x = dm.normalize(images)
    return x.repeat((n + len(x) - 1) // len(x), 1, 1, 1)[:n].contiguous()


def _progress(ctx: RunContext) -> bool:
    """Bars for the steps after training, as Lightning shows them (trainer.enable_progress_bar)."""
    shown = ctx.cfg.trainer.get("enable_progress_bar")
    return shown is None or bool(shown)


def _text(value: float | None, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if value is not None else "n/a"
