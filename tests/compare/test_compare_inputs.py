"""effbench-compare through its CLI on summaries in the real schema: baseline matching on the keys
both runs set, no silent merging under --by, the effective size, estimated-energy markers, bad
inputs as one sentence, atomic outputs, any metric of the summaries, no dependency on run.py."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from effbench.compare.facts import effective_size
from effbench.compare.output import write_atomic
from tests.compare.conftest import BASE, CACHED, INT8, SPARSE, SUBSET, fake_run
from tests.helpers.cli import run_compare

COMPARE = Path(__file__).resolve().parents[2] / "effbench" / "compare"


def compare_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_compare(args, cwd, timeout=300)


def run(root: Path, name: str, strategy: str, seed: int, acc: float = 0.9, train: float = 10.0,
        dataset: str = "synthetic", patch: dict[str, Any] | None = None, **kwargs: Any) -> Path:
    """``fake_run`` (schema-checked) with some sections of the summary updated afterwards."""
    run_dir = fake_run(root, name, strategy, seed, acc, train, **kwargs)
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text())
    summary["choices"]["dataset"] = dataset
    for section, values in (patch or {}).items():
        if isinstance(summary.get(section), dict) and isinstance(values, dict):
            summary[section].update(values)
        else:
            summary[section] = values
    path.write_text(json.dumps(summary))
    return run_dir


def csv_of(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "compare.csv", dtype=str, keep_default_na=False)


def assert_one_sentence(res: subprocess.CompletedProcess, *parts: str) -> None:
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, res.stderr
    for part in parts:
        assert part in errors[0], errors[0]


# -- 1. baseline matching -------------------------------------------------------------------------

@pytest.fixture
def alpha_sweep(tmp_path: Path) -> Path:
    """A technique over its own strategy.alpha vs the baseline (which has no alpha), two seeds;
    one run of it on a dataset that no baseline run used."""
    root = tmp_path / "sweep"
    for seed in (0, 1):
        run(root, f"ft_{seed}", BASE, seed, acc=0.90 + 0.02 * seed, train=10.0)
        for alpha, acc in (("0.3", 0.85), ("0.5", 0.88)):
            run(root, f"dyn_{alpha}_{seed}", SUBSET, seed, acc=acc + 0.02 * seed, train=5.0,
                overrides=(f"strategy.alpha={alpha}",))
    run(root, "dyn_other", SUBSET, 0, dataset="other", overrides=("strategy.alpha=0.3",))
    return root


def test_baseline_matches_on_keys_both_runs_set(alpha_sweep: Path, tmp_path: Path) -> None:
    res = compare_cli([str(alpha_sweep), "--no-plots", "--out", str(tmp_path / "o")], tmp_path)
    assert res.returncode == 0, res.stderr
    table = csv_of(tmp_path / "o").set_index(["strategy", "dataset", "strategy.alpha"])
    for alpha, pp in (("0.3", -5.0), ("0.5", -2.0)):
        row = table.loc[(SUBSET, "synthetic", alpha)]
        assert float(row["d_metric_pp"]) == pytest.approx(pp)  # alpha: only SUBSET sets it
        assert float(row["speedup"]) == pytest.approx(2.0)
        assert row["compared_with"] == f"{BASE}, synthetic" and row["no_baseline"] == ""
    lonely = table.loc[(SUBSET, "other", "0.3")]
    assert lonely["d_metric_pp"] == "" and lonely["compared_with"] == ""
    assert lonely["no_baseline"] == f"no {BASE} run with dataset=other"
    assert "compared with" in res.stdout
    assert f"none: no {BASE} run with dataset=other" in res.stdout
    assert "matched on the config keys both runs set" in res.stdout


def test_ambiguous_baseline_is_explained(tmp_path: Path) -> None:
    """A run that leaves the lr at its default, against baseline runs at two lrs: either could be
    the baseline, so neither is picked silently."""
    for lr in ("1e-3", "1e-2"):
        run(tmp_path, f"ft_{lr}", BASE, 0, overrides=(f"strategy.lr={lr}",))
    run(tmp_path, "pc", CACHED, 0)
    res = compare_cli([str(tmp_path), "--no-plots", "--out", str(tmp_path / "o")], tmp_path)
    assert res.returncode == 0, res.stderr
    pc = csv_of(tmp_path / "o").set_index("strategy").loc[CACHED]
    assert pc["no_baseline"] == (f"2 {BASE} configurations match (they differ in strategy.lr); "
                                 "pin one with --baseline")


# -- 2. --by never averages anything but seeds ----------------------------------------------------

def test_by_keeps_other_varying_keys_apart(alpha_sweep: Path, tmp_path: Path) -> None:
    shutil.rmtree(alpha_sweep / "dyn_other")
    res = compare_cli([str(alpha_sweep), "--by", "strategy", "--no-plots", "--out",
                       str(tmp_path / "o")], tmp_path)
    assert res.returncode == 0, res.stderr
    table = csv_of(tmp_path / "o")
    assert sorted(zip(table["strategy"], table["strategy.alpha"], table["n"])) == sorted([
        (SUBSET, "0.3", "2"), (SUBSET, "0.5", "2"), (BASE, "default", "2")])
    assert "also grouped by strategy.alpha" in res.stdout


# -- 3. effective size ----------------------------------------------------------------------------

def test_delta_size_uses_the_effective_size(tmp_path: Path) -> None:
    for seed in (0, 1):
        run(tmp_path, f"ft_{seed}", BASE, seed, size=4000)
        run(tmp_path, f"sparse_{seed}", SPARSE, seed, size=4000,
            patch={"model": {"size_bytes_compressed": 1200, "sparsity": 0.7}})
        run(tmp_path, f"int8_{seed}", INT8, seed, size=4000,
            patch={"model": {"size_bytes_fp32": 4000, "size_bytes_int8": 1000}})
        # The nested layout: one dict of facts per technique under summary["strategy"].
        run(tmp_path, f"nested_{seed}", "combo", seed, size=4000,
            patch={"strategy": {SPARSE: {"sparsity": 0.5, "size_bytes_compressed": 2000},
                                "latency_ms": {"fp32": 1.0}}})
    res = compare_cli([str(tmp_path), "--no-plots", "--out", str(tmp_path / "o")], tmp_path)
    assert res.returncode == 0, res.stderr
    table = csv_of(tmp_path / "o").set_index("strategy")
    expect = {SPARSE: (-70.0, 1200), INT8: (-75.0, 1000), "combo": (-50.0, 2000)}
    for strategy, (pct, size) in expect.items():
        assert float(table.loc[strategy, "d_size_pct"]) == pytest.approx(pct)
        assert float(table.loc[strategy, "model.size_bytes_effective"]) == size
        assert float(table.loc[strategy, "model.size_bytes"]) == 4000  # the dense column stays
    assert table.loc["combo", "size_source"] == f"strategy.{SPARSE}.size_bytes_compressed"
    assert table.loc[BASE, "size_source"] == "model.size_bytes"
    assert "eff. size MB" in res.stdout and "size MB" in res.stdout


def test_effective_size_order_of_preference() -> None:
    both = {"model": {"size_bytes": 40, "size_bytes_compressed": 12},
            "strategy": {INT8: {"model": {"size_bytes_int8": 10}}}}
    assert effective_size(both) == (10.0, f"strategy.{INT8}.model.size_bytes_int8")
    own = {"model": {"size_bytes": 40, "size_bytes_int8": 10}, "strategy": {
        "size_bytes_effective": 7}}
    assert effective_size(own) == (7.0, "strategy.size_bytes_effective")
    assert effective_size({"model": {"size_bytes": 40}, "strategy": {}}) == (40.0,
                                                                            "model.size_bytes")


# -- 4. estimated energy is marked ----------------------------------------------------------------

def test_estimated_energy_is_marked(tmp_path: Path) -> None:
    mode = {"cpu": "tdp_estimate", "gpu": None, "ram": "model"}
    for seed in (0, 1):
        run(tmp_path, f"ft_{seed}", BASE, seed, co2=1e-3,
            patch={"energy": {"mode": mode, "estimated": True}})
        run(tmp_path, f"pc_{seed}", CACHED, seed, co2=2.5e-4)  # older: no mode recorded
    res = compare_cli([str(tmp_path), "--no-plots", "--out", str(tmp_path / "o")], tmp_path)
    assert res.returncode == 0, res.stderr
    lines = {line.split()[0]: line for line in res.stdout.splitlines()
             if line.startswith((f"{BASE} ", f"{CACHED} ")) and " vs " not in line}
    assert "1 ± 0*" in lines[BASE]
    assert "0.25 ± 0 " in lines[CACHED] and "0.25 ± 0*" not in lines[CACHED]
    assert "−75.0 %*" in lines[CACHED]  # its Δ CO₂ rests on the estimated baseline
    note = "* estimated from TDP, not measured (energy.mode cpu=tdp_estimate, ram=model)"
    assert note in res.stdout and "CO₂ −75.00 %*" in res.stdout  # the studies' line too
    assert note in (tmp_path / "o" / "compare.md").read_text()
    table = csv_of(tmp_path / "o").set_index("strategy")
    assert table.loc[BASE, "energy_estimated"] == "True"
    assert table.loc[CACHED, "energy_estimated"] == "False"


def test_measured_energy_has_no_marker(tmp_path: Path) -> None:
    for seed in (0, 1):
        run(tmp_path, f"ft_{seed}", BASE, seed, co2=1e-3,
            patch={"energy": {"mode": {"cpu": "rapl", "gpu": "nvml"}, "estimated": False}})
        run(tmp_path, f"pc_{seed}", CACHED, seed, co2=2.5e-4)
    res = compare_cli([str(tmp_path), "--no-plots", "--out", str(tmp_path / "o")], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "*" not in res.stdout


# -- 5. bad inputs: one sentence, no traceback ----------------------------------------------------

@pytest.mark.parametrize("content, why", [
    ("[]", "it is a JSON array, not an object"),
    ('{"status": "completed"}', "it has no choices, overrides, metrics"),
    ("{not json", "it is not valid JSON"),
])
def test_a_file_that_is_not_a_summary_is_skipped_with_a_warning(
        tmp_path: Path, content: str, why: str) -> None:
    run(tmp_path, "ft", BASE, 0)
    bad = tmp_path / "bad" / "summary.json"
    bad.parent.mkdir()
    bad.write_text(content)
    res = compare_cli([str(tmp_path), "--no-plots", "--out", str(tmp_path / "o")], tmp_path)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert f"effbench-compare: warning: skipped {bad}: {why}" in res.stderr
    assert "1 runs (1 completed, 0 failed)" in res.stdout
    assert str(bad) in (tmp_path / "o" / "compare.md").read_text()


def test_no_valid_summary_is_one_sentence(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text("[]")
    res = compare_cli([str(tmp_path), "--no-plots"], tmp_path)
    assert_one_sentence(res, f"{tmp_path / 'a' / 'summary.json'} is not a run summary",
                        "nor are the other 1", "pass the run or sweep directories")


def _readonly_cli(sweep: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """compare with ``sweep`` read-only: chmod for a normal user; root ignores modes, so there a
    read-only bind mount in a private mount namespace (skipped where that is not allowed)."""
    if os.geteuid() != 0:
        sweep.chmod(0o555)
        try:
            return compare_cli([str(sweep), *args], cwd)
        finally:
            sweep.chmod(0o755)
    if shutil.which("unshare") is None:
        pytest.skip("running as root without unshare: cannot make a read-only folder")
    script = 'mount --bind -o ro "$1" "$1" || exit 99; shift; exec "$@"'
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
                          str(sweep), sys.executable, "-m", "effbench.compare.cli", str(sweep),
                          *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    if res.returncode == 99 or "unshare failed" in res.stderr:
        pytest.skip(f"cannot make a read-only folder here: {res.stderr.strip()}")
    return res


def test_read_only_sweep_dir_suggests_out(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    run(sweep, "ft", BASE, 0)
    res = _readonly_cli(sweep, ["--no-plots"], tmp_path)
    assert_one_sentence(res, str(sweep / "compare"), "--out DIR")
    # The same sweep compares fine into a folder elsewhere.
    res = _readonly_cli(sweep, ["--no-plots", "--out", str(tmp_path / "o")], tmp_path)
    assert res.returncode == 0, res.stderr


def test_out_is_an_existing_file(tmp_path: Path) -> None:
    run(tmp_path / "sweep", "ft", BASE, 0)
    (tmp_path / "taken").write_text("x")
    res = compare_cli([str(tmp_path / "sweep"), "--no-plots", "--out", str(tmp_path / "taken")],
                      tmp_path)
    assert_one_sentence(res, f"output folder {tmp_path / 'taken'} is an existing file",
                        "--out DIR")
    assert (tmp_path / "taken").read_text() == "x"


@pytest.mark.parametrize("arg", ["empty", "nothing*"])
def test_no_summaries_found(tmp_path: Path, arg: str) -> None:
    (tmp_path / "empty").mkdir()
    res = compare_cli([str(tmp_path / arg)], tmp_path)
    assert_one_sentence(res, f"no summary.json found under {tmp_path / arg}",
                        "outputs/multirun/<date>")


# -- 6. atomic outputs ----------------------------------------------------------------------------

def test_outputs_are_replaced_atomically_with_the_umask(tmp_path: Path) -> None:
    for seed in (0, 1):
        run(tmp_path / "sweep", f"ft_{seed}", BASE, seed, co2=1e-3,
            curve=[(0.5, 0.6, 0), (0.9, 0.7, 0)])
        run(tmp_path / "sweep", f"pc_{seed}", CACHED, seed, co2=5e-4,
            curve=[(0.5, 0.6, 0), (0.9, 0.7, 0)])
    out = tmp_path / "o"
    out.mkdir()
    names = ["compare.md", "compare.csv", "runs.csv", "metric_vs_time.png", "co2.png"]
    for name in names:  # a hard link keeps the old inode: rewriting in place would change it
        (out / name).write_text("old")
        os.link(out / name, tmp_path / f"old_{name}")
    res = run_compare([str(tmp_path / "sweep"), "--out", str(out)], tmp_path, umask=0o027)
    assert res.returncode == 0, res.stderr
    for name in names:
        assert (tmp_path / f"old_{name}").read_text() == "old", name
        assert (out / name).stat().st_ino != (tmp_path / f"old_{name}").stat().st_ino
        assert (out / name).stat().st_mode & 0o777 == 0o640, name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "compare.csv"
    target.write_text("old")

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_atomic(target, broken)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["compare.csv"]


# -- 7. compare depends on summary.json only ------------------------------------------------------

def test_compare_does_not_import_the_runner() -> None:
    """run.py calls into compare (HParams logging); compare importing run.py back would be a
    cycle. Only hparams.py (moving to effbench/tracking) may know about the runner."""
    for path in COMPARE.glob("*.py"):
        if path.name == "hparams.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "effbench.run" or n.startswith("effbench.run.") for n in names), \
                f"{path.name} imports {names}"
    code = ("import sys, effbench.compare.cli; "
            "print(sorted(m for m in sys.modules if m in ('effbench.run', 'torch', "
            "'pytorch_lightning')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


# -- 8. any metric of the summaries ---------------------------------------------------------------

def test_metric_val_acc_max_and_close_matches(tmp_path: Path) -> None:
    for seed in (0, 1):
        for strategy, best in ((BASE, 0.93), (CACHED, 0.95)):
            run(tmp_path / "sweep", f"{strategy}_{seed}", strategy, seed,
                patch={"metrics": {"test/acc": 0.9, "val/acc_max": best + 0.01 * seed}})
    out = tmp_path / "o"
    res = compare_cli([str(tmp_path / "sweep"), "--metric", "val/acc_max", "--no-plots",
                       "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "metric val/acc_max" in res.stdout and "Δ acc_max pp" in res.stdout
    pc = csv_of(out).set_index("strategy").loc[CACHED]
    assert float(pc["val/acc_max"]) == pytest.approx(0.955)
    assert float(pc["d_metric_pp"]) == pytest.approx(2.0)
    res = compare_cli([str(tmp_path / "sweep"), "--metric", "val/acc_mx", "--no-plots",
                       "--out", str(out)], tmp_path)
    assert_one_sentence(res, "metric val/acc_mx is in no completed run (closest: val/acc_max",
                        "; use --metric with one of")
