"""compare names no technique: the baseline is the config's default strategy, a reused-work
record is charged under whichever technique holds it, and any technique's ``<name>/resampled``
column marks its epochs. Each test uses names no technique has, so a literal name would fail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import effbench.config
from effbench.compare.cost import charge, reused_work
from effbench.compare.curves import config_curve, is_resampled_column
from effbench.compare.group import compare, default_baseline
from effbench.compare.load import load_runs
from effbench.compare.search import search_cost, search_text
from effbench.config import default_choice, techniques
from effbench.errors import EffbenchError
from tests.compare.conftest import BASE, fake_run

SPARED = {"bn_adapt": 1.0, "extract": 3.0}


def with_facts(run_dir: Path, facts: dict[str, Any]) -> Path:
    """``summary.strategy`` replaced by ``facts`` (one dict of facts per technique)."""
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text())
    summary["strategy"] = facts
    path.write_text(json.dumps(summary))
    return run_dir


def cache_record(entry: str = "entry-1") -> dict[str, Any]:
    """A cache-hit job's record of the work it reused (built by a job that is not here)."""
    return {"hit": True, "built_by": "/nowhere/builder", "keys": {"train": entry},
            "built_s": dict(SPARED), "spared_s": dict(SPARED)}


# -- reused work: whichever technique's facts hold the cache record -------------------------------

@pytest.mark.parametrize("technique", ["reuser", "another_one"])
def test_a_cache_record_under_any_technique_is_charged(tmp_path: Path, technique: str) -> None:
    with_facts(fake_run(tmp_path, "base", BASE, 0, 0.9, 10.0), {})
    hit = with_facts(fake_run(tmp_path, "hit", technique, 0, 0.9, 2.0),
                     {"unrelated": {"sparsity": 0.5}, technique: {"cache": cache_record()}})
    runs = charge(load_runs([str(tmp_path)])).set_index("run_dir")
    # fake_run's train phase is half of `train`; per run, the hit pays what it was spared.
    assert runs.loc[str(hit), "train_s"] == pytest.approx(1.0 + sum(SPARED.values()))
    assert runs.loc[str(tmp_path / "base"), "train_s"] == pytest.approx(5.0)
    assert "1 cache-hit job charged" in runs.attrs["cost_view"]


def test_reused_work_skips_techniques_without_a_cache_record() -> None:
    record = cache_record()
    summary = {"strategy": {"first": {"cache": {"hit": False}}, "model": {"size_bytes": 1},
                            "second": {"cache": record}}}
    assert reused_work(summary) is record  # the first has no built_s: not a reused-work record
    assert reused_work({"strategy": {"first": {"latency_ms": 1.0}}}) is None
    assert reused_work({}) is None


# -- resampled epochs: any technique's <name>/resampled column ------------------------------------

@pytest.mark.parametrize("technique", ["subset", "another_sampler"])
def test_any_technique_resampled_column_marks_the_epoch(tmp_path: Path, technique: str) -> None:
    run_dir = fake_run(tmp_path, "r", technique, 0, 0.9, 1.0, resampled_by=technique,
                       curve=[(0.4, 0.5, 0), (0.8, 0.4, 1), (0.9, 0.8, 0)])
    assert config_curve([str(run_dir)], "val/acc").resampled == [1]


def test_only_a_technique_level_resampled_column_counts() -> None:
    assert is_resampled_column("any_name/resampled")
    assert not is_resampled_column("resampled")          # no technique named
    assert not is_resampled_column("val/acc/resampled")  # a metric's path, not a technique
    assert not is_resampled_column("any_name/resampled_at")


# -- the default baseline: conf/config.yaml's default strategy ------------------------------------

def conf_tree(root: Path, defaults: str) -> Path:
    """A config tree whose config.yaml holds only ``defaults`` (a YAML defaults list)."""
    root.mkdir()
    (root / "config.yaml").write_text(f"defaults:\n{defaults}\nseed: 0\n")
    return root


def test_default_choice_reads_the_defaults_list(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert (Path(effbench.config.CONF_DIR) / "strategy" / f"{BASE}.yaml").is_file()  # the real tree
    conf = conf_tree(tmp_path / "conf", "  - dataset: tiny\n  - strategy: [first, second]\n"
                                        "  - optional backbone@model: net\n  - _self_\n"
                                        "  - experiment: null\n  - override hydra/help: mine")
    monkeypatch.setattr(effbench.config, "CONF_DIR", str(conf))
    assert default_choice("strategy") == "first+second"  # a stack, named as run dirs name it
    assert default_choice("backbone") == "net" and default_choice("hydra/help") == "mine"
    assert techniques(None) == "first+second"
    with pytest.raises(EffbenchError, match="picks no default for experiment"):
        default_choice("experiment")


def test_the_default_baseline_follows_the_config(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(effbench.config, "CONF_DIR",
                        str(conf_tree(tmp_path / "conf", "  - strategy: plain")))
    assert default_baseline() == "strategy=plain"
    root = tmp_path / "runs"
    for name, train in (("plain", 20.0), ("quicker", 2.0), (BASE, 10.0)):
        for seed in (0, 1):
            fake_run(root, f"{name}_{seed}", name, seed, 0.9, train)
    runs = load_runs([str(root)])
    comp = compare(runs)
    assert comp.baseline == {"strategy": "plain"}  # not the real tree's default
    table = comp.table.set_index("strategy")
    assert bool(table.loc["plain", "baseline"]) and not bool(table.loc[BASE, "baseline"])
    assert table.loc["quicker", "compared_with"] == "plain"
    assert table.loc["quicker", "speedup"] == pytest.approx(10.0)
    text = search_text(search_cost(runs, "strategy"), "strategy")
    assert "quicker: 10.0× faster than plain" in text
