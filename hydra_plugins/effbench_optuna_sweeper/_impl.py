"""The sweep itself: Hydra's sweep syntax → Optuna distributions, then ask / launch / tell.

Written for Optuna ≥ 3 (``FloatDistribution`` / ``IntDistribution``), after hydra-optuna-sweeper
1.3 (MIT, same configuration keys). What it adds for effbench: each trial's ``user_attrs`` name the
run folder it produced and how that run ended, a failed run (no objective value) is a FAIL trial
rather than an error, and a study none of whose trials completed ends in one line.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
from collections.abc import MutableSequence, Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, Trial, TrialState

log = logging.getLogger(__name__)
PLAIN = (str, int, float, bool, type(None))


def _choices(override: Override) -> CategoricalDistribution:
    values = list(override.sweep_iterator(transformer=Transformer.encode))
    bad = [v for v in values if not isinstance(v, PLAIN)]
    if bad:
        raise ValueError(f"hydra.sweeper.params.{override.get_key_element()}: a choice takes "
                         f"plain values (str, int, float, bool, null), not {bad[0]!r}.")
    return CategoricalDistribution(values)


def distribution_of(override: Override) -> BaseDistribution | str:
    """``choice(a, b)`` → categorical; ``range(start, stop, step)`` → a stepped int/float
    distribution over the values Hydra's range yields (stop excluded, as in Hydra);
    ``interval(lo, hi)`` → uniform, ``tag(log, interval(lo, hi))`` → log-uniform (over ints with
    Hydra's cast: ``int(interval(1, 64))``). A plain value is a fixed parameter (its string)."""
    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if override.is_choice_sweep():
        assert isinstance(value, ChoiceSweep)
        return _choices(override)
    if override.is_range_sweep():
        assert isinstance(value, RangeSweep)
        if value.shuffle:
            return _choices(override)
        values = list(override.sweep_iterator())
        if not values:
            raise ValueError(f"hydra.sweeper.params.{override.get_key_element()}: the range is "
                             "empty.")
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(value.step or 1))
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(value.step))
    if override.is_interval_sweep():
        assert isinstance(value, IntervalSweep)
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(f"hydra.sweeper.params: {override.input_line} is not a sweep Optuna can "
                     "sample (use choice(…), range(…), interval(…) or tag(log, interval(…))).")


def search_space(arguments: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    """The distributions and the fixed parameters named by ``key=value`` sweep overrides."""
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        found = distribution_of(override)
        if isinstance(found, BaseDistribution):
            space[override.get_key_element()] = found
        else:
            fixed[override.get_key_element()] = found
    return space, fixed


def grid_of(distribution: BaseDistribution) -> list[Any]:
    """Every value of a discrete distribution (GridSampler's search space)."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, (IntDistribution, FloatDistribution)) and \
            distribution.step is not None and not distribution.log:
        count = int(round((distribution.high - distribution.low) / distribution.step)) + 1
        return [distribution.low + i * distribution.step for i in range(count)]
    raise ValueError("hydra/sweeper/sampler=grid takes only discrete parameters: choice(…) or "
                     "range(…), not interval(…).")


def run_facts(ret: JobReturn) -> dict[str, Any]:
    """The run folder a job produced and how its run ended (its summary.json), as user attrs."""
    facts: dict[str, Any] = {}
    try:
        run_dir = Path(str(ret.hydra_cfg.hydra.runtime.output_dir))
    except Exception:  # noqa: BLE001 - a launcher that returns no Hydra config
        return facts
    facts["run_dir"] = str(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        facts["status"] = summary.get("status")
        if summary.get("error"):
            facts["error"] = str(summary["error"])[:500]
    except (OSError, ValueError, AttributeError):
        facts["status"] = None  # killed or crashed before its summary was written
    return facts


def objective_values(ret: JobReturn, n_directions: int) -> list[float] | None:
    """The job's value(s), or None when there is none to tell (a failed run returns None; a run
    that raised, or a non-finite value, counts as failed too)."""
    try:
        raw = ret.return_value
    except Exception:  # noqa: BLE001 - the job raised: Hydra re-raises it here
        return None
    raw_values = raw if isinstance(raw, (list, tuple)) else [raw]
    try:
        values = [float(v) for v in raw_values]
    except (TypeError, ValueError):
        return None
    if len(values) != n_directions or not all(math.isfinite(v) for v in values):
        return None
    return values


class OptunaSweeperImpl(Sweeper):
    def __init__(self, sampler: Any, direction: Any, storage: Any, study_name: str | None,
                 n_trials: int, n_jobs: int, params: DictConfig | None) -> None:
        if n_trials < 1 or n_jobs < 1:
            raise ValueError(f"hydra.sweeper.n_trials={n_trials} and hydra.sweeper.n_jobs="
                             f"{n_jobs} must both be at least 1.")
        self.sampler, self.storage, self.study_name = sampler, storage, study_name
        self.direction, self.n_trials, self.n_jobs = direction, n_trials, n_jobs
        self.params = params
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.job_idx = 0
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)

    def _directions(self) -> list[str]:
        raw = list(self.direction) if isinstance(self.direction, MutableSequence) \
            else [self.direction]
        return [getattr(d, "name", d) for d in raw]

    def _overrides(self, trial: Trial, space: dict[str, BaseDistribution],
                   fixed: dict[str, str]) -> Sequence[str]:
        for name, distribution in space.items():
            trial._suggest(name, distribution)
        for name, value in fixed.items():
            trial.set_user_attr(name, value)
        return tuple(f"{name}={value}" for name, value in {**trial.params, **fixed}.items())

    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        given = [f"{key}={value}" for key, value in (self.params or {}).items()]
        space, fixed = search_space([*given, *arguments])
        for name in fixed:  # a command-line value fixes a parameter of the preset's space
            space.pop(name, None)
        sampler = self.sampler
        is_grid = isinstance(sampler, functools.partial) and \
            sampler.func is optuna.samplers.GridSampler
        n_trials = self.n_trials
        if is_grid:
            grid = {name: grid_of(d) for name, d in space.items()}
            sampler = sampler(grid)
            n_trials = min(n_trials, math.prod(len(v) for v in grid.values()))
        directions = self._directions()
        study = optuna.create_study(study_name=self.study_name, storage=self.storage,
                                    sampler=sampler, directions=directions, load_if_exists=True)
        earlier = len(study.trials)
        log.info("Study %s (%s): %d earlier trials, %d more to run", study.study_name,
                 self.storage or "in memory", earlier, n_trials)
        to_go = n_trials
        while to_go > 0:
            trials = [study.ask() for _ in range(min(to_go, self.n_jobs))]
            overrides = [self._overrides(t, space, fixed) for t in trials]
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            for trial, ret in zip(trials, returns):
                self._tell(study, trial, ret, len(directions), is_grid)
            to_go -= len(trials)
        self._finish(study, earlier)

    @staticmethod
    def _tell(study: optuna.Study, trial: Trial, ret: JobReturn, n_directions: int,
              is_grid: bool) -> None:
        for key, value in run_facts(ret).items():
            trial.set_user_attr(key, value)
        values = objective_values(ret, n_directions)
        state = TrialState.COMPLETE if values is not None else TrialState.FAIL
        try:
            study.tell(trial, values if values is not None else None, state=state)
        except RuntimeError as err:
            # GridSampler stops the study once the grid is done, which outside optimize() is an
            # error raised after the trial was recorded.
            if not (is_grid and "Study.stop" in str(err)):
                raise

    def _finish(self, study: optuna.Study, earlier: int) -> None:
        done = [t for t in study.trials if t.state == TrialState.COMPLETE]
        ran = len(study.trials) - earlier
        if not done:
            # One line, no traceback; the sweep's report then names each failed job.
            print(f"effbench: none of the {len(study.trials)} trials of the Optuna study "
                  f"{study.study_name!r} completed ({ran} run now), so there is no best trial; "
                  "the failed jobs are listed below.", file=sys.stderr)
            return
        results: dict[str, Any]
        if len(study.directions) == 1:
            best = study.best_trial
            results = {"name": "optuna", "best_params": best.params, "best_value": best.value,
                       "best_run_dir": best.user_attrs.get("run_dir"),
                       "trials": {"total": len(study.trials), "complete": len(done),
                                  "this_launch": ran}}
            log.info("Best parameters: %s", best.params)
            log.info("Best value: %s (%s)", best.value, best.user_attrs.get("run_dir"))
        else:
            results = {"name": "optuna",
                       "solutions": [_solution(t) for t in study.best_trials]}
            log.info("Number of Pareto solutions: %d", len(study.best_trials))
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")


def _solution(trial: FrozenTrial) -> dict[str, Any]:
    return {"params": trial.params, "values": trial.values,
            "run_dir": trial.user_attrs.get("run_dir")}
