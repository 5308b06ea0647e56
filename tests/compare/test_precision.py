"""effbench-compare shows each row's precision and flags deltas between rows that ran in a
different precision or on different hardware (one warning line and a † in the table)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd

from tests.compare.conftest import BASE, CACHED, fake_run
from tests.helpers.cli import run_compare


def compare_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_compare(args, cwd, timeout=300)


def run(root: Path, name: str, strategy: str, precision: str, device: str = "NVIDIA A100",
        world: int = 1, hardware: str = "auto", train: float = 10.0) -> None:
    run_dir = fake_run(root, name, strategy, 0, 0.9, train, co2=1e-3)
    path = run_dir / "summary.json"
    s: dict[str, Any] = json.loads(path.read_text())
    s["choices"]["hardware"] = hardware
    s["hardware"] = {"precision": precision, "world_size": world, "accelerator": "gpu"}
    s["env"]["device"] = device
    path.write_text(json.dumps(s))


def compare(root: Path, *extra: str) -> tuple[subprocess.CompletedProcess, pd.DataFrame]:
    res = compare_cli([str(root), "--no-plots", "--out", str(root / "o"), *extra], root)
    assert res.returncode == 0, res.stderr
    table = pd.read_csv(root / "o" / "compare.csv", dtype=str, keep_default_na=False)
    return res, table


def warning_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lstrip("\\").startswith("†")]


def test_delta_across_precisions_is_flagged(tmp_path: Path) -> None:
    # Study 000 on an RTX 4060: the baseline in bf16-mixed, the cached-features head always fp32.
    run(tmp_path, "ft", BASE, "bf16-mixed", train=20.0)
    run(tmp_path, "pc", CACHED, "32", train=2.0)   # Lightning's "32" is 32-true
    res, table = compare(tmp_path)
    rows = table.set_index("strategy")
    assert rows.loc[BASE, "precision"] == "bf16-mixed"
    assert rows.loc[CACHED, "precision"] == "32-true"
    assert rows.loc[CACHED, "mixed_setup"] == "precision 32-true vs bf16-mixed"
    pc_line = next(line for line in res.stdout.splitlines() if line.startswith(f"{CACHED} "))
    assert "32-true" in pc_line and "−90.0 %†" in pc_line  # the Δ time cell carries the marker
    [line] = warning_lines(res.stdout)
    assert f"{CACHED} vs {BASE}: precision 32-true vs bf16-mixed" in line
    assert "hardware.precision" in line
    assert len(warning_lines((tmp_path / "o" / "compare.md").read_text())) == 1


def test_same_precision_and_device_is_not_flagged(tmp_path: Path) -> None:
    run(tmp_path, "ft", BASE, "32-true")
    run(tmp_path, "pc", CACHED, "32-true")
    res, table = compare(tmp_path)
    assert "†" not in res.stdout and set(table["precision"]) == {"32-true"}


def test_hardware_comparison_flags_only_the_precision_that_changed_with_it(
        tmp_path: Path) -> None:
    # Study 004's Fig. 12: 1 GPU vs 4×P100. The hardware is what is compared (hardware= differs),
    # but the DDP preset's 16-mixed against the single GPU's fp32 is flagged.
    run(tmp_path, "one", BASE, "32-true", "Tesla V100S", 1, "auto")
    run(tmp_path, "four", BASE, "16-mixed", "Tesla P100", 4, "p100x4_ddp")
    res, table = compare(tmp_path, "--baseline", "hardware=auto")
    rows = table.set_index("hardware")
    assert rows.loc["p100x4_ddp", "mixed_setup"] == "precision 16-mixed vs 32-true"
    assert rows.loc["p100x4_ddp", "device"] == "4× Tesla P100"
    # Pinned to one precision: no flag, although the devices differ.
    for name in ("one", "four"):
        path = tmp_path / name / "summary.json"
        s = json.loads(path.read_text())
        s["hardware"]["precision"] = "32-true"
        path.write_text(json.dumps(s))
    res, _ = compare(tmp_path, "--baseline", "hardware=auto")
    assert "†" not in res.stdout


def test_same_config_on_two_machines_is_flagged(tmp_path: Path) -> None:
    run(tmp_path, "ft", BASE, "32-true", "Tesla T4")
    run(tmp_path, "pc", CACHED, "32-true", "NVIDIA H100")
    res, table = compare(tmp_path)
    assert table.set_index("strategy").loc[CACHED, "mixed_setup"] == (
        "hardware 1× NVIDIA H100 vs 1× Tesla T4")
    assert len(warning_lines(res.stdout)) == 1
