"""End to end: the finetune baseline through the run pipeline, and what every run records."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import load_summary, run_job


@pytest.mark.parametrize("multilabel", [False, True], ids=["multiclass", "multilabel"])
def test_finetune_end_to_end(tmp_path: Path, multilabel: bool) -> None:
    summary = run_job(tmp_path, [f"dataset.multilabel={str(multilabel).lower()}"])
    assert summary["status"] == "completed", summary["error"]
    on_disk = load_summary(tmp_path / "run")
    assert on_disk["metrics"] == pytest.approx(summary["metrics"])
    m = on_disk["metrics"]
    for key in ["test/acc", "test/f1_macro", "test/auroc_macro"]:
        assert 0.0 <= m[key] <= 1.0, key
    assert set(on_disk["per_class"]["test/auroc_per_class"]) == {f"class_{i}" for i in range(4)}
    assert on_disk["data"]["task"] == ("multilabel" if multilabel else "multiclass")
    assert on_disk["epochs"] == 2
    assert set(on_disk["time_s"]) >= {"setup", "train", "eval", "total"}
    assert on_disk["model"]["params_trainable"] == on_disk["model"]["params_total"] > 0
    assert on_disk["model"]["size_bytes"] > 4 * on_disk["model"]["params_total"]
    assert on_disk["throughput_img_s"] > 0
    assert on_disk["env"]["torch"] and on_disk["env"]["device"]
    if on_disk["hardware"]["accelerator"] == "cpu":  # the GPU-resident option says why it idled
        assert on_disk["data"]["on_device"]["why"].startswith("cpu: ")
    assert on_disk["best_val"]["val/loss"] > 0
    # The evidence: per-epoch CSV, TensorBoard events, resolved config.
    rows = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()
    assert "val/loss" in rows[0] and len(rows) >= 3
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "resolved_config.yaml").is_file()


def test_finetune_learns(tmp_path: Path) -> None:
    """Training actually works: synthetic classes are separable, accuracy far above chance."""
    summary = run_job(tmp_path, ["trainer.max_epochs=4", "dataset.num_train=256"])
    assert summary["status"] == "completed", summary["error"]
    assert summary["metrics"]["test/acc"] > 0.8


def test_energy_is_measured(tmp_path: Path) -> None:
    summary = run_job(tmp_path, ["tracking.energy=true", "trainer.max_epochs=1"])
    assert summary["status"] == "completed", summary["error"]
    assert summary["energy"]["kwh"] > 0 and summary["energy"]["co2_kg"] > 0
    assert (tmp_path / "run" / "emissions.csv").is_file()


def test_same_seed_same_result(tmp_path: Path) -> None:
    a = run_job(tmp_path / "a", ["trainer.max_epochs=1"])
    b = run_job(tmp_path / "b", ["trainer.max_epochs=1"])
    assert a["metrics"] == b["metrics"]


def test_failed_run_is_recorded(tmp_path: Path) -> None:
    summary = run_job(tmp_path, ["optim.optimizer.lr=-1"])
    assert summary["status"] == "failed"
    assert "optim.optimizer.lr=-1" in summary["error"]
    assert load_summary(tmp_path / "run")["status"] == "failed"


def test_class_weighted_bce_formula() -> None:
    import torch

    from effbench.losses import WeightedBCE

    y = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    loss = WeightedBCE(y.sum(0), len(y))
    # label 0: 1 positive of 4 → w+ = 3/4, w- = 1/4; label 1: 2 of 4 → 1/2, 1/2
    assert loss.w_pos.tolist() == [0.75, 0.5] and loss.w_neg.tolist() == [0.25, 0.5]


@pytest.mark.parametrize(("scaling", "expected"), [("linear", 4e-3), ("none", 1e-3)])
def test_lr_scaled_by_world_size(scaling: str, expected: float) -> None:
    """The hardware plan resolves the world size once (4 CPU ranks) and the lr scale with it."""
    from functools import partial

    import torch
    from torch import nn

    from effbench.hardware import resolve_plan
    from effbench.losses import CrossEntropy
    from effbench.system import ClassifierSystem
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["hardware=cpu", "trainer.devices=4", "trainer.strategy=ddp",
                       f"hardware.lr_scaling={scaling}"])
    threads = torch.get_num_threads()
    try:
        plan = resolve_plan(cfg.hardware, cfg.trainer)
    finally:
        torch.set_num_threads(threads)
    assert plan.world_size == 4
    optim = {"factory": partial(torch.optim.Adam), "lr": 1e-3, "lr_scale": plan.lr_scale}
    system = ClassifierSystem(nn.Flatten(), nn.Linear(4, 2), CrossEntropy(), "multiclass",
                              ["a", "b"], optim, None)
    opt = system.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam)
    assert opt.param_groups[0]["lr"] == pytest.approx(expected)


def test_cpu_plan_steps_without_an_nvml_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU plan an optimizer step does not ask NVML whether a GPU exists: Lightning's
    PYTORCH_NVML_BASED_CUDA_CHECK=1 made torch's Adam dlopen libnvidia-ml on every step (10 % of
    a cached-feature head's training on the 2-core CPU)."""
    import ctypes

    import torch
    from torch import nn

    from effbench.hardware import resolve_plan
    from tests.conftest import compose_cfg

    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # as `import pytorch_lightning` does
    cfg = compose_cfg(["hardware=cpu"])
    threads = torch.get_num_threads()
    try:
        resolve_plan(cfg.hardware, cfg.trainer)
    finally:
        torch.set_num_threads(threads)
    loads: list[tuple] = []
    real = ctypes.CDLL
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: loads.append(a) or real(*a, **k))
    model = nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters())
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    assert loads == []


def test_clipping_under_mixed_precision_steps_unfused_and_records_it(tmp_path: Path) -> None:
    """Lightning cannot clip the gradients of a fused optimizer under mixed precision: the
    recipe's fused default steps unfused then, and resolved_config.yaml says so."""
    from omegaconf import OmegaConf

    summary = run_job(tmp_path, ["trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1.0"])
    assert summary["status"] == "completed", summary["error"]
    resolved = OmegaConf.load(tmp_path / "run" / "resolved_config.yaml")
    assert resolved.optim.optimizer.fused is False and resolved.optim.optimizer.foreach is True


def test_a_job_never_walks_the_import_heap_in_a_full_collection(tmp_path: Path) -> None:
    """The objects the imports made (torch, Lightning, torchmetrics, Hydra: ~0.5 million) are
    frozen before the first job, so a full garbage collection inside a job walks only what jobs
    made (one such pass over the whole heap cost 0.25-0.56 s of a first job)."""
    import gc

    summary = run_job(tmp_path, [])
    assert summary["status"] == "completed", summary["error"]
    frozen = gc.get_freeze_count()
    assert frozen > 100_000, frozen
    assert len(gc.get_objects(generation=2)) < frozen
