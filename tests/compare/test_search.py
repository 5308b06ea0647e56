"""``effbench-compare --search-cost strategy``: the study's "N× faster" figure for a search."""

from __future__ import annotations

from pathlib import Path

from tests.compare.conftest import BASE, CACHED, fake_run
from tests.helpers.cli import run_compare


def test_search_cost_prints_n_times_faster_and_best_validation(tmp_path: Path) -> None:
    for i, (lr, acc) in enumerate([("1e-3", 0.90), ("1e-2", 0.80)]):
        fake_run(tmp_path, f"f{i}", BASE, 0, acc, train=20.0,
                 overrides=(f"optim.optimizer.lr={lr}",))
        fake_run(tmp_path, f"p{i}", CACHED, 0, acc - 0.05, train=2.0,
                 overrides=(f"optim.optimizer.lr={lr}",))
    out = run_compare([str(tmp_path), "--search-cost", "strategy"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"{CACHED}: 10.0× faster than {BASE}" in out.stdout
    # The winner of each search is picked on validation accuracy: 0.90 and 0.85.
    assert "best val/acc 0.8500 vs 0.9000" in out.stdout


def test_search_cost_on_an_unknown_key_is_one_sentence(tmp_path: Path) -> None:
    fake_run(tmp_path, "f0", BASE, 0, 0.9, train=20.0)
    out = run_compare([str(tmp_path), "--search-cost", "nosuch"], tmp_path)
    assert out.returncode != 0 and "--search-cost nosuch" in out.stderr
    assert "Traceback" not in out.stderr
