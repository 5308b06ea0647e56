"""The ``effbench`` command: a Hydra app over ``conf/`` that runs one job per composed config."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from effbench.report import print_report

log = logging.getLogger("effbench")


def _user_cache_dir() -> str:
    """Where caches go unless ``EFFBENCH_CACHE_DIR`` says otherwise (XDG on Linux)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "effbench")


if not OmegaConf.has_resolver("user_cache_dir"):
    OmegaConf.register_new_resolver("user_cache_dir", _user_cache_dir)


# conf/ sits beside the package (the editable install keeps it there); an absolute path works both
# from the console script and from ``python -m effbench.cli``.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _app(cfg: DictConfig) -> Any:
    from effbench.run import run  # heavy imports after Hydra has parsed the command line

    hc = HydraConfig.get()
    choices = dict(hc.runtime.choices)
    summary = run(cfg, Path(hc.runtime.output_dir), choices, list(hc.overrides.task),
                  original_cwd=hydra.utils.get_original_cwd())
    if rank_zero_only.rank == 0:
        print_report(summary)
    if summary["status"] != "completed" and hc.mode != RunMode.MULTIRUN:
        sys.exit(1)  # one sentence already printed; a sweep instead records it and goes on
    metric = cfg.get("objective", "test/acc")
    return summary["metrics"].get(metric, summary["best_val"].get(metric))


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
