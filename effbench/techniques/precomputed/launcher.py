"""``hydra/launcher=batched_heads``: the heads of a ``precomputed`` sweep, one batched model.

A Hydra launcher receives every job of ``effbench -m …`` at once. This one groups the jobs that
differ only in head-level keys (:data:`HEAD_KEYS`) and share one feature cache, trains each group's
heads together over one pass of the cached features (``batched``) and then runs
every job as the basic launcher would: its own run dir, loggers, test and ``summary.json``, where
the job takes its trained head instead of training it (``summary.strategy.precomputed.batched``
says with how many heads it trained and its share of the group's time and energy). Any other job
runs one after another, exactly like the basic launcher; a one-line notice says which and why.

A group's first job runs alone when the cache has no index entry yet (it extracts the features and
proves the cached test features equal the model's test, see ``technique.py``); the
group's other heads then train batched.

Hydra instantiates launchers only from the ``hydra_plugins`` package (a plugin-discovery rule).
The launcher's config therefore also installs :class:`RegisterLauncher`, a Hydra callback (those
are instantiated before the launcher) that registers the class through Hydra's public
``Plugins.register`` under the name the config gives it — effbench stays one package.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, configure_log, run_job, setup_globals
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

log = logging.getLogger(__name__)

# Keys that change only the head's training, never the cached features.
HEAD_KEYS = ("optim.optimizer.lr", "optim.optimizer.weight_decay", "strategy.precomputed.dropout",
             "strategy.precomputed.ambiguity_weight")
# The seed fixes the backbone's random initialisation: head-level only with pretrained weights.
SEED = "seed"


class BatchedHeadsLauncher(BasicLauncher):
    """The basic launcher, with each group of head-level variations trained batched first."""

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.hydra_context is not None and self.config is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        configs = []
        for i, overrides in enumerate(job_overrides):
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.id = cfg.hydra.job.num = initial_job_idx + i
            configs.append(cfg)
        groups, notice = group_jobs(job_overrides, [task_config(c) for c in configs])
        if notice:
            print(f"effbench: batched_heads: {notice}", file=sys.stderr)
        runs: dict[int, JobReturn] = {}
        for group in groups:
            if len(group) > 1:
                group = self._batch(group, configs, runs, sweep_dir)
            for i in group:
                runs[i] = self._run(configs[i])
        return [runs[i] for i in range(len(configs))]

    def _run(self, cfg: DictConfig) -> JobReturn:
        assert self.hydra_context is not None and self.config is not None
        ret = run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                      config=cfg, job_dir_key="hydra.sweep.dir",
                      job_subdir_key="hydra.sweep.subdir")
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret

    def _batch(self, group: list[int], configs: list[DictConfig], runs: dict[int, JobReturn],
               sweep_dir: Path) -> list[int]:
        """Train the group's heads batched; returns the jobs still to run (all of them, or all
        but the first when it had to build the cache first)."""
        HydraConfig.instance().set_config(configs[group[0]])
        tasks = {i: task_config(configs[i]) for i in group}
        if not cache_ready(tasks[group[0]]):
            runs[group[0]] = self._run(configs[group[0]])  # extracts, writes the index entry
            group = group[1:]
            HydraConfig.instance().set_config(configs[group[0]])
        if len(group) > 1:
            try:
                pretrain([tasks[i] for i in group], sweep_dir / ".batched_heads")
            except Exception as err:  # noqa: BLE001 - the jobs then train one by one, as usual
                log.warning("batched head training failed (%s: %s); the jobs train one by one",
                            type(err).__name__, err)
                print(f"effbench: batched_heads: batched training failed ({err}); "
                      "these jobs train one by one.", file=sys.stderr)
        return group


class RegisterLauncher(Callback):
    """Registers :class:`BatchedHeadsLauncher` with Hydra before Hydra instantiates launchers."""

    def __init__(self) -> None:
        # Hydra finds a launcher by module + class name, accepts only hydra_plugins.* names and
        # imports that module: this module answers to that name too.
        sys.modules.setdefault(PLUGIN_MODULE, sys.modules[__name__])
        Plugins.instance().register(BatchedHeadsLauncher)


PLUGIN_MODULE = "hydra_plugins.effbench_batched_heads"
BatchedHeadsLauncher.__module__ = PLUGIN_MODULE


def task_config(cfg: DictConfig) -> DictConfig:
    """The job's config as its task function receives it (Hydra's node removed)."""
    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def _parse(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key, value


def group_jobs(job_overrides: Sequence[Sequence[str]],
               tasks: list[DictConfig]) -> tuple[list[list[int]], str | None]:
    """Job indices in groups that can train batched (one group per shared set of non-head
    overrides), singletons otherwise, in the order of each group's first job; plus the notice."""
    groups: dict[Any, list[int]] = {}
    alone: list[str] = []
    for i, (overrides, task) in enumerate(zip(job_overrides, tasks)):
        if list(task.get("strategy") or []) != ["precomputed"]:
            groups[("alone", i)] = [i]
            alone.append("not strategy=precomputed")
            continue
        head = set(HEAD_KEYS)
        if str(task.backbone.get("weights")).lower() not in ("none", "null", ""):
            head.add(SEED)
        key = tuple(sorted(o for o in overrides if _parse(o)[0].lstrip("+~") not in head))
        groups.setdefault(key, []).append(i)
    ordered = sorted(groups.values(), key=lambda g: g[0])
    batched = [g for g in ordered if len(g) > 1]
    single = [g for g in ordered if len(g) == 1]
    if not single:
        return ordered, None
    why = sorted(set(alone)) or ["they differ from every other job in more than head-level keys "
                                 f"({', '.join(HEAD_KEYS)})"]
    return ordered, (f"{len(single)} of {len(tasks)} job(s) run one after another: "
                     f"{'; '.join(why)}; {sum(map(len, batched))} job(s) in {len(batched)} "
                     "group(s) train batched.")


def cache_ready(task: DictConfig) -> bool:
    """Whether the group's features can be loaded without decoding (an index hit)."""
    from effbench.stack import build_techniques

    strategy = build_techniques(task.strategy)[0]
    return strategy.cached_parts(task) is not None


def pretrain(tasks: list[DictConfig], work_dir: Path) -> None:
    """Train the heads of ``tasks`` (one job config each) as one batched model; each job then
    finds its trained head in ``effbench.techniques.precomputed.batched.PRETRAINED``."""
    import pytorch_lightning as pl

    from effbench.recipe import Recipe
    from effbench.run import build_run
    from effbench.stack import build_techniques
    from effbench.system import ClassifierSystem
    from effbench.techniques.precomputed.batched import (
        PRETRAINED,
        HeadJob,
        Pretrained,
        job_key,
        train_heads,
    )
    from effbench.techniques.precomputed.head_training import (
        bind_schedule,
        cpu_threads,
        head_steps,
        head_threads,
    )
    from effbench.tracking import EnergyTracker

    first = tasks[0]
    energy = EnergyTracker(bool(first.tracking.energy), first.tracking.country, work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    energy.start()
    start = time.perf_counter()
    pl.seed_everything(int(first.seed), workers=True, verbose=False)
    ctx = build_run(first, work_dir)
    strategy, device = ctx.techniques[0], ctx.plan.torch_device
    feats = strategy.cached_features()
    sys0, dm = ctx.system, ctx.datamodule
    jobs, rows = [], []
    for task in tasks:
        own = build_techniques(task.strategy)[0]
        recipe = Recipe.from_config(task.optim)
        head = own.seeded_head(sys0.backbone.feature_dim, dm.num_classes, int(task.seed))
        system = ClassifierSystem(sys0.backbone, head, sys0.loss_fn, dm.task, dm.class_names,
                                  {"factory": recipe.optimizer, "lr": recipe.lr,
                                   "lr_scale": ctx.plan.lr_scale}, recipe.scheduler,
                                  recipe.monitor)
        system.to(device)
        logged: list[tuple[dict[str, float], int]] = []
        rows.append(logged)
        cfg = own.head_training(task, recipe, dm.batch_size)
        # A per-step schedule (cosine) built for this loop's steps, stepped after each one.
        steps = head_steps(len(feats["train"][1]), cfg.batch_size)
        jobs.append(HeadJob(head, sys0.loss_fn,
                            bind_schedule(system.configure_optimizers(), cfg.epochs, steps), cfg,
                            lambda row, step, logged=logged: logged.append((row, step))))
    on = {s: (x.to(device), y.to(device)) for s, (x, y) in feats.items()}
    threads = head_threads(strategy.head_threads) if device.type == "cpu" else None
    with cpu_threads(threads):
        results = train_heads(jobs, on["train"], on["val"], dm.task, sys0.class_names, device)
    seconds = time.perf_counter() - start
    group_energy = energy.stop()
    kwh, co2 = group_energy.get("kwh"), group_energy.get("co2_kg")
    k = len(tasks)
    for task, job, result, logged in zip(tasks, jobs, results, rows):
        PRETRAINED[job_key(task)] = Pretrained(
            {n: t.detach().cpu().clone() for n, t in job.head.state_dict().items()}, result,
            logged, {"heads": k, "group_s": seconds, "share_s": seconds / k,
                     "energy_kwh_share": kwh / k if kwh is not None else None,
                     "co2_kg_share": co2 / k if co2 is not None else None})
