"""Numbers a scientist can trust, through the real CLI: the sweeper's objective is a validation
metric, every trainer.* key takes effect or is refused, concurrent sweeps keep all their jobs, a
precomputed job's result does not depend on the cache, resume keeps the whole run's records, and a
sweep with failed jobs says so."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli
from tests.helpers.cli import start_cli
from tests.helpers.tiny import QUIET, tiny

QUICK = QUIET
TINY = tiny(epochs=1)


def summaries(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("summary.json"))]


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with (Path(run_dir) / "csv" / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def val_epochs(run_dir: Path) -> list[int]:
    """Epochs with a validation row in the CSV (one per epoch; no duplicates after a resume)."""
    epochs = [int(float(r["epoch"])) for r in csv_rows(run_dir) if r.get("val/loss")]
    assert len(epochs) == len(set(epochs)), epochs
    return sorted(epochs)


# -- 1. the objective ------------------------------------------------------------------------

def test_default_objective_is_validation(tmp_path: Path) -> None:
    for args in ([], ["experiment=precomputed_optuna"]):
        res = run_cli(["--cfg", "job", *args], cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        # null: the task's validation headline (val/acc, or val/auroc_macro when multilabel).
        assert yaml.safe_load(res.stdout)["objective"] == ("val/acc" if args else None)


def test_test_objective_needs_explicit_consent(tmp_path: Path) -> None:
    res = run_cli([*TINY, "objective=test/acc"], cwd=tmp_path)
    assert res.returncode != 0 and "objective=test/acc would tune on the test set" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_optuna_picks_the_best_validation_trial(tmp_path: Path) -> None:
    res = run_cli(["experiment=precomputed_optuna", "hydra.sweeper.n_trials=3",
                   "trainer.max_epochs=3", "dataset.max_samples=300", "tracking.energy=false",
                   "trainer.enable_progress_bar=false"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = summaries(tmp_path / "outputs")
    assert len(runs) == 3 and all(s["status"] == "completed" for s in runs)
    assert all(s["objective"]["metric"] == "val/acc" for s in runs)
    [results] = list((tmp_path / "outputs").rglob("optimization_results.yaml"))
    best = yaml.safe_load(results.read_text())
    best_val = max(s["objective"]["value"] for s in runs)
    assert best["best_value"] == pytest.approx(best_val)
    # The chosen value is the validation one, not a test figure that happens to differ.
    chosen = next(s for s in runs if s["objective"]["value"] == pytest.approx(best_val))
    assert chosen["objective"]["value"] == pytest.approx(chosen["best_val"]["val/acc"])


# -- 2. trainer settings take effect or are refused ---------------------------------------

def _steps(run_dir: str) -> int:
    return max(int(r["step"]) for r in csv_rows(Path(run_dir)))


def test_accumulate_grad_batches_halves_optimizer_steps(tmp_path: Path) -> None:
    base = [*TINY, "dataset.num_train=128", "dataset.batch_size=16"]
    res = run_cli(base, cwd=tmp_path / "a")
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_cli([*base, "+trainer.accumulate_grad_batches=2"], cwd=tmp_path / "b")
    assert res.returncode == 0, res.stderr[-2000:]
    [plain], [accum] = summaries(tmp_path / "a"), summaries(tmp_path / "b")
    assert _steps(accum["run_dir"]) * 2 == _steps(plain["run_dir"])  # CSV `step` column


def test_max_steps_reaches_lightning(tmp_path: Path) -> None:
    res = run_cli([*TINY, "trainer.max_epochs=5", "+trainer.max_steps=3",
                   "dataset.batch_size=16"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    [s] = summaries(tmp_path)
    assert _steps(s["run_dir"]) == 3 and s["epochs"] <= 1  # stopped inside the first epoch


@pytest.mark.parametrize(("arg", "needle"), [
    ("+trainer.acumulate_grad_batches=2", "did you mean trainer.accumulate_grad_batches"),
    ("+trainer.callbacks=null", "trainer.callbacks cannot be set"),
    ("+trainer.accumulate_grad_batches=2", "has no effect with strategy=precomputed"),
])
def test_trainer_key_refused_in_one_sentence(tmp_path: Path, arg: str, needle: str) -> None:
    extra = ["strategy=precomputed"] if "no effect" in needle else []
    res = run_cli([*TINY, *extra, arg], cwd=tmp_path)
    assert res.returncode != 0
    assert needle in res.stderr and "Traceback" not in res.stderr


def test_option_a_strategy_does_not_have_is_refused(tmp_path: Path) -> None:
    res = run_cli([*TINY, "strategy=prune", "+strategy.prune.frozen_stages=2"], cwd=tmp_path)
    assert res.returncode != 0
    [line] = [ln for ln in res.stderr.splitlines() if ln.startswith("effbench: error")]
    assert "strategy.prune.frozen_stages is not an option" in line
    assert "Traceback" not in res.stderr


# -- 3. two sweeps at the same instant ------------------------------------------------------

def test_two_sweeps_started_together_keep_all_jobs(tmp_path: Path) -> None:
    procs = [start_cli(["-m", *TINY, "seed=0,1"], tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:]
    sweeps = [d for d in (tmp_path / "outputs" / "multirun").iterdir() if d.is_dir()]
    assert len(sweeps) == 2
    runs = summaries(tmp_path / "outputs")
    assert len(runs) == 4 and all(s["status"] == "completed" for s in runs)


def test_completed_run_dir_is_never_overwritten(tmp_path: Path) -> None:
    res = run_cli(TINY, cwd=tmp_path)
    assert res.returncode == 0
    [s] = summaries(tmp_path)
    run_dir = Path(s["run_dir"])
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    res = run_cli([*TINY, "trainer.precision=bogus", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert res.returncode != 0 and "already holds a completed run" in res.stderr
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()
             and p.name != "cli.log"}  # Hydra's own log only ever appends
    assert after == {p: b for p, b in before.items() if p.name != "cli.log"}


# -- 4. precomputed: same config + seed → same numbers, cached or not ------------------------

def test_precomputed_cold_and_warm_cache_give_identical_metrics(tmp_path: Path) -> None:
    args = ["strategy=precomputed", *TINY, "trainer.max_epochs=3",
            "strategy.precomputed.dropout=0.5"]
    cache = {"EFFBENCH_CACHE_DIR": str(tmp_path / "cache")}
    cold = run_cli(args, cwd=tmp_path / "cold", env=cache)
    warm = run_cli(args, cwd=tmp_path / "warm", env=cache)
    assert cold.returncode == 0 and warm.returncode == 0, cold.stderr[-2000:]
    [c], [w] = summaries(tmp_path / "cold"), summaries(tmp_path / "warm")
    assert not c["strategy"]["precomputed"]["cache_hit"]
    assert w["strategy"]["precomputed"]["cache_hit"]
    assert c["metrics"] == w["metrics"] and c["best_val"] == w["best_val"]


# -- 5. the dynamic study's figure -----------------------------------------------------------

def test_best_validation_accuracy_over_epochs_is_recorded(tmp_path: Path) -> None:
    res = run_cli([*TINY, "trainer.max_epochs=3"], cwd=tmp_path)
    assert res.returncode == 0
    [s] = summaries(tmp_path)
    accs = [float(r["val/acc"]) for r in csv_rows(Path(s["run_dir"])) if r.get("val/acc")]
    assert len(accs) == 3 and s["metrics"]["val/acc_max"] == pytest.approx(max(accs))


# -- 8. resume keeps the whole run's history ----------------------------------------------

def test_resume_in_place_keeps_history_and_sums_times(tmp_path: Path) -> None:
    res = run_cli([*TINY, "trainer.max_epochs=2"], cwd=tmp_path)
    assert res.returncode == 0
    [first] = summaries(tmp_path)
    run_dir = Path(first["run_dir"])
    epochs_before = {r["epoch"] for r in csv_rows(run_dir)}
    res = run_cli([*TINY, "trainer.max_epochs=4", f"hydra.run.dir={run_dir}",
                   f"resume={run_dir}/checkpoints/last.ckpt"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    [s] = summaries(tmp_path)
    assert s["resumed_from"].endswith("last.ckpt") and s["epochs"] == 4
    epochs = val_epochs(run_dir)
    assert epochs == [0, 1, 2, 3] and epochs_before <= {r["epoch"] for r in csv_rows(run_dir)}
    assert s["time_s"]["train_before_resume"] > 0
    assert s["time_s"]["train"] > s["time_s"]["train_before_resume"]


def test_resume_into_new_folder_carries_history(tmp_path: Path) -> None:
    res = run_cli([*TINY, "trainer.max_epochs=2"], cwd=tmp_path / "a")
    assert res.returncode == 0
    [first] = summaries(tmp_path / "a")
    ckpt = Path(first["run_dir"]) / "checkpoints" / "last.ckpt"
    res = run_cli([*TINY, "trainer.max_epochs=3", f"resume={ckpt}"], cwd=tmp_path / "b")
    assert res.returncode == 0, res.stderr[-2000:]
    [s] = summaries(tmp_path / "b")
    assert val_epochs(Path(s["run_dir"])) == [0, 1, 2]
    assert list((Path(s["run_dir"]) / "tb").glob("events.out.tfevents.*"))


# -- 9, 10, 12. what the run records and reports ----------------------------------------------

def test_env_energy_mode_and_headline_are_recorded(tmp_path: Path) -> None:
    res = run_cli([*TINY[:-1], "strategy=freeze", "hardware.cpu_threads=1"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    [s] = summaries(tmp_path)
    env = s["env"]
    assert env["torch_threads"] == 1 and env["cpu_count"] >= 1
    assert env["cpu_model"] and len(env["load_avg_start"]) == 3 and "torch_interop_threads" in env
    assert set(s["energy"]["mode"]) == {"cpu", "gpu", "ram"}
    assert isinstance(s["energy"]["estimated"], bool)
    assert ("ESTIMATED" if s["energy"]["estimated"] else "measured") in res.stdout
    assert "freeze: trainable params" in res.stdout and s["headline"]


# -- 11. a sweep with failed jobs -------------------------------------------------------------

def test_sweep_with_a_failed_job_exits_nonzero_after_all_jobs(tmp_path: Path) -> None:
    # A value the job checks (Lightning's precisions); a schema value (optim.optimizer.lr=-1)
    # stops the sweep before any job starts (tests/test_bad_input.py).
    res = run_cli(["-m", *TINY, "trainer.precision=bogus,32-true"], cwd=tmp_path)
    assert res.returncode != 0
    runs = summaries(tmp_path / "outputs")
    assert sorted(s["status"] for s in runs) == ["completed", "failed"]
    [line] = [ln for ln in res.stderr.splitlines() if ln.startswith("effbench: failed job")]
    assert "trainer.precision='bogus'" in line


def test_dynamic_preset_uses_the_study_protocol(tmp_path: Path) -> None:
    """dynamic_cifar10: the official test set validates, so α = 25,000 is half of 50,000 and
    val/acc_max is the study's figure."""
    from tests.data.fakes import WRITERS

    root = WRITERS["cifar10"](tmp_path / "data" / "cifar10")
    res = run_cli(["experiment=dynamic_cifar10", f"dataset.root={root}", "hardware=cpu",
                   "backbone.weights=null", "trainer.max_epochs=2", "strategy.dynamic.alpha=0.5",
                   "dataset.batch_size=16", *QUICK], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    [s] = summaries(tmp_path / "outputs")
    sizes = s["data"]["sizes"]
    assert s["data"]["val_from"] == "test" and sizes["val"] == sizes["test"]
    assert s["strategy"]["dynamic"]["subset_size"] * 2 == sizes["train"]
    assert "val/acc_max" in s["metrics"]
