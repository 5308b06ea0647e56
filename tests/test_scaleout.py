"""Beyond one machine: trackers (logger=), submitit sweeps (local and a stand-in SLURM), a shared
persistent Optuna study, a quiet console, and two DDP "nodes" on one machine. CPU only, offline."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from effbench.loggers import SUMMARY_ARTIFACT
from tests.conftest import compose_cfg, run_cli
from tests.helpers.tiny import QUIET, tiny

QUICK = QUIET
TINY = tiny(epochs=1)
OPTUNA = ["experiment=precomputed_optuna", "trainer.max_epochs=3", "dataset.max_samples=300",
          *QUICK]


def summaries(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("summary.json"))]


# -- 1. trackers -----------------------------------------------------------------------------------

def test_logger_group_defaults_to_the_run_records_and_trackers_add_to_them() -> None:
    assert set(compose_cfg().logger) == {"tensorboard", "csv"}
    assert list(compose_cfg(["logger=mlflow"]).logger) == ["tensorboard", "csv", "mlflow"]
    assert list(compose_cfg(["logger=wandb"]).logger) == ["tensorboard", "csv", "wandb"]
    assert compose_cfg(["logger=wandb"]).logger.wandb.offline is True


def test_default_loggers_are_tensorboard_and_history_csv_in_the_run_dir(tmp_path: Path) -> None:
    from pytorch_lightning.loggers import TensorBoardLogger

    from effbench.context import HistoryCSVLogger
    from effbench.loggers import build_loggers

    cfg = compose_cfg()
    rows = [{"epoch": "0", "step": "3", "val/acc": "0.5"}]
    tb, csv = build_loggers(cfg.logger, tmp_path, rows)
    assert isinstance(tb, TensorBoardLogger) and isinstance(csv, HistoryCSVLogger)
    assert Path(tb.log_dir) == tmp_path / "tb" and Path(csv.log_dir) == tmp_path / "csv"
    assert csv.experiment.metrics[0]["val/acc"] == "0.5"  # the resumed run's rows come first
    # A config without the group (built by hand) gets the same two.
    assert [type(lg) for lg in build_loggers(None, tmp_path)] == [TensorBoardLogger,
                                                                  HistoryCSVLogger]


def _mlflow_client(cwd: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")


def test_mlflow_run_has_params_per_epoch_metrics_and_summary(tmp_path: Path) -> None:
    args = [*TINY, "trainer.max_epochs=2", "logger=mlflow", "logger.mlflow.experiment_name=scale"]
    res = run_cli(args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    [summary] = summaries(tmp_path / "outputs")
    client = _mlflow_client(tmp_path)
    experiment = client.get_experiment_by_name("scale")
    [run] = client.search_runs([experiment.experiment_id])
    params = run.data.params
    assert params["seed"] == "0" and params["dataset.name"] == "synthetic"
    assert params["trainer.max_epochs"] == "2" and params["dataset.num_train"] == "64"
    assert run.info.run_name == Path(summary["run_dir"]).name
    val_acc = client.get_metric_history(run.info.run_id, "val/acc")
    assert len(val_acc) == 2 and len({m.step for m in val_acc}) == 2  # one value per epoch
    assert max(m.value for m in val_acc) == pytest.approx(summary["metrics"]["val/acc_max"])
    assert "test/acc" in run.data.metrics
    # summary.json as an artifact: once run.py calls effbench.loggers.finish_loggers.
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    if artifacts:
        assert artifacts == [SUMMARY_ARTIFACT]
        local = client.download_artifacts(run.info.run_id, SUMMARY_ARTIFACT, str(tmp_path / "dl"))
        assert json.loads(Path(local).read_text()) == summary
        assert client.get_run(run.info.run_id).info.status == "FINISHED"
        assert "final/test/acc" in client.get_run(run.info.run_id).data.metrics


@pytest.mark.parametrize("status", ["completed", "failed"])
def test_finish_loggers_attaches_the_summary_and_closes_the_run(tmp_path: Path,
                                                                status: str) -> None:
    from mlflow.tracking import MlflowClient
    from pytorch_lightning.loggers import CSVLogger, MLFlowLogger

    from effbench.loggers import finish_loggers, sqlite_url

    # A store of its own per case (conftest._forget_mlflow_stores says why the path matters).
    uri = sqlite_url(str(tmp_path / status / "store" / "mlflow.db"))  # its folder is created
    tracker = MLFlowLogger(experiment_name="t", tracking_uri=uri,
                           artifact_location=str(tmp_path / "artifacts"))
    tracker.log_metrics({"val/acc": 0.5}, step=0)
    summary = tmp_path / "run" / "summary.json"
    summary.parent.mkdir()
    summary.write_text(json.dumps({"status": status, "epochs": 3,
                                   "metrics": {"test/acc": 0.75, "val/acc_max": 0.8}}))
    finish_loggers([CSVLogger(tmp_path / "run"), tracker], summary)
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == ("FINISHED" if status == "completed" else "FAILED")
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == [SUMMARY_ARTIFACT]
    local = client.download_artifacts(tracker.run_id, SUMMARY_ARTIFACT, str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text())["status"] == status
    assert run.data.metrics["final/test/acc"] == pytest.approx(0.75)
    finish_loggers(None, summary)  # nothing built (a run that failed early): nothing to do


def test_finish_loggers_never_fails_a_run(tmp_path: Path) -> None:
    from effbench.loggers import finish_loggers

    class Broken:
        def log_metrics(self, *a, **k):
            raise ConnectionError("tracking server down")

    finish_loggers([Broken()], tmp_path / "missing.json")  # warns, does not raise


def test_wandb_missing_is_one_sentence(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed: the missing-package message cannot be shown")
    res = run_cli([*TINY, "logger=wandb"], cwd=tmp_path)
    assert res.returncode != 0
    assert "logger=wandb needs the Python package wandb" in res.stderr
    assert "pip install wandb" in res.stderr and "Traceback" not in res.stderr


# -- 4. a quiet console ----------------------------------------------------------------------------

def test_quiet_third_party_silences_chatter_not_warnings(caplog: pytest.LogCaptureFixture) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.utilities import rank_zero_warn

    from effbench.loggers import NOISY_LOGGERS, quiet_third_party

    def trainer_log() -> str:
        caplog.clear()
        pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False)
        return caplog.text

    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    try:
        caplog.set_level(logging.INFO)
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
        assert "GPU available" in trainer_log()  # what a plain run prints for every Trainer
        quiet_third_party()
        text = trainer_log()
        assert "GPU available" not in text and "TPU available" not in text
        with pytest.warns(UserWarning, match="a real warning"):
            rank_zero_warn("a real warning")  # Lightning's warnings are untouched
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


# -- 2. submitit sweeps ----------------------------------------------------------------------------

# A submitit sweep of two jobs (run dirs, submitit's files beside them, one MLflow store shared
# by jobs starting together): tests/test_signals.py's
# test_failed_job_of_a_submitit_sweep_fails_as_a_job, whose sweep also has a failing job (one
# sweep of fresh job processes, not two).


# A stand-in for SLURM's commands: `sbatch` runs each task of the array here with SLURM's
# environment, `srun` runs the one task, `sacct` reports the states. The job script, the resource
# flags and the job's SLURM environment are submitit's and Lightning's own.
FAKE_SBATCH = r"""#!/bin/bash
script="${@: -1}"; state="$FAKE_SLURM_DIR"; mkdir -p "$state"; cp "$script" "$state/sbatch.sh"
id=$(( $(ls "$state" | grep -c '^job_') + 4242 )); touch "$state/job_$id"
set -- $(sed -n 's/^#SBATCH --array=\([0-9]*\)-\([0-9]*\).*/\1 \2/p' "$script") 0 0
for i in $(seq "$1" "$2"); do
  echo "${id}_$i|RUNNING" > "$state/task_${id}_$i"
  ( env SLURM_JOB_ID="$id$i" SLURM_ARRAY_JOB_ID="$id" SLURM_ARRAY_TASK_ID="$i" \
      SLURM_JOB_NAME=effbench SLURM_NTASKS=1 SLURM_JOB_NUM_NODES=1 SLURM_NODEID=0 \
      SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_JOB_NODELIST=localhost SLURM_NODELIST=localhost \
      bash "$script" && s=COMPLETED || s=FAILED; echo "${id}_$i|$s" > "$state/task_${id}_$i" \
  ) >/dev/null 2>&1 &
done
echo "Submitted batch job $id"
"""
FAKE_SRUN = r"""#!/bin/bash
out=/dev/null; err=/dev/null
sub() { local p="$1"; p="${p//%A/$SLURM_ARRAY_JOB_ID}"; p="${p//%a/$SLURM_ARRAY_TASK_ID}";
        p="${p//%t/0}"; echo "${p//%j/$SLURM_JOB_ID}"; }
while [[ "$1" == --* ]]; do
  case "$1" in --output) out=$(sub "$2"); shift 2;; --error) err=$(sub "$2"); shift 2;;
               *) shift;; esac
done
exec "$@" >>"$out" 2>>"$err"
"""
FAKE_SACCT = r"""#!/bin/bash
echo "JobID|State|NodeList"
for f in "$FAKE_SLURM_DIR"/task_*; do [ -f "$f" ] && echo "$(cat "$f")|localhost"; done
"""


def _fake_slurm(tmp_path: Path) -> dict[str, str]:
    if shutil.which("bash") is None:
        pytest.skip("the SLURM stand-in needs bash")
    bin_dir = tmp_path / "fake_slurm_bin"
    bin_dir.mkdir()
    for name, text in {"sbatch": FAKE_SBATCH, "srun": FAKE_SRUN, "sacct": FAKE_SACCT,
                       "scancel": "#!/bin/bash\nexit 0\n"}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**clean, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "FAKE_SLURM_DIR": str(tmp_path / "slurm_state")}


# The slurm preset's array and resources (#SBATCH flags, submitit's job script, the jobs' runs):
# tests/test_signals.py::test_failed_job_of_a_slurm_sweep_is_failed_for_slurm, whose sweep of
# the same preset also has a failing job (one array of fresh job processes, not two).


# -- 3. a shared, persistent Optuna study ----------------------------------------------------------

def _study(cwd: Path):
    import optuna

    db = cwd / "outputs" / "optuna" / "precomputed_head.db"
    return optuna.load_study(study_name="precomputed_head", storage=f"sqlite:///{db}")


@pytest.mark.slow
def test_optuna_study_resumes_when_the_command_is_run_again(tmp_path: Path) -> None:
    args = [*OPTUNA, "hydra.sweeper.n_trials=2"]
    first = run_cli(args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(_study(tmp_path).trials) == 2
    again = run_cli(args, cwd=tmp_path)  # the same command, e.g. after a kill
    assert again.returncode == 0, again.stderr[-3000:]
    trials = _study(tmp_path).trials
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    assert [t.number for t in trials] == [0, 1, 2, 3]
    # the second launch proposes new points, not a replay of the first launch's
    assert trials[2].params != trials[0].params and trials[3].params != trials[1].params
    assert len(summaries(tmp_path / "outputs")) == 4


# -- 5. two DDP nodes on one machine ---------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _needs_gloo() -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available here")


def _two_nodes(cmds: list[list[str]], envs: list[dict[str, str]], cwd: Path,
               grace_s: float = 30.0, limit_s: float = 400.0) -> list[tuple[int | None, str]]:
    """Starts one process per node; once one has exited, the other gets ``grace_s`` to finish
    (a node left alone waits for its peer forever) before it is stopped."""
    procs = []
    for i, (cmd, env) in enumerate(zip(cmds, envs)):
        log = (cwd / f"node{i}.log").open("w")
        procs.append((subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log))
    start, first_exit = time.monotonic(), None
    while any(p.poll() is None for p, _ in procs):
        now = time.monotonic()
        if first_exit is None and any(p.poll() is not None for p, _ in procs):
            first_exit = now
        if now - start > limit_s or (first_exit is not None and now - first_exit > grace_s):
            for p, _ in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            break
        time.sleep(0.5)
    out = []
    for i, (p, log) in enumerate(procs):
        log.close()
        out.append((p.returncode, (cwd / f"node{i}.log").read_text()))
    return out


DDP = [*TINY, "hardware=cpu", "trainer.num_nodes=2", "trainer.devices=1", "trainer.strategy=ddp",
       "hydra.run.dir=outputs/two_nodes"]


def _assert_one_run_of_world_size_two(cwd: Path, results: list) -> None:
    logs = "\n".join(f"--- node {i} (exit {rc})\n{text[-2500:]}" for i, (rc, text) in
                     enumerate(results))
    found = list((cwd / "outputs").rglob("summary.json"))
    assert len(found) == 1, logs
    summary = json.loads(found[0].read_text())
    assert summary["status"] == "completed", logs
    assert summary["hardware"]["world_size"] == 2 and summary["hardware"]["num_nodes"] == 2
    assert all(rc == 0 for rc, _ in results), logs
    assert sum("completed in" in text for _, text in results) == 1  # one report, from rank 0


@pytest.mark.slow
def test_two_nodes_with_torchrun(tmp_path: Path) -> None:
    """The launcher for multi-node runs outside SLURM: torchrun gives every process its RANK."""
    _needs_gloo()
    port = _free_port()
    cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={r}",
             "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
             "-m", "effbench.cli", *DDP] for r in (0, 1)]
    results = _two_nodes(cmds, [dict(os.environ)] * 2, tmp_path)
    _assert_one_run_of_world_size_two(tmp_path, results)


@pytest.mark.slow
def test_two_nodes_with_lightning_env_vars(tmp_path: Path) -> None:
    _needs_gloo()
    port = _free_port()
    cmd = [sys.executable, "-m", "effbench.cli", *DDP]
    envs = [{**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "NODE_RANK": str(r), "WORLD_SIZE": "2"} for r in (0, 1)]
    for env in envs:
        for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
            env.pop(key, None)
    results = _two_nodes([cmd, cmd], envs, tmp_path, grace_s=20.0)
    _assert_one_run_of_world_size_two(tmp_path, results)
