"""The ``effbench`` command as a user types it: default run, introspection, DDP, and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import assert_predictions, run_cli
from tests.helpers import cli
from tests.helpers.tiny import QUIET, tiny

QUICK = QUIET
TINY = tiny(epochs=1)


def summaries(cwd: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((cwd / "outputs").rglob("summary.json"))]


def test_default_run_writes_everything(tmp_path: Path) -> None:
    res = run_cli(["trainer.max_epochs=1", *QUICK], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "completed" in res.stdout and "test acc" in res.stdout
    [summary] = summaries(tmp_path)
    assert summary["status"] == "completed"
    assert summary["choices"]["dataset"] == "digits"
    assert summary["choices"]["backbone"] == "small_cnn"
    run_dir = Path(summary["run_dir"])
    assert run_dir.parent == tmp_path / "outputs"
    # Run dirs say what ran: time + strategy + backbone + dataset.
    assert run_dir.name.endswith("_finetune_small_cnn_digits")
    assert (run_dir / "csv" / "metrics.csv").is_file()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert summary["env"]["git_commit"] is None or len(summary["env"]["git_commit"]) == 40


def test_help_and_cfg(tmp_path: Path) -> None:
    res = run_cli(["--help"], cwd=tmp_path)
    assert res.returncode == 0
    for group in ["dataset:", "backbone:", "strategy:", "hardware:"]:
        assert group in res.stdout
    assert "small_cnn" in res.stdout and "finetune" in res.stdout
    # Every option of every group, as the files hold them (the listing is built once for --help).
    conf = Path(__file__).resolve().parents[1] / "conf"
    for group in ["backbone", "dataset", "experiment", "hardware", "optim", "strategy"]:
        options = ", ".join(sorted(p.stem for p in (conf / group).glob("*.yaml")))
        assert f"{group}: {options}\n" in res.stdout, group
    assert "hydra/launcher" not in res.stdout  # Hydra's own groups stay under --hydra-help
    res = run_cli(["--cfg", "job", "optim.optimizer.lr=0.01"], cwd=tmp_path)
    assert res.returncode == 0 and "lr: 0.01" in res.stdout and "max_epochs" in res.stdout


def test_hydra_mode_set_on_the_command_line_decides_run_or_sweep(tmp_path: Path) -> None:
    """The CLI answers Hydra's ``get_mode`` from preflight's composition (one composition less
    per command): ``hydra.mode=MULTIRUN`` without ``-m`` is still a sweep, as Hydra makes it."""
    res = run_cli([*TINY, "hydra.mode=MULTIRUN", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "sweep" / "multirun.yaml").is_file()
    [summary] = [json.loads(p.read_text()) for p in (tmp_path / "sweep").rglob("summary.json")]
    assert summary["status"] == "completed" and Path(summary["run_dir"]).name.startswith("0_")
    assert not (tmp_path / "outputs").exists()


def test_ddp_two_processes_one_summary(tmp_path: Path) -> None:
    # 33 test images: the distributed sampler pads rank 1's share; the predictions are still the
    # split's 33 rows in its order (the labels are checked against it when they are written).
    res = run_cli(["hardware=cpu", "trainer.devices=2", "trainer.strategy=ddp", *TINY,
                   "dataset.num_test=33"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    [summary] = summaries(tmp_path)
    assert summary["status"] == "completed"
    assert summary["hardware"]["world_size"] == 2
    assert_predictions(Path(summary["run_dir"]), summary)


# Bad input through the CLI: tests/test_bad_input.py (every case, one place).


def test_failed_run_leaves_earlier_runs_untouched(tmp_path: Path) -> None:
    assert run_cli(TINY, cwd=tmp_path).returncode == 0
    [first] = list((tmp_path / "outputs").rglob("summary.json"))
    before = first.read_bytes()
    # A value the job checks (a schema value is refused before any folder exists)
    assert run_cli([*TINY, "trainer.precision=bogus"], cwd=tmp_path).returncode != 0
    assert first.read_bytes() == before
    statuses = sorted(s["status"] for s in summaries(tmp_path))
    assert statuses == ["completed", "failed"]


def test_the_zygote_that_forks_the_commands_holds_one_thread() -> None:
    """Forking copies one thread and every lock the others held: the zygote the commands are
    forked from (tests/helpers/cli.py) must have no other native thread (OpenBLAS servers,
    pyarrow's jemalloc background thread), or a forked command can hang."""
    if os.environ.get("EFFBENCH_TEST_SUBPROCESS") == "1" or not os.path.isdir("/proc/self/task"):
        pytest.skip("commands run as fresh interpreters here")
    assert cli._shared().threads == 1


def test_a_hung_forked_command_leaves_its_stacks_and_runs_again_fresh() -> None:
    """A command forked from the zygote that hangs is asked for its threads' stacks, killed and
    run once more as a fresh interpreter (the user's door), with a warning that shows where it
    hung (tests/helpers/sleeper.py hangs only when forked)."""
    if os.environ.get("EFFBENCH_TEST_SUBPROCESS") == "1":
        pytest.skip("commands run as fresh interpreters here")
    with pytest.warns(UserWarning, match="fresh interpreter") as caught:
        res = cli.run_command("tests.helpers.sleeper", [], cli.ROOT, timeout=5)
    assert res.returncode == 0 and res.stdout.strip() == "fresh interpreter"
    message = str(caught[0].message)
    assert "sleeper.py" in message and "in main" in message, message

