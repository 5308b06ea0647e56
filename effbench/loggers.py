"""Experiment trackers (the ``logger=`` config group), the run's end for them, and a quiet console.

Each entry of ``cfg.logger`` is a Lightning logger built by Hydra's ``instantiate`` from its
``_target_`` (lightning-hydra-template style): ``logger=tensorboard_csv`` (the run's own records,
always), ``logger=mlflow`` and ``logger=wandb`` (those records + a tracker). A value ``???`` is
filled at run time: ``save_dir`` with the run dir, ``history`` with the CSV rows of the run being
resumed, ``run_name`` / ``name`` with the run dir's name. Kept light: Lightning is imported only
when loggers are built.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from effbench.config import CONF_DIR
from effbench.errors import EffbenchError, root_cause

log = logging.getLogger(__name__)

# Third-party loggers whose INFO lines are chatter: Lightning's "GPU available / TPU available"
# (once per Trainer, i.e. per fit and per test), its "💡 Tip: … litlogger / litmodels"
# advertisements, "Restoring states from the checkpoint"; alembic's and MLflow's schema lines when
# an MLflow/Optuna SQLite store is created. Their warnings still show; Lightning's real warnings go
# through Python's ``warnings`` module and are untouched.
NOISY_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                 "lightning_fabric.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "alembic", "alembic.runtime.migration", "mlflow.store.db.utils")


def quiet_third_party(level: int = logging.WARNING) -> None:
    """Raises the named third-party loggers to ``level`` (warnings and errors still show)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(level)


def default_logger_config() -> DictConfig:
    """``conf/logger/tensorboard_csv.yaml``: used when a config has no ``logger`` group."""
    return OmegaConf.load(Path(CONF_DIR) / "logger" / "tensorboard_csv.yaml")


def build_loggers(conf: Any, run_dir: Path, history: list[dict[str, str]] | None = None) -> list:
    """One Lightning logger per entry of ``conf`` (``cfg.logger``), in config order; an entry set
    to null (``logger.mlflow=null``) is skipped. Runtime values fill the ``???`` keys."""
    from hydra.utils import instantiate

    if conf is None:
        conf = default_logger_config()
    runtime = {"save_dir": str(run_dir), "history": history or [],
               "run_name": Path(run_dir).name, "name": Path(run_dir).name}
    out = []
    for name, entry in conf.items():
        if entry is None or "_target_" not in entry:
            continue
        fill = {key: value for key, value in runtime.items()
                if key in entry.keys() and OmegaConf.is_missing(entry, key)}
        try:
            factory = instantiate(_without(entry, fill), _partial_=True, _convert_="all")
            out.append(factory(**fill))
        except Exception as err:
            if isinstance(root_cause(err), ImportError):  # an optional tracker not installed
                raise EffbenchError(_missing_package(str(name), err)) from err
            raise
    return out


def _without(entry: DictConfig, keys: dict[str, Any]) -> DictConfig:
    """A copy of ``entry`` without ``keys`` that still resolves interpolations against the whole
    config (``${seed}`` in a tag)."""
    out = copy.deepcopy(entry)
    out._set_parent(entry._get_parent())
    with open_dict(out):
        for key in keys:
            del out[key]
    return out


def _missing_package(name: str, err: BaseException) -> str:
    cause = root_cause(err)
    package = getattr(cause, "name", None)
    if not package:  # Lightning: "Requirement 'wandb>=0.12.10' not met. HINT: …"
        found = re.search(r"'([A-Za-z0-9_.\-]+?)(?:[<>=!~ ].*?)?'", str(cause))
        package = found.group(1) if found else name
    package = str(package).split(".")[0]
    return (f"logger={name} needs the Python package {package}, which is not installed; install "
            f"it into effbench's environment (.venv/bin/pip install {package}) or choose another "
            "logger=… option (tensorboard_csv is the default).")


def sqlite_url(path: str) -> str:
    """``sqlite:///<absolute path>`` for a local database file, with its folder created (SQLite
    creates the file, not the folder). For stores shared by many runs and launches: MLflow's
    tracking database, a persistent Optuna study."""
    file = Path(path).expanduser().resolve()
    file.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{file}"


def mlflow_sqlite_store(path: str, experiment_name: str,
                        artifact_location: str | None = None) -> str:
    """``sqlite:///<absolute path>`` of a local MLflow store whose tables and experiment exist.

    MLflow creates (and migrates) its tables, and Lightning's logger its experiment, on first
    use; jobs of a sweep that start together would race at both and fail ("table … already
    exists"). Here that first use happens once, under a file lock beside the database.
    """
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    url = sqlite_url(path)
    with FileLock(f"{url.removeprefix('sqlite:///')}.lock"):
        client = MlflowClient(url)
        found = client.get_experiment_by_name(experiment_name)
        if found is None:
            client.create_experiment(experiment_name, artifact_location=artifact_location)
    return url


def _is_run_record(logger: Any) -> bool:
    """TensorBoard and CSV loggers are the run dir's own records (resolved_config.yaml holds the
    config; TensorBoard gets the HParams at the end), not trackers."""
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    return isinstance(logger, (CSVLogger, TensorBoardLogger))


def log_config(loggers: list, cfg: Any) -> None:
    """Each tracker's run parameters as the run starts (rank 0; Lightning's loggers are no-ops
    elsewhere): the job's hyper-parameters, defaults included (effbench.compare.hparams), so even
    a run that fails has them. The values only the run knows follow in ``finish_loggers``."""
    trackers = [lg for lg in loggers if not _is_run_record(lg)]
    if not trackers:
        return
    from effbench.compare.hparams import config_hparams

    params = config_hparams(cfg)
    for tracker in trackers:
        tracker.log_hyperparams(params)


SUMMARY_ARTIFACT = "effbench-summary.json"  # summary.json as the trackers' artifact


def finish_loggers(loggers: list | None, summary_path: Path | str, cfg: Any = None) -> None:
    """After ``summary.json`` is written (rank 0): each tracker gets what TensorBoard's HParams tab
    gets — the effective hyper-parameters (``effective.lr``, precision, world size…) and the final
    figures as ``final/…`` (test and best-val metrics, time per phase, energy, CO₂, parameters,
    sizes, the technique's facts; effbench.compare.hparams) — and the summary as an artifact
    (``effbench-summary.json``); then its run is closed as finished or failed. Never raises: a
    completed run stays completed when a tracker cannot be reached."""
    trackers = [lg for lg in loggers or [] if not _is_run_record(lg)]
    if not trackers:
        return
    from effbench.compare.hparams import effective_hparams, final_metrics

    path = Path(summary_path)
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("trackers get no summary: cannot read %s (%s)", path, err)
        summary = {}
    ok = summary.get("status") == "completed"
    final = final_metrics(summary, cfg)
    params = effective_hparams(cfg, summary) if cfg is not None else {}
    for tracker in trackers:
        try:
            if params:
                tracker.log_hyperparams(params)
            if final:
                tracker.log_metrics(final, step=int(summary.get("epochs") or 0))
            if path.is_file():
                _attach(tracker, path)
            tracker.finalize("success" if ok else "failed")
            _close(tracker, ok)
        except Exception as err:  # noqa: BLE001 - see docstring
            log.warning("could not finish the %s run: %s", type(tracker).__name__, err)


def _attach(tracker: Any, path: Path) -> None:
    """The summary under ``SUMMARY_ARTIFACT``: a copy named ``summary.json`` inside outputs/ (the
    MLflow artifact store, a run dir's wandb/ folder) would count as a second run for
    ``effbench-compare``, which reads every ``summary.json`` below a path."""
    from pytorch_lightning.loggers import MLFlowLogger, WandbLogger

    if isinstance(tracker, MLFlowLogger):
        tracker.experiment.log_text(tracker.run_id, path.read_text(), SUMMARY_ARTIFACT)
    elif isinstance(tracker, WandbLogger):  # files in the run's folder are part of the run
        (Path(tracker.experiment.dir) / SUMMARY_ARTIFACT).write_text(path.read_text())


def _close(tracker: Any, ok: bool) -> None:
    """Lightning's WandbLogger leaves the wandb run open (its ``finalize`` only uploads
    checkpoints); an offline run is complete on disk only once finished."""
    from pytorch_lightning.loggers import WandbLogger

    if isinstance(tracker, WandbLogger) and tracker._experiment is not None:
        tracker.experiment.finish(exit_code=0 if ok else 1)
