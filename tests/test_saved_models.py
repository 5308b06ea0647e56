"""Models you can keep: every run saves ``<run>/model/`` (manifest.json + safetensors), which
loads back and reproduces the test metric the run recorded — through the user's door
(``effbench-eval RUN_DIR``) and the Python one (``effbench.model.saved.load``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from effbench.eval_cli import main as eval_main
from effbench.model import sparse
from effbench.model.graph import GraphFormatError, from_json, resolve_op
from effbench.model.saved import evaluate, load
from tests.conftest import ROOT, run_job
from tests.helpers.cli import run_eval

# Hard enough that no metric is 1.0 (AUROC ~0.6-0.9), so reproducing them means something.
HARD = ["dataset.noise=6.0", "dataset.num_test=48"]
PRE = ["strategy=precomputed", "backbone=resnet18", "backbone.weights=null",
       "dataset.resolution=16", "dataset.image_size=16", *HARD]
PRUNE = ["strategy=prune", "backbone=small_cnn", "strategy.prune.unit=step",
         "strategy.prune.start=0", "strategy.prune.end=3", "strategy.prune.frequency=1", *HARD]


def effbench_eval(*args: str) -> subprocess.CompletedProcess:
    """``effbench-eval`` as a user runs it (the console script's module, this interpreter)."""
    return run_eval(list(args), ROOT, timeout=300, env={"PYTHONWARNINGS": "ignore"})


def eval_json(run_dir: Path) -> dict:
    res = effbench_eval(str(run_dir), "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def saved(summary: dict) -> dict:
    assert summary["status"] == "completed", summary["error"]
    assert summary["metrics"]["test/auroc_macro"] < 0.99  # not a trivial model
    info = summary["model"]["saved"]
    assert "error" not in info, info
    files = list(Path(info["path"]).iterdir())
    assert info["bytes"] == sum(f.stat().st_size for f in files)
    return info


@pytest.mark.slow
def test_precomputed_model_reloads_and_reproduces_its_test_metrics(tmp_path: Path) -> None:
    """The adapted backbone + trained head, saved by the generic default; a later cache-hit job
    (features from the cache) saves the very same model."""
    summary = run_job(tmp_path / "a", PRE)
    info = saved(summary)
    assert info["kind"] == "network" and info["produced_by"] == "default"
    got = eval_json(tmp_path / "a" / "run")
    recorded = summary["metrics"]
    assert got["metrics"]["test/acc"] == pytest.approx(recorded["test/acc"], abs=1e-6)
    assert got["metrics"] == pytest.approx({k: recorded[k] for k in got["metrics"]}, abs=1e-4)
    assert got["predictions"]["max_abs_prob_diff"] < 1e-4  # the run's predictions.npz
    hit = run_job(tmp_path / "b", PRE)
    assert hit["strategy"]["precomputed"]["fast_path"]["used"]
    files = [json.loads((Path(saved(s)["path"]) / "manifest.json").read_text())["files"]
             for s in (summary, hit)]
    assert files[0] == files[1]  # byte for byte (sha256) the miss job's model


def test_pruned_model_is_smaller_and_reloads_with_its_sparsity_and_metrics(
        tmp_path: Path) -> None:
    summary = run_job(tmp_path, [*PRUNE, "strategy.prune.scope=all"])  # small_cnn: mostly Linear
    info = saved(summary)
    assert info["sparse"] and info["produced_by"] == "prune"
    dense = summary["model"]["size_bytes"]  # torch.save of the dense state dict
    assert info["bytes"] < 0.6 * dense  # half the weights are gone from the file
    model = load(tmp_path / "run")
    layers = [m for m in model.network.backbone.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    assert zeros / sum(m.weight.numel() for m in layers) == pytest.approx(
        summary["strategy"]["prune"]["sparsity"], abs=1e-9)
    result = evaluate(model)
    assert result["metrics"] == pytest.approx(result["recorded"], abs=1e-6)
    assert result["metrics"]["test/acc"] == pytest.approx(summary["metrics"]["test/acc"],
                                                          abs=1e-6)


def test_channel_pruned_model_reloads_physically_smaller(tmp_path: Path) -> None:
    summary = run_job(tmp_path, [*PRUNE, "strategy.prune.structure=channel",
                                 "strategy.prune.latency_batch=4",
                                 "strategy.prune.latency_min_time=0.05"])
    saved(summary)
    model = load(tmp_path / "run")
    convs = [m for m in model.network.backbone.modules() if isinstance(m, nn.Conv2d)]
    layers = summary["strategy"]["prune"]["channels_per_layer"]
    assert [m.out_channels for m in convs] == [after for _, after in layers.values()]
    assert sum(p.numel() for p in model.network.parameters()) == \
        summary["model"]["params_after"]
    result = evaluate(model)
    assert result["metrics"] == pytest.approx(result["recorded"], abs=1e-6)


@pytest.mark.slow
def test_int8_model_reloads_and_reproduces_the_int8_metrics_exactly(tmp_path: Path) -> None:
    summary = run_job(tmp_path, ["strategy=qat", "backbone=small_cnn",
                                 "strategy.qat.latency_min_time=0.05", *HARD])
    info = saved(summary)
    assert info["kind"] == "int8_graph"
    assert info["sparse"] is False  # unpruned: a few mostly-zero int8 tensors are not sparsity
    recorded = summary["strategy"]["qat"]["int8_metrics"]
    got = eval_json(tmp_path / "run")
    # effbench-eval is a process that never quantized: its lowering must still fuse the int8
    # convolutions (it once kept fp32 convolutions of dequantized weights there: probabilities
    # 1e-6 off on one CPU, an accuracy one image off on another)
    assert got["predictions"]["array"] == "int8_probs" and got["predictions"]["rows"] == 48
    assert got["predictions"]["max_abs_prob_diff"] == 0.0, got["predictions"]
    assert got["metrics"] == recorded  # the same int8 kernels on the same batches: exact
    # int8 weights: the conv weights take a quarter of their fp32 bytes in the file
    model = load(tmp_path / "run")
    assert info["bytes"] < summary["model"]["size_bytes_fp32"]
    assert model(torch.zeros(3, 3, 32, 32, dtype=torch.uint8)).shape == (3, 4)


def test_bad_input_is_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture
                                          ) -> None:
    for path, says in ((tmp_path / "absent", "does not exist"), (tmp_path, "holds no saved")):
        with pytest.raises(SystemExit) as exited:
            eval_main([str(path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert exited.value.code == 1 and len(err) == 1 and says in err[0], err
        assert err[0].startswith(f"effbench-eval: error: RUN_DIR={path} ")


def test_a_tampered_weights_file_is_refused(tmp_path: Path) -> None:
    summary = run_job(tmp_path, ["backbone=small_cnn", "trainer.max_epochs=1", *HARD])
    weights = Path(saved(summary)["path"]) / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    res = effbench_eval(str(tmp_path / "run"))
    assert res.returncode == 1 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("effbench-eval: error: ") and str(weights) in lines[0]
    assert "sha256" in lines[0] and "restore the file" in lines[0]


def test_help_needs_no_torch() -> None:
    code = ("import sys\nfrom effbench.eval_cli import parser\nparser().format_help()\n"
            "assert 'torch' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_sparse_encoding_round_trips_bit_for_bit() -> None:
    w = torch.randn(16, 8, 3, 3)
    w[w.abs() < 0.8] = 0.0
    stored, spec = sparse.encode({"w": w, "b": torch.randn(16), "n": torch.tensor(3)})
    assert set(spec) == {"w"} and "b" in stored and "n" in stored  # dense ones stay dense
    assert sum(t.numel() * t.element_size() for t in stored.values()) < w.numel() * 4
    assert torch.equal(sparse.decode(stored, spec)["w"], w)


def test_a_graph_file_can_name_registered_operators_only() -> None:
    assert resolve_op("aten::conv2d.default") is torch.ops.aten.conv2d.default
    for name in ("torch.load", "builtins::eval.default", "aten::conv2d.__class__",
                 "os::system.default"):
        with pytest.raises(GraphFormatError):
            resolve_op(name)
    spec = {"tensors": {}, "nodes": [
        {"op": "placeholder", "name": "x", "target": "x"},
        {"op": "call_module", "name": "m", "target": "os.system", "args": [], "kwargs": {}}]}
    with pytest.raises(GraphFormatError):
        from_json(spec, {})
    spec["nodes"][1] = {"op": "call_function", "name": "y", "target": "aten::relu.default",
                        "args": [{"object": "os.system"}], "kwargs": {"dict": {}}}
    with pytest.raises(GraphFormatError):
        from_json(spec, {})
