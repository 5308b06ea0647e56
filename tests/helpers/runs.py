"""A run's context as ``effbench.run.run`` builds it up to the techniques' ``configure_model``,
kept for inspection (tests that drive the phases themselves)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def configured(tmp_path: Path, overrides: list[str]):
    """Composed as the CLI would, built, every technique checked and configured."""
    from effbench.run import build_run
    from tests.conftest import compose_cfg

    cfg = compose_cfg(overrides)
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    ctx = build_run(cfg, tmp_path / "run")
    for t in ctx.techniques:
        t.check(ctx)
        t.configure_model(ctx)
    return ctx
