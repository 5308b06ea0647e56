"""The sweeper class Hydra instantiates and its structured configs (``hydra/sweeper=optuna``,
``hydra/sweeper/sampler=tpe|random|cmaes|nsgaii|qmc|grid``). Light: Optuna is imported only when
a sweep starts (``_impl``)."""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig


class Direction(Enum):
    minimize = 1
    maximize = 2


@dataclass
class SamplerConfig:
    _target_: str = MISSING


@dataclass
class TPESamplerConfig(SamplerConfig):
    """optuna.samplers.TPESampler (the default)."""

    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = None
    n_startup_trials: int = 10
    n_ei_candidates: int = 24
    multivariate: bool = False
    group: bool = False
    constant_liar: bool = False  # n_jobs > 1: keeps parallel trials from proposing one point


@dataclass
class RandomSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = None


@dataclass
class CmaEsSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: int | None = None
    sigma0: float | None = None
    n_startup_trials: int = 1


@dataclass
class NSGAIISamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.NSGAIISampler"
    seed: int | None = None
    population_size: int = 50
    mutation_prob: float | None = None
    crossover_prob: float = 0.9
    swapping_prob: float = 0.5


@dataclass
class QMCSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.QMCSampler"
    seed: int | None = None
    qmc_type: str = "sobol"
    scramble: bool = False


@dataclass
class GridSamplerConfig(SamplerConfig):
    """The grid is built at sweep time from ``params`` (discrete ones only)."""

    _target_: str = "optuna.samplers.GridSampler"
    _partial_: bool = True
    seed: int | None = None


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.effbench_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    sampler: SamplerConfig = MISSING
    # minimize | maximize, or a list of them (one per value the app returns)
    direction: Any = Direction.minimize
    # None: in memory; a URL (sqlite:///…, postgresql://…) keeps the study, and a second launch
    # with the same study_name resumes it.
    storage: Any | None = None
    study_name: str | None = None
    n_trials: int = 20
    n_jobs: int = 2  # trials asked for and launched together (one launcher batch)
    params: dict[str, str] | None = None


_store = ConfigStore.instance()
_store.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf,
             provider="effbench_optuna_sweeper")
for _name, _node in {"tpe": TPESamplerConfig, "random": RandomSamplerConfig,
                     "cmaes": CmaEsSamplerConfig, "nsgaii": NSGAIISamplerConfig,
                     "qmc": QMCSamplerConfig, "grid": GridSamplerConfig}.items():
    _store.store(group="hydra/sweeper/sampler", name=_name, node=_node,
                 provider="effbench_optuna_sweeper")


class OptunaSweeper(Sweeper):
    """Asks Optuna for ``n_jobs`` trials at a time, launches them as one batch, tells results."""

    def __init__(self, sampler: Any, direction: Any, storage: Any, study_name: str | None,
                 n_trials: int, n_jobs: int, params: DictConfig | None) -> None:
        from ._impl import OptunaSweeperImpl

        self.sweeper = OptunaSweeperImpl(sampler, direction, storage, study_name, n_trials,
                                         n_jobs, params)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function,
                           config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)
