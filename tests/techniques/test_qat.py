"""``qat``: fake quantization in training, int8 conversion, its size, accuracy and agreement."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchao.quantization.pt2e import FakeQuantizeBase

from effbench.errors import EffbenchError
from effbench.model import module_bytes
from effbench.techniques.qat.technique import Qat, agreement, convert_int8, lower_x86, prepare_qat
from tests.conftest import TINY_MULTILABEL, load_summary, run_cli, run_job

SMALL = ["strategy=qat", "backbone=small_cnn", "dataset.multilabel=true", "dataset.num_test=40",
         "strategy.qat.latency_min_time=0.1"]


@pytest.mark.parametrize("scope", ["conv", "all"])
def test_end_to_end_multilabel(tmp_path: Path, scope: str) -> None:
    summary = run_job(tmp_path, [*SMALL, f"strategy.qat.qat_scope={scope}",
                                 "hardware.precision=bf16-mixed"])
    assert summary["status"] == "completed", summary["error"]
    s = load_summary(tmp_path / "run")
    st, model = s["strategy"]["qat"], s["model"]
    assert 0.0 <= s["metrics"]["test/auroc_macro"] <= 1.0
    assert 0.0 <= st["int8_metrics"]["int8/test/auroc_macro"] <= 1.0
    assert set(st["int8_per_class"]["int8/test/auroc_per_class"]) == {f"class_{i}"
                                                                       for i in range(4)}
    # int8 and the trained fake-quant model predict the same labels on most test samples.
    assert st["int8_agreement"] >= 0.8
    # Quantized weights shrink fourfold (int8 vs fp32); conv-only leaves the big Linear fp32.
    assert st["quantized_weights_bytes"]["ratio"] == pytest.approx(4.0, rel=0.02)
    ratio = model["compression_ratio"]
    assert model["size_bytes_int8"] < model["size_bytes_fp32"]
    assert (3.5 < ratio < 4.1) if scope == "all" else (1.0 < ratio < 1.1)
    assert st["latency_ms"]["fp32"] > 0 and st["latency_ms"]["int8"] > 0
    # Fake quantization trains in full precision whatever the hardware preset asked.
    assert s["hardware"]["precision"] == "32-true" and st["precision"] == "32-true"
    assert {"convert", "int8_eval", "latency"} <= set(s["time_s"])
    # Each phase has its own key; training time (what compare tables) is training only.
    from effbench.compare.keys import train_time

    assert train_time(s["time_s"]) == s["time_s"]["train"]


class ConvBNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
                                      nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.mark.slow
def test_conv_bn_is_fused_trained_and_folded() -> None:
    """QAT on a Conv-BN network: BN trains fused with its conv and is folded away in int8."""
    torch.manual_seed(0)
    x = torch.randn(32, 3, 16, 16)
    y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0].mean((1, 2)) > 0).long()
    model = prepare_qat(ConvBNNet(), x[:4], "conv")
    assert any(isinstance(m, FakeQuantizeBase) for m in model.modules())
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    converted = convert_int8(model)
    targets = {str(n.target) for n in converted.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in t for t in targets)  # folded into the conv weights
    assert module_bytes(converted)["int8"] == 3 * 16 * 9 + 16 * 32 * 9  # both convs, int8
    lowered = lower_x86(converted, x[:8])
    with torch.no_grad():
        fq, q = model(x[:8]), lowered(x[:8])
    assert agreement(fq, q, "multiclass") >= 0.75


def test_bad_scope_names_the_key() -> None:
    with pytest.raises(EffbenchError, match="strategy.qat.qat_scope='everything'"):
        Qat("qat", qat_scope="everything")


def test_cli_run(tmp_path: Path) -> None:
    res = run_cli(["strategy=qat", *TINY_MULTILABEL, "trainer.max_epochs=1",
                   "strategy.qat.latency_min_time=0.1", f"hydra.run.dir={tmp_path / 'run'}"],
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    s = load_summary(tmp_path / "run")
    assert s["status"] == "completed" and "test/auroc_macro" in s["metrics"]
    assert "int8/test/auroc_macro" in s["strategy"]["qat"]["int8_metrics"]


def test_explicit_other_precision_is_refused(tmp_path: Path) -> None:
    """qat needs fp32 fake quantization: an explicit trainer.precision cannot take effect."""
    res = run_cli(["strategy=qat", "trainer.precision=bf16-mixed", *TINY_MULTILABEL],
                  cwd=tmp_path)
    assert res.returncode != 0
    assert "trainer.precision=bf16-mixed cannot take effect" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_conv_bn_rewrites_only_for_present_convolutions_same_int8_model(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """torchao rewrites Conv-BN once per convolution kind (conv1d, conv2d, transposed ones),
    exporting its patterns each time; effbench skips the kinds the graph lacks
    (qat/patterns.py). The int8 model is the very one torchao makes, from far fewer exports."""
    from torchao.quantization.pt2e import qat_utils

    from effbench.techniques.qat import patterns

    exports: list[int] = []
    real = qat_utils._get_aten_graph_module_for_pattern
    monkeypatch.setattr(qat_utils, "_get_aten_graph_module_for_pattern",
                        lambda *a, **k: exports.append(1) or real(*a, **k))
    monkeypatch.setattr(patterns, "PATTERN_MODULES", ())  # every export made, none remembered
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def int8_model() -> tuple[torch.fx.GraphModule, int]:
        torch.manual_seed(0)
        before = len(exports)
        model = prepare_qat(ConvBNNet(), x[:4], "conv")
        model(x)  # a training-mode pass: BN statistics and observer ranges see data
        model.eval()
        return convert_int8(model), len(exports) - before

    skipped, skipped_exports = int8_model()
    with monkeypatch.context() as m:  # torchao's own flow: nothing is wrapped
        m.setattr(patterns, "HELPERS", ("no_such_helper",))
        full, full_exports = int8_model()
    assert qat_utils._fold_conv_bn_qat_helper.__module__ == qat_utils.__name__  # restored
    assert skipped.code == full.code
    assert skipped.state_dict().keys() == full.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(skipped.state_dict().values(),
                                                 full.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(skipped(x), full(x))
    assert 0 < skipped_exports * 3 <= full_exports


def test_pattern_exports_are_made_once_per_process_same_int8_model(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """torchao exports every rewrite's patterns on each call (Conv-BN fusion and folding, the
    train/eval switch of an exported model); effbench remembers them for the process
    (qat/patterns.py): a second QAT model makes no pattern export, and its fake-quant outputs and
    int8 model are the very ones the first made from its own exports."""
    from torchao.quantization.pt2e import qat_utils
    from torchao.quantization.pt2e import utils as pt2e_utils

    from effbench.techniques.qat import patterns

    monkeypatch.setattr(patterns, "_exported", {})
    exports: list[int] = []
    for module in (qat_utils, pt2e_utils):  # count what reaches torchao's own helper
        real = module._get_aten_graph_module_for_pattern
        monkeypatch.setattr(module, "_get_aten_graph_module_for_pattern",
                            lambda *a, _real=real, **k: exports.append(1) or _real(*a, **k))
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def int8_model() -> tuple[torch.fx.GraphModule, torch.Tensor, int]:
        torch.manual_seed(0)
        before = len(exports)
        model = prepare_qat(ConvBNNet(), x[:4], "conv")
        model(x)  # a training-mode pass: BN statistics and observer ranges see data
        model.train()
        training = model.code
        model.eval()  # the switch still rewrites the graph (BatchNorm in eval)
        assert model.code != training
        with torch.no_grad():
            fake_quant = model(x)
        return convert_int8(model), fake_quant, len(exports) - before

    first, first_fq, first_exports = int8_model()  # nothing remembered yet: every export made
    second, second_fq, second_exports = int8_model()
    assert first_exports > 0 and second_exports == 0
    assert first.code == second.code
    assert first.state_dict().keys() == second.state_dict().keys()
    assert all(torch.equal(u, v) for u, v in zip(first.state_dict().values(),
                                                 second.state_dict().values()))
    assert torch.equal(first_fq, second_fq)
    with torch.no_grad():
        assert torch.equal(first(x), second(x))
