"""Config errors as one sentence, before Hydra starts a job.

Hydra reports an unknown option, a bad override or an unusable run dir in several lines (the
config search path, a stack trace for the run dir). Composing the same overrides here first — the
compose API is what Hydra itself runs — lets effbench say it in one line and exit 1. Only plain
single runs are checked: introspection flags (``--help``, ``--cfg``) and sweeps go straight to
Hydra.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines)


def _missing_option(err: Exception, overrides: list[str]) -> str:
    text = str(err)
    match = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    options = list(getattr(err, "options", None) or [])
    if not match:
        return _one_line(text.split("Config search path")[0])
    group, name = match.groups()
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.4)
    hint = f" (closest: {', '.join(close)})" if close else ""
    return (f"{group}={name} is not one of the {group} options{hint}; use one of: "
            f"{', '.join(options)}.")


def _composition(err: Exception) -> str:
    text = str(err)
    match = re.search(r"Could not override '([^']+)'", text)
    if match:
        key = match.group(1)
        return (f"{key} is not an option of the composed config; check the spelling with "
                f"`effbench --cfg job`, or add a new key with +{key}=… .")
    return _one_line(text)


def check_run_dir(path: str) -> str | None:
    """A run dir under a file, or in a folder that cannot be written, fails inside Hydra with a
    stack trace: say it first."""
    target = Path(path).expanduser()
    probe = target
    while not probe.exists():
        if probe.parent == probe:
            return None
        probe = probe.parent
    if not probe.is_dir():
        return (f"hydra.run.dir={path} lies under {probe}, which is a file, not a folder; "
                "choose another hydra.run.dir.")
    if not os.access(probe, os.W_OK | os.X_OK):
        return (f"hydra.run.dir={path} cannot be created: {probe} is not writable; choose a "
                "writable folder with hydra.run.dir=… .")
    return None


def preflight(argv: list[str], conf_dir: str) -> str | None:
    """The one sentence for a command that cannot start, or None."""
    if any(a.startswith("-") for a in argv):  # --help, --cfg, -m, -cn …: Hydra's business
        return None
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            cfg = compose("config", overrides=list(argv), return_hydra_config=True)
            run_dir = str(cfg.hydra.run.dir)
    except MissingConfigException as err:
        return _missing_option(err, argv)
    except OverrideParseException as err:
        return f"cannot parse the command line: {_one_line(str(err).split('See https')[0])}"
    except (HydraException, OmegaConfBaseException) as err:
        return _composition(err)
    return check_run_dir(run_dir)
