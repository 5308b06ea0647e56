"""The trackers a lab runs, end to end: the environment resolves (`pip check`), MLflow's tracking
server starts on effbench's SQLAlchemy and serves a run that effbench logged to it (read back
through its REST API: effective hyper-parameters, the HParams tab's figures, per-epoch curves),
codecarbon stays quiet, and Optuna sweeps (Hydra's sweep syntax on current Optuna) persist,
resume, record each trial's run folder and end in one line when every trial failed.
CPU only; the server listens on 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.helpers.tiny import tiny

TINY = tiny(epochs=2, quiet=False)
BIN = Path(sys.executable).parent


def test_pip_check_is_clean() -> None:
    """Every installed package's requirements hold (hydra-optuna-sweeper's optuna<3 pin, and with
    it SQLAlchemy<2, is gone)."""
    res = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


# -- MLflow's server and its REST API ----------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, path: str, body: dict | None = None, query: dict | None = None) -> dict:
    url = f"{base}/api/2.0/mlflow/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=30) as res:
        return json.loads(res.read())


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """`mlflow ui` as the docs start it (a SQLite store in outputs/), on 127.0.0.1:<free port>."""
    port = _free_port()
    (tmp_path / "outputs").mkdir()
    log = (tmp_path / "mlflow-ui.log").open("w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "ui", "--backend-store-uri",
                             f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "mlflow-ui.log").read_text()[-3000:]
            try:
                _api(base, "experiments/search", {"max_results": 1})
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                assert time.monotonic() < deadline, "mlflow ui did not answer in 180 s"
                time.sleep(1)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker, started above
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_mlflow_server_serves_what_effbench_logged(tmp_path: Path, mlflow_server: str) -> None:
    """One run logged to the server (energy measured): read back over REST it has the effective
    hyper-parameters (defaults included, no paths), the figures TensorBoard's HParams tab gets,
    a value per epoch for the curves, the summary artifact, and FINISHED; codecarbon printed
    nothing."""
    res = run_cli([*TINY, "logger=mlflow", "logger.mlflow.experiment_name=trk",
                   f"logger.mlflow.tracking_uri={mlflow_server}", "tracking.energy=true"],
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "codecarbon" not in res.stderr.lower(), res.stderr  # item: codecarbon's own lines
    [summary_path] = (tmp_path / "outputs").rglob("summary.json")
    summary = json.loads(summary_path.read_text())

    experiment = _api(mlflow_server, "experiments/get-by-name", query={"experiment_name": "trk"})
    found = _api(mlflow_server, "runs/search",
                 {"experiment_ids": [experiment["experiment"]["experiment_id"]]})
    [run] = found["runs"]
    assert run["info"]["status"] == "FINISHED"
    assert run["info"]["run_name"] == summary_path.parent.name
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    # Effective hyper-parameters, overridden or not.
    assert params["optim.optimizer.lr"] == "0.001" and params["optim.optimizer.class"] == "Adam"
    assert params["optim.optimizer.weight_decay"] == "0.0"
    assert params["dataset.batch_size"] == "64" and params["trainer.max_epochs"] == "2"
    assert params["effective.lr"] == "0.001" and params["effective.precision"] == "32-true"
    assert params["effective.world_size"] == "1" and params["strategy"] == "finetune"
    assert not {"cache_dir", "data_dir", "dataset.root", "tracking.energy"} & set(params)
    assert not [k for k in params if k.startswith(("logger.", "hydra."))]
    # What TensorBoard's HParams tab gets: time per phase, energy, CO2, parameters, size.
    assert metrics["final/test/acc"] == pytest.approx(summary["metrics"]["test/acc"])
    assert metrics["final/time_s/train"] == pytest.approx(summary["time_s"]["train"])
    assert metrics["final/kwh"] == pytest.approx(summary["energy"]["kwh"])
    assert metrics["final/co2_kg"] == pytest.approx(summary["energy"]["co2_kg"])
    assert metrics["final/params_trainable"] == summary["model"]["params_trainable"]
    assert metrics["final/model/size_bytes"] == summary["model"]["size_bytes"]
    # The per-epoch curves.
    history = _api(mlflow_server, "metrics/get-history",
                   query={"run_id": run["info"]["run_id"], "metric_key": "val/acc"})["metrics"]
    assert len({m["step"] for m in history}) == 2
    # The summary as the run's artifact.
    artifacts = _api(mlflow_server, "artifacts/list", query={"run_id": run["info"]["run_id"]})
    assert [f["path"] for f in artifacts.get("files", [])] == ["effbench-summary.json"]


def test_trackers_get_the_techniques_facts_and_late_steps_show_progress(tmp_path: Path) -> None:
    """[prune,qat]: each technique's own facts (sparsity, int8 sizes, latency) reach the tracker
    as ``final/strategy/<name>/…`` and its settings go as parameters, not metrics; the steps after
    training (int8 conversion, int8 evaluation, latency timing) show progress bars as training
    does (trainer.enable_progress_bar)."""
    import yaml
    from mlflow.tracking import MlflowClient

    res = run_cli([*TINY, "trainer.max_epochs=1", "strategy=[prune,qat]",
                   "strategy.prune.start=0", "strategy.prune.end=1",
                   "strategy.qat.finetune_epochs=1", "strategy.qat.latency_min_time=0.2",
                   "logger=mlflow", "tracking.energy=false", "trainer.enable_progress_bar=true"],
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    for label in ("int8 conversion", "int8 evaluation", "latency fp32", "latency int8"):
        assert label in res.stderr, label
    [summary_path] = (tmp_path / "outputs").rglob("summary.json")
    summary = json.loads(summary_path.read_text())
    config = yaml.safe_load((summary_path.parent / "resolved_config.yaml").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("effbench").experiment_id])
    metrics, params = run.data.metrics, run.data.params
    for name in ("prune", "qat"):
        settings = set(config["strategy"][name])
        own = {k for k, v in summary["strategy"][name].items()
               if isinstance(v, (int, float)) and k not in settings}
        assert {f"final/strategy/{name}/{k}" for k in own} <= set(metrics)
        keys = {k.split("/")[3] for k in metrics if k.startswith(f"final/strategy/{name}/")}
        assert keys and not settings & keys  # its settings are parameters
    assert metrics["final/strategy/qat/latency_ms/int8"] == pytest.approx(
        summary["strategy"]["qat"]["latency_ms"]["int8"])
    assert params["strategy.prune.final_sparsity"] == "0.5" and params["strategy"] == "prune+qat"


# -- Optuna sweeps ---------------------------------------------------------------------------

def _sweep(tmp_path: Path, study: str, extra: list[str]) -> subprocess.CompletedProcess:
    return run_cli(["-m", "hydra/sweeper=optuna", "hydra.sweeper.direction=maximize",
                    f"hydra.sweeper.study_name={study}", "hydra.sweeper.n_jobs=1",
                    f"hydra.sweeper.storage=sqlite:///{tmp_path / 'study.db'}",
                    "tracking.energy=false", *extra], cwd=tmp_path)


def test_sweep_syntax_becomes_optuna_distributions() -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from hydra_plugins.effbench_optuna_sweeper._impl import grid_of, search_space

    space, fixed = search_space(["a=choice(16, 32)", "b=interval(0.0, 0.5)",
                                 "c=tag(log, interval(1e-4, 1e-2))", "d=range(1, 7, 2)",
                                 "e=tag(log, int(interval(1, 64)))", "f=3"])
    assert space["a"] == CategoricalDistribution([16, 32])
    assert space["b"] == FloatDistribution(0.0, 0.5)
    assert space["c"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert space["d"] == IntDistribution(1, 5, step=2)  # Hydra's range: the stop is excluded
    assert space["e"] == IntDistribution(1, 64, log=True)
    assert fixed == {"f": "3"}
    assert grid_of(space["d"]) == [1, 3, 5] and grid_of(space["a"]) == [16, 32]


def test_optuna_study_persists_resumes_and_records_run_dirs(tmp_path: Path) -> None:
    """The same command twice: 2 + 2 trials in one stored study, each naming its run folder."""
    import optuna

    args = [*TINY, "trainer.max_epochs=1", "hydra.sweeper.n_trials=2",
            "optim.optimizer.lr=tag(log, interval(1e-4, 1e-2))",
            "dataset.batch_size=choice(16, 32)"]
    for launch in (1, 2):
        res = _sweep(tmp_path, "resume", args)
        assert res.returncode == 0, res.stderr[-3000:]
        study = optuna.load_study(study_name="resume", storage=f"sqlite:///{tmp_path / 'study.db'}")
        assert len(study.trials) == 2 * launch
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    for trial in study.trials:
        run_dir = Path(trial.user_attrs["run_dir"])
        summary = json.loads((run_dir / "summary.json").read_text())
        assert trial.user_attrs["status"] == summary["status"] == "completed"
        assert trial.value == pytest.approx(summary["objective"]["value"])
        assert f"optim.optimizer.lr={trial.params['optim.optimizer.lr']}" in summary["overrides"]
    assert len({t.user_attrs["run_dir"] for t in study.trials}) == 4


def test_optuna_study_whose_every_trial_failed_ends_in_one_line(tmp_path: Path) -> None:
    # Names only timm can refuse, at run time (no up-front check can know them).
    res = _sweep(tmp_path, "bad", [*TINY, "hydra.sweeper.n_trials=2", "backbone=timm",
                                   "backbone.weights=null",
                                   "backbone.name=choice(no_such_net_a, no_such_net_b)"])
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("effbench:")]
    # Each job's own sentence, then the study's one line, then the sweep's report of the jobs.
    [study_line] = [ln for ln in lines if "Optuna study" in ln]
    assert "none of the 2 trials of the Optuna study 'bad' completed" in study_line
    assert "2 job(s) of the sweep" in lines[-1]
    import optuna

    study = optuna.load_study(study_name="bad", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    assert all(t.user_attrs["status"] == "failed" and "no_such_net" in t.user_attrs["error"]
               for t in study.trials)
