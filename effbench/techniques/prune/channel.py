"""Channel (structured) pruning with torch-pruning: conv output channels are removed for real, so
the model gets fewer parameters, fewer multiply-accumulates and lower latency on dense kernels.

torch-pruning's ``DependencyGraph`` finds which layers must shrink together (a residual add ties
every conv feeding it, a DenseNet concatenation maps channel indices into the next layer's
inputs); ``BasePruner`` (``MetaPruner``) ranks each group by ``MagnitudeImportance`` (L1 here, as
the unstructured masks) and removes the lowest. What this module adds around it:

- tracing a model whose frozen prefix runs under ``no_grad`` (the graph is traced through autograd);
- the pruner's ratio per call comes from the caller (prune's polynomial schedule), not from
  torch-pruning's own linear steps;
- pruning replaces parameters by fresh ``nn.Parameter`` objects: their ``requires_grad`` is put
  back and the optimizer's references and state (momentum, Adam moments) are sliced to the kept
  channels, so training goes on where it was (lr, scheduler, param groups untouched).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from effbench.errors import EffbenchError

CONV = nn.modules.conv._ConvNd


def import_torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError as err:
        raise EffbenchError("strategy.prune.structure=channel needs torch-pruning; install it "
                            "with `.venv/bin/pip install torch-pruning` (or `pip install -e .`)."
                            ) from err
    return torch_pruning


def conv_layers(root: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """Conv layers under ``root`` by qualified name (``prefix.<name>``)."""
    return {f"{prefix}.{n}" if n else prefix: m for n, m in root.named_modules()
            if isinstance(m, CONV)}


def out_channels(layers: dict[str, nn.Module]) -> dict[str, int]:
    return {n: int(m.out_channels) for n, m in layers.items()}


def channel_sparsity(initial: dict[str, int], layers: dict[str, nn.Module]) -> float:
    """Fraction of the layers' initial output channels that are gone."""
    return 1.0 - sum(m.out_channels for m in layers.values()) / sum(initial.values())


def example_batch(datamodule: Any, n: int) -> torch.Tensor:
    """``n`` normalised training images (repeated if the split is smaller), on CPU."""
    images, _ = next(iter(datamodule.loader("train", shuffle=False, batch_size=n)))
    x = datamodule.normalize(images)
    return x.repeat((n + len(x) - 1) // len(x), 1, 1, 1)[:n].contiguous()


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward of ``example`` (torch-pruning's op counter counts a
    conv position as k²·in·out, i.e. MACs; FLOPs ≈ 2 × MACs)."""
    tp = import_torch_pruning()
    macs, _ = tp.utils.count_ops_and_params(model, example)
    return int(macs)


@contextmanager
def traceable(model: nn.Module) -> Iterator[None]:
    """Lets autograd see every layer while the dependency graph is traced: a frozen prefix runs
    under ``no_grad`` and frozen parameters make no ``grad_fn``, which would cut the graph. The
    tracer also leaves the model in eval mode; modes, flags and the prefix are put back."""
    modes = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    backbones = [m for m in model.modules() if getattr(m, "frozen_prefix", 0)]
    prefixes = {b: b.frozen_prefix for b in backbones}
    try:
        for b in backbones:
            b.frozen_prefix = 0
        for p in flags:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for b, k in prefixes.items():
            b.frozen_prefix = k
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, training in modes.items():
            m.train(training)


class _RatioPerCall:
    """torch-pruning indexes its ratio sequence by its call count; this sequence asks the caller's
    schedule at call time (the steps are only known once Lightning knows the epoch length)."""

    def __init__(self, ratio_at: Callable[[int, float], float], final: float) -> None:
        self.ratio_at, self.final = ratio_at, final

    def __getitem__(self, call: int) -> float:
        return self.ratio_at(call, self.final)


def build_channel_pruner(model: nn.Module, example: torch.Tensor, ignored: list[nn.Module],
                         final: float, ratio_at: Callable[[int, float], float],
                         global_ranking: bool) -> Any:
    """A torch-pruning pruner over ``model``'s conv groups (``ignored`` never lose outputs: the
    head); its ``step()`` call ``i`` (from 1) prunes to ``ratio_at(i, final)`` of the channels."""
    tp = import_torch_pruning()
    try:
        with traceable(model):
            return tp.pruner.BasePruner(
                model, example, importance=tp.importance.MagnitudeImportance(p=1),
                pruning_ratio=final, global_pruning=global_ranking, ignored_layers=ignored,
                root_module_types=[CONV],  # channels of convs; Linear layers only lose inputs
                iterative_pruning_ratio_scheduler=lambda r, _steps: _RatioPerCall(ratio_at, r),
                iterative_steps=sys.maxsize)  # the caller's schedule decides when it is done
    except EffbenchError:
        raise
    except Exception as err:  # noqa: BLE001 - any tracing failure is the same advice
        raise EffbenchError(f"strategy.prune.structure=channel cannot trace this backbone's "
                            f"channel dependencies ({type(err).__name__}: {err}); use "
                            "strategy.prune.structure=unstructured.") from err


# -- parameters replaced by pruning -------------------------------------------------------------
@dataclass(frozen=True)
class Swap:
    """``new`` is ``old`` with only ``keep`` along ``dim``."""

    old: nn.Parameter
    new: nn.Parameter
    keep: torch.Tensor
    dim: int


@contextmanager
def recorded_swaps() -> Iterator[list[Swap]]:
    """Records every parameter torch-pruning replaces. Each replacement goes through
    ``BasePruningFunc._prune_parameter_and_grad`` (one place for every layer type), which makes a
    fresh ``nn.Parameter``: trainable and unknown to the optimizer. Wrapped here, the new
    parameter keeps the old one's ``requires_grad`` (frozen layers stay frozen) and memory format
    (channels_last), and the kept indices are known for the optimizer state."""
    base = import_torch_pruning().pruner.function.BasePruningFunc
    original = base._prune_parameter_and_grad
    swaps: list[Swap] = []

    def wrapped(self: Any, weight: nn.Parameter, keep_idxs: Any, dim: int) -> nn.Parameter:
        new = original(self, weight, keep_idxs, dim)
        if weight.dim() == 4 and not weight.is_contiguous() and weight.is_contiguous(
                memory_format=torch.channels_last):
            new.data = new.data.contiguous(memory_format=torch.channels_last)
        new.requires_grad_(weight.requires_grad)
        swaps.append(Swap(weight, new, torch.as_tensor(list(keep_idxs), dtype=torch.long), dim))
        return new

    base._prune_parameter_and_grad = wrapped
    try:
        yield swaps
    finally:
        base._prune_parameter_and_grad = original


def _sliced(value: Any, swap: Swap) -> Any:
    if torch.is_tensor(value) and value.shape == swap.old.shape and value.dim() > 0:
        return value.index_select(swap.dim, swap.keep.to(value.device))
    return value  # step counters and other per-parameter scalars


def remap_optimizer(optimizer: torch.optim.Optimizer, swaps: list[Swap]) -> int:
    """Points ``optimizer`` at the new parameters and slices their state to the kept channels
    (in order: a parameter pruned twice in one step is swapped twice). Returns how many of the
    swapped parameters the optimizer held."""
    held = 0
    for swap in swaps:
        for group in optimizer.param_groups:
            params = group["params"]
            for i, p in enumerate(params):
                if p is swap.old:
                    params[i] = swap.new
                    held += 1
        state = optimizer.state.pop(swap.old, None)
        if state is not None:
            optimizer.state[swap.new] = {k: _sliced(v, swap) for k, v in state.items()}
    return held
