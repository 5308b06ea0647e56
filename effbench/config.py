"""Where the config tree lives and the resolvers it uses. Light: no torch import (``--help``)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from omegaconf import OmegaConf

# conf/ sits beside the package (the editable install keeps it there); an absolute path works both
# from the console script and from ``python -m effbench.cli``.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# One id per process: with sub-second time it makes sweep dirs unique even when two sweeps start
# in the same instant (same second, same folder). Hydra's resolver cache keeps it stable within a
# sweep, also in joblib workers (they receive the already-resolved config).
_PROCESS_ID = f"{os.getpid()}{secrets.token_hex(2)}"


def user_cache_dir() -> str:
    """Where caches go unless ``EFFBENCH_CACHE_DIR`` says otherwise (XDG on Linux)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "effbench")


def techniques(strategy: object) -> str:
    """``freeze+prune`` for ``strategy=[freeze,prune]`` (run dir names, labels)."""
    keys = list(strategy.keys()) if hasattr(strategy, "keys") else []
    return "+".join(str(k) for k in keys) or "finetune"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("user_cache_dir"):
        OmegaConf.register_new_resolver("user_cache_dir", user_cache_dir)
    if not OmegaConf.has_resolver("techniques"):
        OmegaConf.register_new_resolver("techniques", techniques)
    if not OmegaConf.has_resolver("process_id"):
        OmegaConf.register_new_resolver("process_id", lambda: _PROCESS_ID, use_cache=True)


register_resolvers()
