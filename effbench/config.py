"""Where the config tree lives and the resolvers it uses. Light: no torch import (``--help``)."""

from __future__ import annotations

import functools
import os
import secrets
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from effbench.errors import EffbenchError

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


@functools.cache
def _defaults(config_yaml: str) -> dict[str, str]:
    """``group → option`` of a primary config's defaults list, read as plain YAML: compare needs
    the default choices without Hydra's compose (and without importing the training side)."""
    try:
        tree = yaml.safe_load(Path(config_yaml).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise EffbenchError(f"cannot read the defaults list of {config_yaml}: {err}.") from err
    out: dict[str, str] = {}
    for item in tree.get("defaults") or []:
        if not isinstance(item, dict):
            continue  # `_self_`: where the file's own values go, no group
        for key, option in item.items():
            # `optional group@package: option` and `override group: option` choose for `group`.
            group = str(key).removeprefix("optional ").removeprefix("override ").split("@")[0]
            options = option if isinstance(option, list) else [option]  # a multi-select default
            out[group.strip()] = "+".join(str(o) for o in options if o is not None)
    return out


def default_choice(group: str) -> str:
    """The option that conf/config.yaml's defaults list picks for ``group`` (``a+b`` for a list),
    e.g. the strategy every comparison measures against unless told otherwise. Read at call
    time from ``CONF_DIR``, so a test can point it at another tree."""
    choice = _defaults(str(Path(CONF_DIR) / "config.yaml")).get(group)
    if not choice:
        raise EffbenchError(f"{CONF_DIR}/config.yaml picks no default for {group}; add "
                            f"`- {group}: <option>` to its defaults list.")
    return choice


def techniques(strategy: object) -> str:
    """``a+b`` for ``strategy=[a,b]`` (run dir names, labels); the default strategy when the
    config holds none."""
    keys = list(strategy.keys()) if hasattr(strategy, "keys") else []
    return "+".join(str(k) for k in keys) or default_choice("strategy")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("user_cache_dir"):
        OmegaConf.register_new_resolver("user_cache_dir", user_cache_dir)
    if not OmegaConf.has_resolver("techniques"):
        OmegaConf.register_new_resolver("techniques", techniques)
    if not OmegaConf.has_resolver("process_id"):
        OmegaConf.register_new_resolver("process_id", lambda: _PROCESS_ID, use_cache=True)


register_resolvers()
