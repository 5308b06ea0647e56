"""scripts/bench_*.py: importable with a ``main``; bench_gpu skips cleanly without a GPU, composes
every effbench job it would run, and (on a GPU) ends with its JSON line of figures."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH_GPU = ROOT / "scripts" / "bench_gpu.py"
SCRIPTS = sorted((ROOT / "scripts").glob("bench_*.py"))


def run_script(args: list[str], env: dict | None = None,
               timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH_GPU), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def last_json(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "no output"
    return json.loads(lines[-1])


def test_every_benchmark_is_listed() -> None:
    names = {p.stem for p in SCRIPTS}
    assert {"bench_overhead", "bench_precomputed", "bench_dynamic", "bench_freeze",
            "bench_data_paths", "bench_gpu"} <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_bench_script_imports_and_defines_main(path: Path) -> None:
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # __name__ is not "__main__": nothing runs
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"


def test_bench_data_paths_reads_every_path_of_a_file_and_an_array_format() -> None:
    """Every path reads every image of the real layout (a figure over fewer images would compare
    different work), and the JSON line holds each path's figures."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_data_paths.py"),
                           "--formats", "brain_mri,medmnist", "--images", "24", "--passes", "1",
                           "--min-time", "0", "--workers", "1", "--res", "32"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = last_json(proc.stdout)
    mri, npz = figures["paths"]["brain_mri"], figures["paths"]["medmnist"]
    assert set(mri) == {"streamed_0w", "streamed_1w", "cache_build", "cached_ram", "cached_mmap"}
    assert {fig["images"] for path, fig in mri.items() if path != "cache_build"} == {24}
    assert set(npz) == {"resident"} and npz["resident"]["images"] == 24
    assert figures["brain_mri_cache_vs_streamed"] > 0


def test_bench_gpu_without_gpu_skips_cleanly() -> None:
    proc = run_script([], env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA GPU: skipped" in proc.stdout
    assert last_json(proc.stdout) == {"skipped": "no CUDA GPU"}


def test_bench_gpu_help_is_fast_and_lists_options() -> None:
    proc = run_script(["--help"], timeout=60)
    assert proc.returncode == 0
    for option in ("--models", "--batch", "--steps", "--warmup", "--compile"):
        assert option in proc.stdout


def test_bench_gpu_effbench_jobs_compose() -> None:
    """Every effbench job the GPU benchmark runs composes against today's config tree."""
    proc = run_script(["--check"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # per model: fp32, bf16 and fp16, a short and a long run each; plus the two imagefolder runs
    assert last_json(proc.stdout)["checked_configs"] == 6 * 3 + 2


def test_bench_gpu_unknown_key_is_one_clear_message() -> None:
    proc = run_script(["--check", "--models", "resnet18", "dataset.no_such_key=1"])
    assert proc.returncode != 0
    assert "effbench refuses this job's overrides" in proc.stderr
    assert "dataset.no_such_key" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_gpu_measures_on_gpu(tmp_path: Path) -> None:
    proc = run_script(["--models", "resnet18", "--batch", "32", "--steps", "10", "--warmup", "2",
                       "--image-size", "64", "--jpeg-size", "72", "--workers", "2",
                       "--json", str(tmp_path / "gpu.json")], timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = last_json(proc.stdout)
    assert "skipped" not in figures
    for key in ("resnet18_amp_cl_img_s", "resnet18_fp32_img_s", "amp_speedup"):
        assert figures[key] is not None and figures[key] > 0, key
    # effbench's steady img/s is a difference of two short runs: present, positive if measurable
    assert figures["effbench_vs_plain"] is None or figures["effbench_vs_plain"] > 0
    assert figures["models"]["resnet18"]["effbench_amp_cl_summary"] > 0
    assert figures["amp_dtype"] in ("bf16", "fp16")
    assert "gpu_decode_speedup" in figures
    assert json.loads((tmp_path / "gpu.json").read_text())["headline"] == figures
