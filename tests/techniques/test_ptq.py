"""``ptq``: the trained model converted after training, to static int8 (calibrated on a stated
number of training batches) or fp16; what is saved and evaluated really is that model, and it
scores close to the fp32 one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from effbench.backbones import build_backbone
from effbench.errors import EffbenchError
from effbench.model import module_bytes
from effbench.model.saved import evaluate, load
from effbench.stack import check_compatible
from effbench.techniques.ptq import convert
from effbench.techniques.ptq.technique import Ptq
from effbench.techniques.qat.technique import Qat
from tests.conftest import run_cli, run_job
from tests.helpers.cli import one_error_line
from tests.helpers.tiny import tiny

# Noisy enough that the fp32 model is not perfect (acc ~0.6), so "close to fp32" means something;
# 96 training images in 6 batches of 16, 64 test images.
OPTIONS = ["backbone=small_cnn", "dataset.noise=3.0", "dataset.num_test=64",
        "dataset.batch_size=16", "strategy.ptq.latency_min_time=0.05",
        "strategy.ptq.latency_batch=8"]
BASE = ["strategy=ptq", *OPTIONS]
PIXELS = 3 * 32 * 32  # synthetic images at small_cnn's 32 px


def _weights(summary: dict) -> dict[str, torch.Tensor]:
    saved = summary["model"]["saved"]
    assert "error" not in saved, saved
    return load_file(str(Path(saved["path"]) / "weights.safetensors"))


def _conv_and_linear_weights() -> list[int]:
    """Element counts of every conv and linear weight of the run's small_cnn + 4-class head."""
    backbone = build_backbone(name="small_cnn", weights=None, image_size=32)
    network = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, 4))
    return sorted(m.weight.numel() for m in network.modules()
                  if isinstance(m, nn.Conv2d | nn.Linear))


def _input_observer(prepared: torch.fx.GraphModule) -> nn.Module:
    """The observer of the graph's input: it sees every calibration image once."""
    node = next(n for n in prepared.graph.nodes if n.op == "call_module"
                and n.args and getattr(n.args[0], "op", None) == "placeholder"
                and hasattr(prepared.get_submodule(n.target), "histogram"))
    return prepared.get_submodule(node.target)


def test_int8_model_is_int8_calibrated_as_stated_and_close_to_fp32(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}
    real = convert.calibrate

    def spy(prepared: torch.fx.GraphModule, batches) -> tuple[int, int]:
        out = real(prepared, batches)
        seen["observed"] = float(_input_observer(prepared).histogram.sum())
        return out

    monkeypatch.setattr(convert, "calibrate", spy)
    summary = run_job(tmp_path, [*BASE, "strategy.ptq.scope=all",
                                 "strategy.ptq.calibration_batches=2"])
    assert summary["status"] == "completed", summary["error"]
    s, model = summary["strategy"]["ptq"], summary["model"]
    # Calibration: 2 of the 6 training batches, as stated, and the observers saw exactly those.
    assert s["calibration_batches_used"] == 2 and s["calibration_images"] == 32
    assert seen["observed"] == 32 * PIXELS
    # The saved model is int8: one int8 tensor per conv/linear weight, as many elements, so a
    # quarter of their fp32 bytes; the run's sizes say the same.
    weights = _weights(summary)
    int8 = [t for t in weights.values() if t.dtype == torch.int8]
    assert sorted(t.numel() for t in int8) == _conv_and_linear_weights()
    assert s["quantized_weights_bytes"]["int8"] == sum(t.numel() for t in int8)
    assert s["quantized_weights_bytes"]["ratio"] == pytest.approx(4.0)
    assert summary["model"]["saved"]["kind"] == "int8_graph"
    assert 3.5 < model["size_bytes_fp32"] / model["size_bytes_int8"] < 4.1
    assert model["saved"]["bytes"] < model["size_bytes_fp32"] / 3.5
    # Its test metrics are recorded and close to the fp32 model's (not a trivial one).
    fp32_acc, int8_acc = summary["metrics"]["test/acc"], s["int8_metrics"]["int8/test/acc"]
    assert fp32_acc < 1.0
    assert abs(int8_acc - fp32_acc) <= 4 / 64 and s["int8_agreement"] >= 0.9
    # What was saved is what was evaluated: reloaded, it scores the recorded metrics exactly.
    got = evaluate(load(tmp_path / "run"))
    assert got["metrics"] == s["int8_metrics"]
    assert s["latency_ms"]["fp32"] > 0 and s["latency_ms"]["int8"] > 0
    assert {"calibrate", "convert", "int8_eval", "latency"} <= set(summary["time_s"])
    assert "ptq: int8 (static, 2 calibration batches)" in summary["headline"]


def test_fp16_model_is_float16_and_half_the_size(tmp_path: Path) -> None:
    summary = run_job(tmp_path, [*BASE, "strategy.ptq.dtype=fp16"])
    assert summary["status"] == "completed", summary["error"]
    s, model = summary["strategy"]["ptq"], summary["model"]
    assert s["calibration_batches_used"] == 0  # nothing to calibrate
    assert model["size_bytes_fp16"] / model["size_bytes_fp32"] == pytest.approx(0.5, abs=0.01)
    assert model["size_bytes_effective"] == model["size_bytes_fp16"]
    # Saved with every floating tensor in float16, half the fp32 file.
    floats = [t for t in _weights(summary).values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float16 for t in floats)
    assert model["saved"]["bytes"] < 0.51 * model["size_bytes_fp32"]
    fp32_acc, fp16_acc = summary["metrics"]["test/acc"], s["fp16_metrics"]["fp16/test/acc"]
    assert abs(fp16_acc - fp32_acc) <= 1 / 64 and s["fp16_agreement"] >= 0.95
    # Reloaded (float16 values in an fp32 network), it scores what the fp16 model scored.
    got = evaluate(load(tmp_path / "run"))
    assert got["metrics"] == pytest.approx(s["fp16_metrics"], abs=1 / 64)
    assert s["latency_ms"]["fp16"] > 0 and "ptq: fp16 (cast)" in summary["headline"]


def test_the_evaluated_fp16_network_computes_in_float16() -> None:
    network = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                            nn.Linear(8 * 14 * 14, 4)).eval()
    half = convert.HalfNetwork(network)
    assert all(p.dtype == torch.float16 for p in half.network.parameters())
    assert all(p.dtype == torch.float32 for p in network.parameters())  # a copy was cast
    halved, full = module_bytes(half.network), module_bytes(network)
    assert halved["float16"] * 2 == full["float32"] and "float32" not in halved
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = half(x)
        assert out.dtype == torch.float32
        assert torch.allclose(out, network(x), atol=1e-2)


def test_int8_of_a_pruned_model_keeps_its_zeros(tmp_path: Path) -> None:
    """[prune,ptq]: prune's masks are made permanent before ptq converts, so the int8 conv
    weights hold the pruned zeros and the saved int8 model is stored sparse."""
    summary = run_job(tmp_path, ["strategy=[prune,ptq]", *OPTIONS, "strategy.prune.start=0",
                                 "strategy.prune.end=1", "strategy.prune.frequency=1",
                                 "strategy.prune.final_sparsity=0.5"])
    assert summary["status"] == "completed", summary["error"]
    assert summary["model"]["saved"]["produced_by"] == "ptq"
    assert summary["model"]["saved"]["sparse"] is True
    stored = _weights(summary)  # conv weights (scope=conv): nonzero values + bitmask each
    values = [t for k, t in stored.items() if k.endswith("#values") and t.dtype == torch.int8]
    nonzeros = sum(t.numel() for t in values)
    assert values and nonzeros <= 0.55 * summary["strategy"]["ptq"]["quantized_weights_bytes"][
        "int8"]


def test_qat_and_ptq_are_refused_together() -> None:
    with pytest.raises(EffbenchError, match=r"strategy=\[qat,ptq\] cannot run together: both "
                                            "convert the trained model"):
        check_compatible([Qat(), Ptq()])


@pytest.mark.parametrize(("args", "needle"), [
    (["strategy.ptq.dtype=int4"], "strategy.ptq.dtype='int4' is not one of int8, fp16"),
    (["strategy.ptq.calibration_batches=0"], "strategy.ptq.calibration_batches=0 must be"),
    (["strategy.ptq.dtype=fp16", "strategy.ptq.calibration_batches=4"],
     "strategy.ptq.calibration_batches=4 only takes effect with strategy.ptq.dtype=int8"),
])
def test_bad_options_are_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    res = run_cli([*tiny(epochs=1), "strategy=ptq", *args, f"hydra.run.dir={tmp_path / 'run'}"],
                  cwd=tmp_path)
    line = one_error_line(res)
    assert needle in line, line
