"""``prune``: the polynomial schedule, what is pruned, adaptive targets, permanence, savings."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from effbench.backbones import build_backbone
from effbench.errors import EffbenchError
from effbench.model import zipped_state_dict_bytes
from effbench.pipeline import KeepZeros
from effbench.summary import state_dict_bytes
from effbench.techniques.prune.technique import PolynomialSchedule, Prune, layer_sparsity
from tests.conftest import TINY_MULTILABEL, load_summary, run_cli, run_job

SMALL = ["strategy=prune", "backbone=small_cnn", "dataset.multilabel=true"]


class System(nn.Module):
    """The two attributes a strategy reads from ``ClassifierSystem``."""

    def __init__(self, backbone: nn.Module, num_classes: int = 3) -> None:
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(backbone.feature_dim, num_classes)


def pruned_system(arch: str, step: int | None = None, **kwargs) -> tuple[System, Prune]:
    """``arch`` with ``Prune(**kwargs)`` set up and its schedule applied at ``step`` (default: end),
    with 10 steps per epoch."""
    torch.manual_seed(0)
    system = System(build_backbone(arch, weights=None, image_size=32))
    strategy = Prune("prune", **kwargs)
    strategy.configure_model(SimpleNamespace(system=system,
                                             cfg=SimpleNamespace(backbone={"name": arch})))
    pruner = strategy._pruner
    pruner.resolve(10)
    pruner.apply(pruner.end_step if step is None else step)
    return system, strategy


def test_polynomial_schedule_formula() -> None:
    s = PolynomialSchedule(initial=0.1, final=0.5, begin=10, end=110, power=4)
    assert s(9) == 0.0
    assert s(10) == pytest.approx(0.1)
    assert s(60) == pytest.approx(0.5 - 0.4 * 0.5**4)
    assert s(110) == s(500) == 0.5
    assert all(s(t) <= s(t + 1) for t in range(120))  # never un-prunes


def test_study_schedule_in_epochs() -> None:
    """10 % at the middle of epoch 1, the target at the last step of epoch 7."""
    _, strategy = pruned_system("resnet18", final_sparsity=0.7)
    pruner = strategy._pruner
    assert (pruner.begin_step, pruner.end_step, pruner.every) == (5, 69, 1)
    assert pruner.scheduled(5) == pytest.approx(0.1)
    assert pruner.scheduled(69) == pytest.approx(0.7)


@pytest.mark.parametrize("step", [5, 20, 40])
def test_sparsity_follows_the_schedule(step: int) -> None:
    system, strategy = pruned_system("resnet18", step=step, final_sparsity=0.7)
    pruner = strategy._pruner
    want = pruner.scheduled(step)
    for name, module in pruner.layers.items():
        assert layer_sparsity(module) == pytest.approx(want, abs=1.5 / module.weight.numel()), name
    assert pruner.sparsity() == pytest.approx(want, abs=1e-4)


def test_only_conv_weights_are_pruned() -> None:
    system, strategy = pruned_system("resnet18", final_sparsity=0.5)
    convs = [m for m in system.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert list(strategy._pruner.layers.values()) == convs  # every conv, downsample ones too
    for name, module in system.named_modules():
        if isinstance(module, nn.Conv2d):
            assert layer_sparsity(module) == pytest.approx(0.5, abs=1e-3), name
        elif isinstance(module, (nn.BatchNorm2d, nn.Linear)):  # BN and the head: untouched
            assert not hasattr(module, "weight_mask"), name
            assert int((module.weight == 0).sum()) == 0, name
            if isinstance(module, nn.Linear):
                assert int((module.bias == 0).sum()) == 0, name
    assert all(not n.endswith("bias_orig") for n, _ in system.named_parameters())


def test_global_mode_ranks_all_layers_together() -> None:
    _, strategy = pruned_system("resnet18", final_sparsity=0.5, mode="global")
    per_layer = [layer_sparsity(m) for m in strategy._pruner.layers.values()]
    assert strategy._pruner.sparsity() == pytest.approx(0.5, abs=1e-6)
    assert max(per_layer) - min(per_layer) > 0.05  # not uniform: magnitudes decide


def test_adaptive_targets_by_output_channels() -> None:
    system, strategy = pruned_system("resnet18", scope="adaptive")
    want = {64: 0.25, 256: 0.40, 512: 0.55}  # the study's ResNet preset; 128 is not in it
    pruner = strategy._pruner
    convs = {f"backbone.{n}": m for n, m in system.backbone.named_modules()
             if isinstance(m, nn.Conv2d)}
    for name, module in convs.items():
        assert layer_sparsity(module) == pytest.approx(want.get(module.out_channels, 0.0),
                                                       abs=1e-3), name
        assert (name in pruner.layers) == (module.out_channels in want)
    assert {m.out_channels for m in convs.values()} == {64, 128, 256, 512}


def test_adaptive_default_and_custom_targets() -> None:
    _, strategy = pruned_system("resnet18", scope="adaptive", adaptive_default=0.3,
                                adaptive_targets={512: 0.8})
    by_channels = {m.out_channels: layer_sparsity(m) for m in strategy._pruner.layers.values()}
    assert by_channels == pytest.approx({64: 0.25, 128: 0.3, 256: 0.4, 512: 0.8}, abs=1e-3)


def test_densenet_preset_is_picked_from_the_name() -> None:
    _, strategy = pruned_system("densenet121", scope="adaptive")
    layers = strategy._pruner.layers.values()
    assert {m.out_channels for m in layers} == {32, 64}
    assert all(layer_sparsity(m) == pytest.approx(0.25 if m.out_channels == 32 else 0.5,
                                                  abs=1e-3) for m in layers)
    # The study's literal targets cover under a third of DenseNet121's conv weights.
    assert strategy._coverage == pytest.approx(0.313, abs=0.002)


def test_pruned_weights_stay_zero_through_training() -> None:
    torch.manual_seed(0)
    system, strategy = pruned_system("resnet18", final_sparsity=0.6)
    masks = {n: m.weight_mask.clone() for n, m in strategy._pruner.layers.items()}
    opt = torch.optim.AdamW(system.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(4, 3, 32, 32)
    for _ in range(3):
        loss = system.head(system.backbone(x)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, module in strategy._pruner.layers.items():
        assert torch.equal(module.weight[masks[name] == 0], torch.zeros(int((masks[name] == 0)
                                                                            .sum())))
        assert layer_sparsity(module) == pytest.approx(0.6, abs=1e-3)


def test_compressed_size_tracks_sparsity() -> None:
    for sparsity in (0.5, 0.7):
        system, strategy = pruned_system("resnet18", final_sparsity=sparsity)
        for module in strategy._pruner.layers.values():
            torch.nn.utils.prune.remove(module, "weight")
        ratio = zipped_state_dict_bytes(system) / state_dict_bytes(system)
        # Nonzero fp32 values barely deflate: the zipped model keeps about 1 - sparsity.
        assert 0.9 * (1 - sparsity) < ratio < (1 - sparsity) + 0.12, (sparsity, ratio)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"final_sparsity": 1.5}, "strategy.prune.final_sparsity=1.5"),
    ({"scope": "dense"}, "strategy.prune.scope='dense'"),
    ({"scope": "adaptive", "mode": "global"}, "strategy.prune.mode=layer"),
    ({"start": 3, "end": 1}, "start <= end"),
    ({"unit": "batch"}, "strategy.prune.unit='batch'"),
])
def test_bad_options_name_the_key(kwargs: dict, fragment: str) -> None:
    with pytest.raises(EffbenchError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        Prune("prune", **kwargs)


def test_end_to_end_multilabel(tmp_path: Path) -> None:
    """Through the run pipeline: schedule in steps, masks permanent, sizes and AUROC reported."""
    summary = run_job(tmp_path, [*SMALL, "strategy.prune.unit=step", "strategy.prune.start=1",
                                 "strategy.prune.end=4", "strategy.prune.frequency=1"])
    assert summary["status"] == "completed", summary["error"]
    s = load_summary(tmp_path / "run")
    assert 0.0 <= s["metrics"]["test/auroc_macro"] <= 1.0
    st, model = s["strategy"]["prune"], s["model"]
    assert st["schedule_completed"] and st["schedule_steps"] == {"begin": 1, "end": 4, "every": 1}
    hist = st["schedule_history"]
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    assert hist[0]["sparsity"] == pytest.approx(0.1, abs=1e-3)
    assert all(h["sparsity"] == pytest.approx(h["target"], abs=1e-3) for h in hist)
    # The best checkpoint is only taken once pruning is complete: the tested model is at 50 %.
    assert st["sparsity_per_layer"] == pytest.approx(
        {"backbone.stages.0.0": 0.5, "backbone.stages.1.0": 0.5}, abs=1e-3)
    assert model["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert model["size_bytes_compressed"] < model["size_bytes"]
    assert model["compression_ratio"] == pytest.approx(
        model["size_bytes"] / model["size_bytes_compressed"])
    assert s["time_s"]["compress"] > 0
    assert "weight_orig" not in json.dumps(st)


def test_adaptive_without_targets_fails_clearly(tmp_path: Path) -> None:
    summary = run_job(tmp_path, [*SMALL, "strategy.prune.scope=adaptive", "strategy.prune.end=1"])
    assert summary["status"] == "failed"
    assert "strategy.prune.adaptive_preset" in summary["error"]


def test_cli_run(tmp_path: Path) -> None:
    res = run_cli(["strategy=prune", *TINY_MULTILABEL, "trainer.max_epochs=2",
                   "strategy.prune.end=1.5",
                   f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    s = load_summary(tmp_path / "run")
    assert s["status"] == "completed" and "test/auroc_macro" in s["metrics"]
    assert s["model"]["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_kept_zeros_stay_zero_with_masks_moved_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A later phase (qat after prune) keeps the pruned weights at zero after every step, from
    masks moved to the weights' device once, at the start of training: a per-step copy from host
    memory is a synchronisation on a GPU."""
    weight = nn.Parameter(torch.ones(4, 4))
    zero = torch.zeros(4, 4, dtype=torch.bool)
    zero[0] = True
    keep = KeepZeros([(weight, zero)])
    keep.on_train_start(None, None)
    moved: list[tuple] = []
    real = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to",
                        lambda self, *a, **k: moved.append(a) or real(self, *a, **k))
    for _ in range(3):
        with torch.no_grad():
            weight.add_(1.0)  # an optimizer step moves every weight
        keep.on_train_batch_end(None, None, None, None, 0)
        assert torch.all(weight[0] == 0) and torch.all(weight[1:] > 0)
    assert moved == []
