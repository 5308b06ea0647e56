"""Any model as a Backbone: cut a classifier (torchvision or timm) into ordered stages.

A model is first broken into *units*: its top-level children, with first-level ``nn.Sequential``
containers opened (so ``layer1`` or ``blocks.3`` are units — the names timm's ``feature_info``
uses). One probe forward pass (eval mode, random input, hooks on every unit) tells which units the
feature path calls and in which order; units it never calls (a removed classifier, auxiliary
heads, head-side layers left out by ``classifier_layers=drop``) are not part of the backbone.

Two ways to run the result, chosen by checking the probe's output:

* **sequential** (most CNNs): running the called units one after another (plus the model's own
  pooling tail) gives exactly the model's features, so each stage is an ``nn.Sequential`` of units
  and the backbone is an ordinary :class:`Backbone` whose stages compose.
* **driven** (models whose forward is more than a chain of children: ViT's class token and
  position embedding, Swin, Inception's branches, ...): the backbone runs the model's own forward;
  stages are groups of units that own the parameters, in the order the probe saw them called, and a
  frozen prefix of k stages is run without autograd by re-enabling autograd in a forward pre-hook
  on the first unit of stage k. Stage groups whose calls interleave are merged, so every unit of a
  trainable stage runs after that hook.

Either way every parameter of the backbone sits in exactly one stage.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from effbench.backbones.base import Backbone, Preprocessing

Unit = tuple[str, nn.Module]  # dotted name in the model, module


def module_units(model: nn.Module) -> list[Unit]:
    """Top-level children; the children of a top-level ``nn.Sequential`` or ``nn.ModuleList`` are
    units themselves (a ModuleList is never called as a whole)."""
    units: list[Unit] = []
    for name, child in model.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child):
            units += [(f"{name}.{sub}", m) for sub, m in child.named_children()]
        else:
            units.append((name, child))
    return units


def holds_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def downsamples(module: nn.Module) -> bool:
    """Holds a strided convolution or a strided pooling layer (a new, smaller resolution)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and max(m.stride) > 1:
            return True
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            stride = m.stride if m.stride is not None else m.kernel_size
            stride = stride if isinstance(stride, Sequence) else (stride,)
            if max(stride) > 1:
                return True
    return False


# -- probing ---------------------------------------------------------------------------------------
@dataclass
class Trace:
    """What one probe forward pass saw: the output and, per called unit, its first/last call."""

    output: torch.Tensor
    calls: dict[str, tuple[int, int]]
    size: int
    failures: dict[int, str] = field(default_factory=dict)  # sizes tried first that failed

    def called_in_order(self, units: Sequence[Unit]) -> list[Unit]:
        called = [u for u in units if u[0] in self.calls]
        return sorted(called, key=lambda u: self.calls[u[0]][0])

    def each_called_once(self) -> bool:
        return all(first == last for first, last in self.calls.values())


class _Recorder:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def __call__(self, *_: Any) -> None:
        self.log.append(self.name)


def probe_input(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def trace(model: nn.Module, units: Sequence[Unit], run: Callable[[torch.Tensor], torch.Tensor],
          sizes: Iterable[int]) -> Trace:
    """Run ``run`` on a random batch (eval mode, no autograd) at the first size that works and
    record the order in which ``units`` are called. The last size's error propagates."""
    sizes = list(dict.fromkeys(int(s) for s in sizes))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    log: list[str] = []
    failures: dict[int, str] = {}
    handles = [m.register_forward_pre_hook(_Recorder(name, log)) for name, m in units]
    try:
        for i, size in enumerate(sizes):
            log.clear()
            try:
                with torch.no_grad():
                    out = run(probe_input(size))
            except Exception as err:
                if i == len(sizes) - 1:
                    raise
                failures[size] = f"{type(err).__name__}: {str(err).strip()[:150]}"
                continue
            calls: dict[str, tuple[int, int]] = {}
            for index, name in enumerate(log):
                first = calls.get(name, (index, index))[0]
                calls[name] = (first, index)
            return Trace(out, calls, size, failures)
        raise ValueError("no probe size given")
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode


def probe_sizes(image_size: int | None, native: int) -> tuple[int, ...]:
    """Probe at the run's input size first (small: 64 when the size is the model's own)."""
    return (int(image_size), int(native)) if image_size else (64, int(native))


def check_size(name: str, probe: Trace, image_size: int | None) -> None:
    """A model that cannot run at ``dataset.image_size`` (fixed-size ViTs, Inception's minimum)
    is refused now, in one sentence, rather than failing inside the first training step."""
    if image_size and int(image_size) in probe.failures:
        from effbench.errors import EffbenchError

        raise EffbenchError(
            f"{name} cannot run at dataset.image_size={image_size} "
            f"({probe.failures[int(image_size)].splitlines()[0]}); it runs at {probe.size} px: "
            f"use dataset.image_size={probe.size} or null (the model's own size).")


def same_output(candidate: torch.Tensor, reference: torch.Tensor) -> bool:
    if not isinstance(candidate, torch.Tensor) or candidate.shape != reference.shape:
        return False
    if not (torch.isfinite(candidate).all() and torch.isfinite(reference).all()):
        return False
    scale = float(reference.abs().max()) or 1.0
    return bool(torch.allclose(candidate, reference, rtol=1e-4, atol=1e-5 * scale))


def run_sequence(modules: Sequence[nn.Module], x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Eval-mode, no-grad run of ``modules`` one after another (for checking a candidate)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for m in modules:
                x = m(x)
        return x
    finally:
        for m, mode in modes.items():
            m.training = mode


# -- stage grouping --------------------------------------------------------------------------------
def group_after(ordered: Sequence[Unit], ends: set[str]) -> list[list[Unit]]:
    """Close a group after every unit named in ``ends`` (timm's ``feature_info`` modules); units
    after the last one join the last group; a parameter-holding stem before the first end unit
    becomes a group of its own."""
    groups: list[list[Unit]] = [[]]
    for unit in ordered:
        groups[-1].append(unit)
        if unit[0] in ends:
            groups.append([])
    if not groups[-1] and len(groups) > 1:
        groups.pop()
    elif len(groups) > 1:
        tail = groups.pop()
        groups[-1] += tail
    first = groups[0]
    end = next((i for i, u in enumerate(first) if u[0] in ends), None)
    if end is not None and end > 0:
        stem, rest = first[:end], first[end:]
        if any(holds_params(m) for _, m in stem) and any(holds_params(m) for _, m in rest):
            groups[0:1] = [stem, rest]
    return groups


def group_by_resolution(ordered: Sequence[Unit]) -> list[list[Unit]]:
    """A unit that downsamples opens a new group; units before the first one are the stem."""
    groups: list[list[Unit]] = [[]]
    for unit in ordered:
        if downsamples(unit[1]) and groups[-1] and any(downsamples(m) for _, m in groups[-1]):
            groups.append([])
        groups[-1].append(unit)
    return groups


def merge_empty(groups: list[list[Unit]]) -> list[list[Unit]]:
    """Groups without parameters join the next group (the last one joins the previous)."""
    out: list[list[Unit]] = []
    carry: list[Unit] = []
    for group in groups:
        carry += group
        if any(holds_params(m) for _, m in carry):
            out.append(carry)
            carry = []
    if carry:
        if out:
            out[-1] += carry
        else:
            out.append(carry)
    return out


def merge_interleaved(groups: list[list[Unit]], calls: dict[str, tuple[int, int]]
                      ) -> list[list[Unit]]:
    """Merge consecutive groups until each group's calls all come after the previous group's."""
    out: list[list[Unit]] = []
    last_call = -1
    for group in groups:
        first = min(calls[n][0] for n, _ in group)
        if out and first <= last_call:
            out[-1] += group
        else:
            out.append(list(group))
        last_call = max(last_call, max(calls[n][1] for n, _ in group))
    return out


def split_groups(groups: list[list[Unit]], minimum: int = 3) -> list[list[Unit]]:
    """Too few groups for useful freezing: one group per parameter-holding unit instead (with the
    parameter-free units attached), as long as that gives more groups."""
    if len(groups) >= minimum:
        return groups
    units = [u for g in groups for u in g]
    finer = merge_empty([[u] for u in units])
    return finer if len(finer) > len(groups) else groups


# -- stages --------------------------------------------------------------------------------------
def _key(name: str) -> str:
    return name.replace(".", "_")


def sequential_stage(parts: Iterable[Unit]) -> nn.Sequential:
    return nn.Sequential(OrderedDict((_key(n), m) for n, m in parts))


class RootParams(nn.Module):
    """The parameters and buffers held directly by a model's root module (ViT's class token and
    position embedding), shared, not copied: this module's parameter and buffer dicts *are* the
    model's, so moving, loading or saving it updates the model the backbone runs."""

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        self._parameters = owner._parameters
        self._buffers = owner._buffers
        self._non_persistent_buffers_set = owner._non_persistent_buffers_set

    def forward(self, *_: Any) -> None:  # pragma: no cover - never called
        raise RuntimeError("RootParams only holds parameters; the backbone runs the model")


class UnitGroup(nn.Module):
    """A driven stage: the units it owns (registered under their ``_`` names); it is not called —
    the backbone runs the model, which calls these very modules."""

    def __init__(self, parts: Iterable[Unit], root: nn.Module | None = None) -> None:
        super().__init__()
        if root is not None:
            self.root = RootParams(root)
        for name, module in parts:
            self.add_module(_key(name), module)

    def forward(self, *_: Any) -> None:  # pragma: no cover - never called
        raise RuntimeError("a driven stage is not called on its own; call the backbone")


class _GradGate:
    """Shared state of a driven forward: at which stage autograd comes back on."""

    def __init__(self) -> None:
        self.stage = 0
        self.restore = True
        self.opened = False


class _Reenable:
    """Forward pre-hook on the first unit of stage ``stage``: autograd back on (the frozen prefix
    ends here). A class, not a closure, so that backbones stay picklable and deep-copyable."""

    def __init__(self, gate: _GradGate, stage: int) -> None:
        self.gate, self.stage = gate, stage

    def __call__(self, *_: Any) -> None:
        gate = self.gate
        if gate.stage == self.stage and not gate.opened:
            gate.opened = True
            torch.set_grad_enabled(gate.restore)


class DrivenBackbone(Backbone):
    """A Backbone that runs its model's own forward (``runner(model, x)``); ``stages`` are
    :class:`UnitGroup`s that hold the parameters. See the module docstring."""

    def __init__(self, name: str, model: nn.Module, runner: Callable[[nn.Module, torch.Tensor],
                 torch.Tensor], groups: list[list[Unit]], feature_dim: int,
                 preprocessing: Preprocessing, extra: nn.Module | None = None) -> None:
        has_root = any(True for _ in model.parameters(recurse=False)) or any(
            True for _ in model.buffers(recurse=False))
        stages = [UnitGroup(g, root=model if i == 0 and has_root else None)
                  for i, g in enumerate(groups)]
        if extra is not None:  # e.g. the pooling of classifier_layers=drop
            stages[-1].add_module("pool", extra)
        super().__init__(name, stages, feature_dim, preprocessing)
        self.__dict__["model"] = model  # not registered: its modules are registered by the stages
        self.runner = runner
        self.gate = _GradGate()
        for i, group in enumerate(groups[1:], start=1):
            group[0][1].register_forward_pre_hook(_Reenable(self.gate, i))

    def train(self, mode: bool = True) -> DrivenBackbone:
        super().train(mode)
        self.__dict__["model"].training = mode  # the root's own flag (e.g. functional dropout)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self.__dict__["model"]
        k = self.frozen_prefix
        if k <= 0:
            return self.runner(model, x)
        if k >= len(self.stages):
            with torch.no_grad():
                return self.runner(model, x)
        gate = self.gate
        gate.stage, gate.restore, gate.opened = k, torch.is_grad_enabled(), False
        torch.set_grad_enabled(False)
        try:
            out = self.runner(model, x)
        finally:
            opened = gate.opened
            torch.set_grad_enabled(gate.restore)
            gate.stage, gate.opened = 0, False
        if not opened:  # cannot happen for a probed model; never train silently wrong
            raise RuntimeError(f"{self.name}: stage {k} was never entered in the forward pass")
        return out


class OwnerCall(nn.Module):
    """Last part of a sequential stage that calls a method of the owning model (timm's
    ``forward_head(x, pre_logits=True)``); it registers the units that method uses."""

    def __init__(self, owner: nn.Module, method: str, parts: Iterable[Unit],
                 **kwargs: Any) -> None:
        super().__init__()
        self.__dict__["owner"] = owner  # not registered: ``parts`` are its modules
        self.method, self.kwargs = method, dict(kwargs)
        for name, module in parts:
            self.add_module(_key(name), module)

    def train(self, mode: bool = True) -> OwnerCall:
        super().train(mode)
        self.__dict__["owner"].training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.__dict__["owner"], self.method)(x, **self.kwargs)


# -- loading a model's own state dict into the backbone --------------------------------------------
class ForeignKeys:
    """``load_state_dict`` pre-hook that lets a Backbone load its source model's state dict: model
    keys are renamed to the backbone's, and keys of the parts left out (the classifier, unused
    units) are ignored. (A class rather than a closure: backbones stay picklable.)"""

    def __init__(self, aliases: dict[str, str], ignored: Sequence[str] | str,
                 own: Iterable[str] = ()) -> None:
        self.aliases = aliases
        self.ignored = (ignored,) if isinstance(ignored, str) else tuple(ignored)
        self.own = frozenset(own)

    @property
    def head_prefix(self) -> str:  # the single prefix of the older torchvision-only hook
        return self.ignored[0] if self.ignored else ""

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str,
                 *_: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            local = key[len(prefix):]
            if local in self.own:
                continue
            if local in self.aliases:
                state_dict[prefix + self.aliases[local]] = state_dict.pop(key)
            elif self.ignored and local.startswith(self.ignored):
                del state_dict[key]


def foreign_keys(model: nn.Module, backbone: nn.Module, ignored: Sequence[str]) -> ForeignKeys:
    # The backbone holds the model's own tensors, so identical tensors pair up the two key sets.
    own = backbone.state_dict(keep_vars=True)
    backbone_key = {id(t): k for k, t in own.items()}
    aliases = {k: backbone_key[id(t)] for k, t in model.state_dict(keep_vars=True).items()
               if id(t) in backbone_key and k != backbone_key[id(t)]}
    dropped = [k for k, t in model.state_dict(keep_vars=True).items() if id(t) not in backbone_key]
    prefixes = list(dict.fromkeys([*ignored, *dropped]))
    return ForeignKeys(aliases, prefixes, own)


def add_load_pre_hook(module: nn.Module, hook: Callable[..., None]) -> None:
    # The public API arrived in torch 2.5; the private one (same hook signature with
    # with_module=True) covers torch 2.4, which pyproject still allows.
    from functools import partial

    register = getattr(module, "register_load_state_dict_pre_hook", None)
    if register is None:
        register = partial(module._register_load_state_dict_pre_hook, with_module=True)
    register(hook)


def resize_for(crop: int, crop_pct: float | None) -> int:
    """timm's resize rule: the short side before the centre crop is ``crop / crop_pct``."""
    if not crop_pct:
        return crop
    return int(math.floor(crop / float(crop_pct)))


def chain_tail(ordered: Sequence[Unit], probe: Trace, model: nn.Module,
               tails: Iterable[Callable[[], list[Unit]]]) -> list[Unit] | None:
    """The first candidate tail with which running ``ordered`` one after another reproduces the
    probe's output, or None when the model is not such a chain."""
    x = probe_input(probe.size)
    for make in tails:
        tail = make()
        try:
            out = run_sequence([m for _, m in [*ordered, *tail]], x, model)
        except Exception:  # shapes do not fit: not a chain with this tail
            continue
        if same_output(out, probe.output):
            return tail
    return None
