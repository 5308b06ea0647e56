"""A run folder from someone else never runs code, through the doors a user opens it by:
``effbench-eval RUN_DIR``, ``backbone.weights=``, ``resume=`` and ``effbench-compare``. Each
crafted input ends in one line (an error, or a warning and the file skipped), no traceback, and
the payload's marker file is never created."""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from tests.compare.conftest import fake_run
from tests.conftest import FAST, run_cli, run_job
from tests.data.fakes import write_beans
from tests.helpers.cli import run_compare, run_eval

QUIET = {**os.environ, "PYTHONWARNINGS": "ignore"}


class RunsCommand:
    """What an attacker puts in a pickle: unpickling it runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def payload(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Files that create ``tmp_path/PWNED`` when loaded unsafely: a ``torch.save`` file (what a
    checkpoint or weights file is) and a plain pickle (what ``np.load`` unpickles); the marker."""
    marker = tmp_path / "PWNED"
    torch.save(RunsCommand(marker), tmp_path / "payload.pt")
    (tmp_path / "payload.pkl").write_bytes(pickle.dumps(RunsCommand(marker)))
    return tmp_path / "payload.pt", tmp_path / "payload.pkl", marker


def effbench_eval(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_eval(list(args), cwd, timeout=300, env=QUIET)


def compare_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_compare(list(args), cwd, timeout=300, env=QUIET)


def eval_in_process(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """``effbench-eval``'s console entry point in this process (no start-up per case); an
    exception other than the exit would fail the test, as a traceback would."""
    from effbench.eval_cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, exited.value.code, out.out, out.err)


def one_line(res: subprocess.CompletedProcess, prog: str, *parts: str) -> str:
    """Exit != 0, nothing but one ``<prog>: error: …`` line on stderr, holding ``parts``."""
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), res.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One completed tiny run (synthetic data, small_cnn, one epoch), with its saved model."""
    base = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EFFBENCH_CACHE_DIR", str(base / "cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        summary = run_job(base, ["backbone=small_cnn", "trainer.max_epochs=1"])
    assert summary["status"] == "completed", summary["error"]
    return base / "run"


@pytest.fixture
def received(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished run, as a colleague would send it."""
    return Path(shutil.copytree(finished, tmp_path / "received"))


def craft_config(run_dir: Path, dataset: Any) -> None:
    config = yaml.safe_load((run_dir / "resolved_config.yaml").read_text())
    config["dataset"] = dataset
    (run_dir / "resolved_config.yaml").write_text(yaml.safe_dump(config))


def craft_manifest(run_dir: Path, change) -> None:
    path = run_dir / "model" / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


# -- 1. effbench-eval: the config names the dataset, nothing it names is called --------------------

def test_the_payloads_are_live(tmp_path: Path) -> None:
    """The crafted files below do run code when loaded the unsafe way (so refusing them means
    something): torch.load(weights_only=False) and np.load(allow_pickle=True) both run it."""
    pt, pkl, marker = payload(tmp_path)
    torch.load(pt, weights_only=False)
    assert marker.exists()
    marker.unlink()
    np.load(pkl, allow_pickle=True)
    assert marker.exists()


@pytest.mark.parametrize("style", ["torch.load", "np.load", "os.system", "nested", "yaml tag"])
def test_a_crafted_config_never_runs_code(received: Path, tmp_path: Path, style: str,
                                          capsys: pytest.CaptureFixture) -> None:
    pt, pkl, marker = payload(tmp_path)
    crafted = {
        # a dangerous callable reached through a module attribute of an effbench module
        "torch.load": ({"_target_": "effbench.data.base.torch.load", "f": str(pt),
                        "weights_only": False}, "dataset._target_='effbench.data.base.torch.load'"),
        "np.load": ({"_target_": "effbench.data.base.np.load", "file": str(pkl),
                     "allow_pickle": True}, "dataset._target_='effbench.data.base.np.load'"),
        "os.system": ({"_target_": "os.system", "command": f"touch {marker}"},
                      "dataset._target_='os.system'"),
        # a registered dataset, with an option that Hydra would have instantiated
        "nested": ({"_target_": "effbench.data.synthetic.SyntheticDataModule", "name": "x",
                    "root": {"_target_": "os.system", "command": f"touch {marker}"}},
                   "dataset.root={"),
    }
    if style == "yaml tag":  # a YAML tag that an unsafe loader turns into a call
        (received / "resolved_config.yaml").write_text(
            f"dataset: !!python/object/apply:os.system ['touch {marker}']\n")
        needle = "cannot be read as the run's config"
    else:
        node, needle = crafted[style]
        craft_config(received, node)
    # The user's door, a process of its own, for the case; the others in this process.
    res = (effbench_eval(str(received), cwd=tmp_path) if style == "torch.load"
           else eval_in_process(capsys, str(received)))
    line = one_line(res, "effbench-eval", needle)
    assert "resolved_config.yaml" in line
    assert not marker.exists()


def test_a_config_option_the_dataset_does_not_have_is_refused(
        received: Path, capsys: pytest.CaptureFixture) -> None:
    config = yaml.safe_load((received / "resolved_config.yaml").read_text())
    craft_config(received, {**config["dataset"], "_partial_": True})
    one_line(eval_in_process(capsys, str(received)), "effbench-eval",
             "dataset._partial_ is not an option of that dataset")


def test_the_untouched_copy_still_evaluates(received: Path, tmp_path: Path) -> None:
    res = effbench_eval(str(received), "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["metrics"] == pytest.approx({k: got["recorded"][k] for k in got["metrics"]},
                                           abs=1e-6)


# -- 3. a crafted manifest: one line, never a traceback --------------------------------------------

def _head_args(m: dict, **args: Any) -> None:
    m["head"]["args"].update(args)


MANIFESTS = {
    "no preprocessing": (lambda m: m.pop("preprocessing"), "has no preprocessing"),
    "no crop size": (lambda m: m["preprocessing"].pop("crop_size"),
                     "preprocessing has no crop_size"),
    "zero std": (lambda m: m["preprocessing"].update(std=[0, 0, 0]), "preprocessing.std="),
    "bogus head argument": (lambda m: _head_args(m, bogus=1), "has no argument 'bogus'"),
    "head argument of a wrong type": (lambda m: _head_args(m, in_features=[512]),
                                      "in_features=[512], not a number"),
    "head argument as text": (lambda m: _head_args(m, in_features="512"), "cannot be built"),
    "huge head": (lambda m: _head_args(m, in_features=1 << 20, out_features=1 << 20),
                  "more than the"),
    "head layer type": (lambda m: m["head"].update(type="os.system"),
                        "layer type 'os.system' is not one effbench saves"),
    "backbone target": (lambda m: m["backbone"].update(_target_="builtins.exec"),
                        "backbone._target_='builtins.exec' is not effbench.backbones"),
    "backbone option object": (lambda m: m["backbone"].update(
        name={"_target_": "os.system", "command": "true"}), "is not a plain option"),
    "class names": (lambda m: m.update(class_names="abc"), "class_names='abc' is not"),
    "file size": (lambda m: m["files"]["weights.safetensors"].update(bytes="big"),
                  "bytes='big' is not a size"),
}


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_a_crafted_manifest_is_one_line(received: Path, case: str,
                                        capsys: pytest.CaptureFixture) -> None:
    change, needle = MANIFESTS[case]
    craft_manifest(received, change)
    one_line(eval_in_process(capsys, str(received)), "effbench-eval", needle)


def test_a_manifest_that_is_a_device_is_not_read(received: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    manifest = received / "model" / "manifest.json"
    manifest.unlink()
    manifest.symlink_to("/dev/zero")
    one_line(eval_in_process(capsys, str(received)), "effbench-eval",
             "is not read: it is a character device")


# -- 2. backbone.weights= and resume=: pickles are loaded as tensors only --------------------------

@pytest.mark.parametrize("option", ["backbone.weights", "resume"])
def test_a_pickle_payload_as_weights_or_checkpoint_never_runs(tmp_path: Path,
                                                              option: str) -> None:
    pt, _, marker = payload(tmp_path)
    res = run_cli(["dataset=synthetic", "dataset.num_train=32", "dataset.num_val=16",
                   "dataset.num_test=16", "backbone=small_cnn", "trainer.max_epochs=1",
                   "tracking.energy=false", *FAST, f"{option}={pt}"], cwd=tmp_path)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("effbench: error")]
    assert len(errors) == 1 and str(pt) in errors[0], res.stderr[-2000:]
    assert not marker.exists()


# -- 4. a relative dataset.root is the run's, from any working directory ---------------------------

def test_a_relative_root_is_resolved_where_the_run_ran(tmp_path: Path) -> None:
    ran, elsewhere = tmp_path / "ran", tmp_path / "elsewhere"
    write_beans(ran / "data" / "beans")
    # Other images at the same relative path: evaluating them would be silently wrong.
    write_beans(elsewhere / "data" / "beans", {"train": 2, "validation": 1, "test": 3})
    res = run_cli(["dataset=imagefolder", "dataset.root=data/beans", "dataset.image_size=16",
                   "backbone=small_cnn", "trainer.max_epochs=1", "tracking.energy=false",
                   "hydra.run.dir=run", *FAST], cwd=ran)
    assert res.returncode == 0, res.stderr[-2000:]
    run_dir = ran / "run"
    res = effbench_eval(str(run_dir), "--json", cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["images"] == 6  # the run's 2 test images per class, not the 3 beside elsewhere
    assert got["metrics"] == pytest.approx({k: got["recorded"][k] for k in got["metrics"]},
                                           abs=1e-6)

    (ran / "data").rename(ran / "moved")
    one_line(effbench_eval(str(run_dir), cwd=elsewhere), "effbench-eval",
             f"dataset.root='{ran / 'data' / 'beans'}' does not exist", "--data-root DIR")
    res = effbench_eval(str(run_dir), "--data-root", str(ran / "moved" / "beans"), cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    one_line(effbench_eval(str(run_dir), "--data-root", "data/beans", cwd=elsewhere),
             "effbench-eval", "is not the one the run tested")
    # A manifest from before the run's folder was recorded: refused, not guessed.
    craft_manifest(run_dir, lambda m: m.pop("cwd"))
    one_line(effbench_eval(str(run_dir), cwd=elsewhere), "effbench-eval",
             "dataset.root='data/beans'", "is relative", "--data-root DIR")


# -- 5. effbench-compare on received folders -------------------------------------------------------

def raw_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_compare_csv_cells_never_start_a_formula(tmp_path: Path) -> None:
    formula = '=HYPERLINK("http://example.invalid/x","click")'
    for seed in (0, 1):
        fake_run(tmp_path / "sweep", f"ft_{seed}", "finetune", seed, 0.9, 10.0,
                 overrides=(f"strategy.note={formula}", "strategy.lr=-1", "strategy.tag=@SUM(A1)",
                            "@SUM(1+1)*cmd|' /C calc'!A0=1"))
        fake_run(tmp_path / "sweep", f"pc_{seed}", "precomputed", seed, 0.8, 5.0,
                 overrides=("strategy.note=+1+cmd", "strategy.lr=-0.5", "strategy.tag=-2+3"))
    out = tmp_path / "o"
    res = compare_cli(str(tmp_path / "sweep"), "--no-plots", "--out", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for name in ("compare.csv", "runs.csv"):
        rows = raw_csv(out / name)
        cells = [c for row in rows for c in row]
        assert not [c for c in cells if c[:1] in ("=", "+", "@", "\t", "\r")], name
        assert not [c for c in cells if c.startswith("-") and not _number(c)], name
        assert "'" + formula in cells and "'+1+cmd" in cells and "'-2+3" in cells, name
        assert "'@SUM(A1)" in cells and "-0.5" in cells, name  # numbers untouched
        assert "'@SUM(1+1)*cmd|' /C calc'!A0" in rows[0], name  # a column name too


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_compare_prints_no_escape_sequence_from_a_summary(tmp_path: Path) -> None:
    fake_run(tmp_path / "sweep", "ft", "finetune", 0, 0.9, 10.0,
             overrides=("strategy.note=\x1b[31mred\x1b[0m",))
    failed = fake_run(tmp_path / "sweep", "bad", "finetune", 1, 0.9, 10.0, status="failed")
    summary = json.loads((failed / "summary.json").read_text())
    summary["error"] = "boom\x1b[2J\x1b]0;owned\x07\r\nsecond line\u202e"
    (failed / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "o"
    res = compare_cli(str(tmp_path / "sweep"), "--no-plots", "--out", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    written = [res.stdout, res.stderr, *((out / n).read_text() for n in
                                         ("compare.md", "compare.csv", "runs.csv"))]
    for text in written:
        assert not [ch for ch in text if ch in "\x1b\x07\r\u202e"], text
    assert "boom\\x1b[2J" in res.stdout and "\\x1b[31mred" in res.stdout
    assert "second line" in res.stdout and "\nsecond line" not in res.stdout


def test_a_symlinked_compare_folder_is_refused(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    fake_run(sweep, "ft", "finetune", 0, 0.9, 10.0)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "compare.csv").write_text("precious")
    (sweep / "compare").symlink_to(victim)
    res = compare_cli(str(sweep), "--no-plots", cwd=tmp_path)
    one_line(res, "effbench-compare", f"{sweep / 'compare'} is a symbolic link", "--out DIR")
    assert [p.name for p in victim.iterdir()] == ["compare.csv"]
    assert (victim / "compare.csv").read_text() == "precious"


def test_a_symlinked_output_file_is_refused(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    fake_run(sweep, "ft", "finetune", 0, 0.9, 10.0)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (sweep / "compare").mkdir()
    (sweep / "compare" / "runs.csv").symlink_to(victim)
    res = compare_cli(str(sweep), "--no-plots", cwd=tmp_path)
    one_line(res, "effbench-compare", f"{sweep / 'compare' / 'runs.csv'} is a symbolic link")
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in (sweep / "compare").iterdir()) == ["runs.csv"]  # nothing else


def _summary_with(**patch: Any):
    def write(path: Path) -> None:
        summary = json.loads((path.parent.parent / "ft" / "summary.json").read_text())
        summary.update(patch)
        path.write_text(json.dumps(summary))
    return write


def _link_to_dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _huge(path: Path) -> None:
    with path.open("wb") as f:
        f.truncate(17 << 20)  # sparse: no disk used


SUMMARIES = {
    "link to /dev/zero": (_link_to_dev_zero, "it is a character device, not a regular file"),
    "named pipe": (_fifo, "it is a named pipe, not a regular file"),
    "huge file": (_huge, "bytes, more than the"),
    "invalid JSON": (lambda p: p.write_text("{not json"), "it is not valid JSON"),
    "deep nesting": (lambda p: p.write_text("[" * 200_000 + "]" * 200_000),
                     "nested too deeply"),
    "not UTF-8": (lambda p: p.write_bytes(b"\xff\xfe{}"), "it is not UTF-8 text"),
    "non-string overrides": (_summary_with(overrides=[1, {"a": 2}]),
                             "its overrides[0] is a JSON number, not a string"),
    "string metric": (_summary_with(metrics={"test/acc": "0.99"}),
                      "its metrics.test/acc is a JSON string, not a number"),
    "object choice": (_summary_with(choices={"strategy": {"x": 1}, "seed": 0}),
                      "its choices.strategy is a JSON object"),
    "list section": (_summary_with(model=[1, 2]), "its model is a JSON array, not an object"),
    "string time": (_summary_with(time_s={"train": "fast", "total": 1}),
                    "its time_s.train is a JSON string"),
    "numeric error": (_summary_with(status="failed", error=7), "its error is a JSON number"),
}


def test_crafted_summaries_are_skipped_with_one_warning_each(tmp_path: Path) -> None:
    """All the crafted files in one sweep beside one good run: each is named in one warning line
    with its reason, and the comparison goes on."""
    sweep = tmp_path / "sweep"
    fake_run(sweep, "ft", "finetune", 0, 0.9, 10.0)
    bad = {}
    for i, (case, (write, why)) in enumerate(SUMMARIES.items()):
        path = sweep / f"bad{i:02d}" / "summary.json"
        path.parent.mkdir()
        write(path)
        bad[str(path)] = (case, why)
    res = compare_cli(str(sweep), "--no-plots", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("effbench-compare: warn")]
    assert len(warnings) == len(SUMMARIES), res.stderr
    for line in warnings:
        path, _, reason = line.removeprefix("effbench-compare: warning: skipped ").partition(": ")
        case, why = bad.pop(path)
        assert why in reason, (case, line)
    assert not bad
    assert "1 runs (1 completed" in res.stdout
