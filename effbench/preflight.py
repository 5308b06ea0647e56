"""Config errors as one sentence, before Hydra starts a job.

Hydra reports an unknown option, a bad override or an unusable run dir in several lines (the
config search path, a stack trace for the run dir). Composing the same overrides here first — the
compose API is what Hydra itself runs — lets effbench say it in one line and exit 1. A sweep
(``-m``) is composed job by job (each value of each swept key once), so one bad job stops the
sweep before any job starts; ``--cfg`` gets the same composition check. The composed values then
go through the light checks of ``validate.check_light`` (the typed schema of effbench/schema.py):
nothing is created before a command is known to be sound. ``--help``, ``--info`` and the other
introspection flags go straight to Hydra.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

# ``hydra.mode`` of the command's first composed job, once preflight has composed it (the key
# absent: not composed). Hydra composes the whole config once more only to read this value
# (``Hydra.get_mode``, ~0.2 s of a 0.5-s command); the CLI answers it from here instead.
COMPOSED: dict[str, Any] = {}


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


# Hydra's flags this module understands; any other flag (--help, --info, -cn …) is Hydra's alone.
MULTIRUN = ("-m", "--multirun")
WITH_VALUE = ("--cfg", "-c", "--package", "-p")
PLAIN = ("--resolve", "-r", "--run")


def parse_argv(argv: list[str]) -> tuple[dict[str, str | bool], list[str]] | None:
    """``({"multirun": …, "cfg": …}, overrides)``, or None for a command left to Hydra."""
    flags: dict[str, str | bool] = {"multirun": False, "cfg": ""}
    overrides: list[str] = []
    args = iter(argv)
    for arg in args:
        name, _, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if arg in MULTIRUN:
            flags["multirun"] = True
        elif name in WITH_VALUE:
            value = inline or next(args, "")
            if name in ("--cfg", "-c"):
                flags["cfg"] = value
        elif arg in PLAIN:
            continue
        elif arg.startswith("-"):
            return None
        else:
            overrides.append(arg)
    return flags, overrides


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs whose composition decides whether every job of a sweep composes: the first
    value of each swept key, then each other value of one key at a time (a job's keys are
    composed independently, so a bad value shows in the job that holds it). ``interval()``
    sweeps are drawn by the sweeper at run time and left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    fixed: list[str] = []
    swept: list[tuple[str, list[str]]] = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if not override.is_sweep_override():
            fixed.append(override.input_line or "")
        elif override.is_discrete_sweep():
            swept.append((override.get_key_element(), list(override.sweep_string_iterator())))
    first = [f"{key}={values[0]}" for key, values in swept if values]
    jobs = [[*fixed, *first]]
    for i, (key, values) in enumerate(swept):
        jobs += [[*fixed, *first[:i], f"{key}={value}", *first[i + 1:]] for value in values[1:]]
    return jobs


def _compose_problem(overrides: list[str], conf_dir: str, checks: bool,
                     run_dir_key: str) -> str | None:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    from effbench.errors import EffbenchError
    from effbench.validate import check_light

    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        COMPOSED.setdefault("mode", cfg.hydra.mode)
        if not checks:
            return None
        run_dir = str(cfg.hydra.run.dir if run_dir_key == "run" else cfg.hydra.sweep.dir)
        # Where the records go is said first: a completed run's folder is refused whatever else
        problem = _run_dir_problem(run_dir, run_dir_key)
        if problem:
            return problem
        check_light(cfg, overrides)
    except MissingConfigException as err:
        return _missing_option(err, overrides)
    except OverrideParseException as err:
        return f"cannot parse the command line: {_one_line(str(err).split('See https')[0])}"
    except EffbenchError as err:
        return str(err)
    except (HydraException, OmegaConfBaseException) as err:
        return _composition(err)
    return None


def _run_dir_problem(run_dir: str, run_dir_key: str) -> str | None:
    problem = check_run_dir(run_dir)
    if not problem:  # a folder effbench never writes into: refused before Hydra creates it
        from effbench.rundir import refused_run_dir, reused_sweep_dir

        return reused_sweep_dir(run_dir) if run_dir_key == "sweep" else refused_run_dir(run_dir)
    return problem.replace("hydra.run.dir", "hydra.sweep.dir") if (
        problem and run_dir_key == "sweep") else problem


def preflight(argv: list[str], conf_dir: str) -> str | None:
    """The one sentence for a command that cannot start, or None."""
    from hydra.errors import OverrideParseException

    parsed = parse_argv(argv)
    if parsed is None:  # --help, --info, -cn …: Hydra's business
        return None
    flags, overrides = parsed
    if not flags["multirun"]:
        return _compose_problem(overrides, conf_dir, not flags["cfg"], "run")
    try:
        jobs = sweep_jobs(overrides)
    except OverrideParseException as err:
        return f"cannot parse the command line: {_one_line(str(err).split('See https')[0])}"
    if flags["cfg"]:  # Hydra: "Only one of --run, --multirun, --cfg … can be specified" + trace
        example = " ".join(["effbench", "--cfg", str(flags["cfg"]), *jobs[0]])
        return (f"--cfg {flags['cfg']} shows the config of one job and -m starts a sweep; drop -m "
                f"to see one job's config (e.g. {example}), or drop --cfg to run the sweep.")
    for i, job in enumerate(jobs):
        problem = _compose_problem(job, conf_dir, True, "sweep")
        if problem:
            differs = [o for o in job if o not in jobs[0]]
            where = f"the sweep's job {' '.join(differs)}: " if i and differs else ""
            return where + problem
    return None
