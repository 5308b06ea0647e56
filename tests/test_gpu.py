"""GPU-only behaviour (skipped without CUDA; CI has none): in-memory data kept on the GPU trains
on the same batches as data copied per step, and the run records it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_job

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU = ["hardware=auto", "trainer.precision=32-true", "trainer.deterministic=true",
       "backbone=small_cnn"]


def test_resident_data_trains_on_the_same_batches(tmp_path: Path) -> None:
    on = run_job(tmp_path / "on", [*GPU, "hardware.data_on_device=true"])
    off = run_job(tmp_path / "off", [*GPU, "hardware.data_on_device=false"])
    assert on["status"] == off["status"] == "completed", (on["error"], off["error"])
    assert on["data"]["on_device"]["on_device"] is True
    assert off["data"]["on_device"]["on_device"] is False
    for key, value in off["metrics"].items():
        assert on["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
