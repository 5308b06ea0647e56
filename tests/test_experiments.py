"""Every reproduction preset in conf/experiment/ composes and runs one tiny step on generated data
in its dataset's real format (sweep presets: every grid value composes, one grid point runs)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from tests.conftest import CONF, compose_cfg, run_preset_job
from tests.data.fakes import WRITERS, write_brain_mri, write_breakhis

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# Big models whose strategy does heavy per-step or final work (pruning masks, int8 conversion).
SLOW_STRATEGIES = {"prune", "qat"}

# The smallest data of each format that still splits (precomputed passes over all of it).
SMALL = {**WRITERS, "brain_mri": partial(write_brain_mri, per_class=6),
         "breakhis": partial(write_breakhis, patients_per_type=2, mags=("40", "100"))}


def sweep_params(preset: str) -> dict[str, list[str]]:
    """``hydra.sweeper.params`` of a preset as ``{key: [value, …]}`` (Hydra's own parser)."""
    params = compose_cfg([f"experiment={preset}"]).hydra.sweeper.get("params") or {}
    parser = OverridesParser.create()
    out = {}
    for key, value in params.items():
        override = parser.parse_override(f"{key}={value}")
        if not override.is_sweep_override():
            out[key] = [override.get_value_element_as_str()]
        elif override.is_discrete_sweep():  # a,b / choice() / range()
            out[key] = list(override.sweep_string_iterator())
        else:  # interval() of Optuna-style sweepers: its two ends
            out[key] = [str(override.value().start), str(override.value().end)]
    return out


def test_there_are_presets() -> None:
    assert PRESETS


def _param(preset: str):
    """Presets that switch to a slow strategy are marked slow (they still run by default)."""
    text = (CONF / "experiment" / f"{preset}.yaml").read_text()
    slow = any(f"override /strategy: {name}" in text for name in SLOW_STRATEGIES)
    return pytest.param(preset, marks=pytest.mark.slow) if slow else preset


@pytest.mark.parametrize("preset", [_param(p) for p in PRESETS])
def test_preset_runs_one_step(preset: str, tmp_path: Path) -> None:
    grid = sweep_params(preset)
    first_point = [f"{k}={v[0]}" for k, v in grid.items()]
    for key, values in grid.items():  # every value of the grid composes
        for value in values[1:]:
            cfg = compose_cfg([f"experiment={preset}", *first_point, f"{key}={value}"])
            if key in cfg.hydra.runtime.choices:  # a group swept: the job gets that option
                assert cfg.hydra.runtime.choices[key] == value
    base = [f"experiment={preset}", *first_point]
    dataset = compose_cfg(base).dataset.name
    root = SMALL[dataset](tmp_path / "data" / dataset) if dataset in SMALL else None
    summary = run_preset_job(tmp_path, [*base, *([f"dataset.root={root}"] if root else [])])
    assert summary["status"] == "completed", summary["error"]
    assert summary["choices"]["experiment"] == preset
    assert summary["choices"]["dataset"] == dataset
    assert summary["metrics"]["test/acc"] >= 0
