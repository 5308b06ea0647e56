"""The technique contract, over every registered technique and every pair of them: the run
completes (or a refused pair says why in one sentence), the summary validates against the schema,
and each technique's own effect holds in the stack."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest

from effbench.run import run_overrides
from effbench.summary import SCHEMA
from effbench.technique import registered
from tests.conftest import CONF, compose_cfg
from tests.helpers.tiny import tiny

TECHNIQUES = list(registered())
TINY = [*tiny(epochs=2), "dataset.batch_size=16", "backbone=small_cnn"]
# Options that make each technique's effect reachable in 2 tiny epochs (a technique with none
# runs with its defaults).
OPTIONS = {
    "prune": ["strategy.prune.start=0", "strategy.prune.end=1", "strategy.prune.frequency=1",
              "strategy.prune.final_sparsity=0.5"],
    "dynamic": ["strategy.dynamic.alpha=0.5", "strategy.dynamic.resample=false"],
    "qat": ["strategy.qat.latency_min_time=0.05", "strategy.qat.latency_batch=4"],
    "ptq": ["strategy.ptq.latency_min_time=0.05", "strategy.ptq.latency_batch=4"],
    "freeze": ["strategy.freeze.frozen_stages=2"],
    # small_cnn's dense layer is sized for the full 32 px: cifar_cnn14 ends in global pooling.
    "progressive_resizing": ["backbone=cifar_cnn14"],
}
# freeze leaves only the head of small_cnn training, and prune prunes only what trains.
PAIR_OPTIONS = {frozenset({"freeze", "prune"}): ["strategy.prune.scope=all",
                                                  "strategy.prune.include_head=true"]}
# Stacks known to be refused before anything runs, and the reason they give (any other pair
# either completes or is refused in one sentence naming both).
REFUSED = {frozenset({"precomputed", other}): "cannot run together"
           for other in ("freeze", "dynamic", "prune", "qat")}


def _finetune(s: dict) -> None:
    assert s["model"]["params_trainable"] > 0


def _freeze(s: dict) -> None:
    f = s["strategy"]["freeze"]
    # Frozen parameters never trained: the trainable count at the end is the one at the start,
    # below the total.
    assert f["stages_frozen"] >= 1
    assert f["params_trainable_start"] < s["model"]["params_total"]
    assert f["params_frozen_backbone"] > 0


def _prune(s: dict) -> None:
    p = s["strategy"]["prune"]
    assert p["schedule_completed"] and p["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert p["target_coverage"] == 1.0  # scope=conv: every conv layer has the target
    assert s["model"]["size_bytes_compressed"] < s["model"]["size_bytes"]


def _dynamic(s: dict) -> None:
    d = s["strategy"]["dynamic"]
    assert d["subset_size"] == 32 and d["images_trained"] == 2 * 32  # A, not the full 64


def _qat(s: dict) -> None:
    q = s["strategy"]["qat"]
    assert q["quantized_weights_bytes"]["ratio"] == pytest.approx(4.0, rel=0.02)
    assert s["model"]["size_bytes_int8"] < s["model"]["size_bytes_fp32"]
    assert s["model"]["size_bytes_fp16"] < s["model"]["size_bytes_fp32"]  # the study's 16-bit
    assert s["hardware"]["precision"] == "32-true"


def _precomputed(s: dict) -> None:
    p = s["strategy"]["precomputed"]
    assert "cache_hit" in p and s["model"]["params_trainable"] == s["model"]["head_params"]


# Each technique's own effect, asserted in every stack it is part of (a technique may instead
# assert its effect in its own tests/techniques/test_<name>.py).
EFFECTS: dict[str, Callable[[dict], None]] = {
    "finetune": _finetune, "freeze": _freeze, "prune": _prune, "dynamic": _dynamic, "qat": _qat,
    "precomputed": _precomputed}
STACKS = [(t,) for t in TECHNIQUES] + list(itertools.combinations(TECHNIQUES, 2))


def test_every_technique_has_a_contract() -> None:
    tests = Path(__file__).parent / "techniques"
    for name in TECHNIQUES:
        assert name in EFFECTS or (tests / f"test_{name}.py").is_file(), name


def test_registered_techniques_are_the_strategy_options() -> None:
    """Each registered technique is one ``conf/strategy/<name>.yaml`` that builds its class."""
    assert sorted(p.stem for p in (CONF / "strategy").glob("*.yaml")) == sorted(TECHNIQUES)
    for name, cls in registered().items():
        target = compose_cfg([f"strategy={name}"]).strategy[name]["_target_"]
        assert target == f"{cls.__module__}.{cls.__qualname__}", name


@pytest.mark.parametrize("stack", STACKS, ids=["+".join(s) for s in STACKS])
def test_technique_stack(stack: tuple[str, ...], tmp_path: Path) -> None:
    options = [*(o for t in stack for o in OPTIONS.get(t, [])),
               *PAIR_OPTIONS.get(frozenset(stack), [])]
    summary = run_overrides([*TINY, f"strategy=[{','.join(stack)}]", *options], tmp_path / "run")
    refused = REFUSED.get(frozenset(stack))
    if refused or (len(stack) == 2 and summary["status"] == "failed"
                   and "cannot run together" in (summary["error"] or "")):
        assert summary["status"] == "failed" and (refused or "cannot run") in summary["error"]
        assert all(t in summary["error"] for t in stack) and "\n" not in summary["error"]
        return
    assert summary["status"] == "completed", summary["error"]
    jsonschema.validate(summary, SCHEMA)
    assert set(summary["choices"]["techniques"]) == set(summary["strategy"]) == set(stack)
    for technique in stack:
        EFFECTS.get(technique, lambda s: None)(summary)
