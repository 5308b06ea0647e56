"""Every failure a user can cause, through the real CLI: exit ≠ 0, one line naming the bad value
(and the fix), no traceback, and a completed run next to it left byte for byte as it was."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from tests.conftest import run_cli, run_job
from tests.data.fakes import write_chestxray14
from tests.helpers.tiny import QUIET, tiny

QUICK = QUIET
TINY = tiny(epochs=1)
# One xdist worker runs the whole module (`make test`: --dist loadgroup), so the module-scoped
# fixtures below run every case's CLI process once, not once per worker.
pytestmark = pytest.mark.xdist_group("bad_input")


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "cli.log"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A working folder with one completed run, and the bad files the cases point at."""
    root = tmp_path_factory.mktemp("lab")
    res = run_cli(TINY, cwd=root)
    assert res.returncode == 0, res.stderr[-2000:]
    [summary] = list((root / "outputs").rglob("summary.json"))
    files = root / "files"
    files.mkdir()
    (files / "garbage.ckpt").write_bytes(b"\x00not a checkpoint" * 10)
    torch.save({"state_dict": {"other.weight": torch.zeros(3, 3)}, "epoch": 0},
               files / "other_model.ckpt")
    torch.save({"conv.weight": torch.zeros(2, 2)}, files / "weights.pt")
    (files / "a_file").write_text("x")
    one_class = files / "one_class" / "cats"
    one_class.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(one_class / f"{i}.png")
    # ChestX-ray14 lists that share a patient (the study splits by patient)
    leak = write_chestxray14(files / "cxr_leak", patients=8, per_patient=2)
    first = (leak / "train_val_list.txt").read_text().split()[0]  # patient 1's first X-ray
    with open(leak / "test_list.txt", "a") as f:
        f.write(first.replace("_000.png", "_001.png") + "\n")
    cifar = files / "cifar10" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch"]:
        (cifar / name).write_bytes(b"\x80\x02}q\x00(U\x04data")  # a pickle cut short
    return {"root": root, "run": summary.parent, "files": files}


NO_GPU = not torch.cuda.is_available()
# (arguments, text the one error line must contain). FILES/RUN are replaced by the fixture's paths.
CASES: list[tuple[list[str], str]] = [
    # unknown names and keys
    (["strategy=nosuch"], "strategy=nosuch is not one of the strategy options"),
    (["backbone=resnet"], "closest: resnet50"),
    (["dataset=cifar"], "dataset=cifar is not one of the dataset options"),
    (["hardware=h100"], "hardware=h100 is not one of the hardware options"),
    (["strategy.nosuch=1"], "strategy.nosuch is not an option"),
    (["strategy.lr=1e-3"], "strategy.lr is not an option"),
    (["strategy=prune", "+strategy.prune.frozen_stages=2"],
     "strategy.prune.frozen_stages is not an option"),
    (["trainer.max_epochs=[1"], "cannot parse the command line"),
    (["seed=0,1"], "seed=0,1"),
    # numbers and choices
    (["optim.optimizer.lr=0"], "optim.optimizer.lr=0"),
    (["optim.optimizer.lr=-1"], "optim.optimizer.lr=-1"),
    (["optim.optimizer.weight_decay=-1"], "optim.optimizer.weight_decay=-1"),
    (["optim=rmsprop"], "optim=rmsprop is not one of the optim options"),
    # options torch's optimizer refuses when it is built (was a traceback from Lightning's set-up)
    (["optim.optimizer.foreach=true"], "`fused` and `foreach` cannot be `True` together"),
    (["+optim.optimizer.betas=[0.9,2.0]"], "Invalid beta parameter at index 1: 2.0"),
    (["+optim.optimizer.bogus=1"], "optim.optimizer.bogus is not an option of torch.optim.Adam"),
    (["optim.optimizer.fused=true", "trainer.precision=bf16-mixed",
      "trainer.gradient_clip_val=1.0"],
     "optim.optimizer.fused=true cannot run with trainer.gradient_clip_val=1"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0"),
    (["dataset.batch_size=0"], "dataset.batch_size=0"),
    (["dataset.image_size=4"], "dataset.image_size=4"),
    (["dataset=digits", "dataset.val_ratio=1.5"], "dataset.val_ratio=1.5"),
    (["dataset=digits", "dataset.val_ratio=0.6", "dataset.test_ratio=0.5"],
     "dataset.val_ratio + dataset.test_ratio = 1.1"),
    (["seed=abc"], "seed='abc'"),
    (["hardware.lr_scaling=quadratic"], "hardware.lr_scaling='quadratic'"),
    (["hardware.cpu_threads=0"], "hardware.cpu_threads=0"),
    (["hardware.data_on_device=maybe"], "hardware.data_on_device='maybe'"),
    (["hardware.compile=fast"],
     "invalid value hardware.compile='fast': use hardware.compile=false, true"),
    (["strategy=freeze", "strategy.freeze.unfreeze_lr=1e-4"], "strategy.freeze.unfreeze_lr=0.0001"),
    (["objective=test/acc"], "objective=test/acc would tune on the test set"),
    (["objective=accuracy"], "objective='accuracy'"),
    (["tracking.energy=true", "tracking.country=XXX"], "tracking.country='XXX'"),
    # the Trainer
    (["trainer.precision=bogus"], "trainer.precision='bogus'"),
    (["trainer.devices=0"], "trainer.devices=0"),
    (["trainer.devices=abc"], "trainer.devices='abc'"),
    (["trainer.devices=2"], "trainer.devices=2 on CPU needs trainer.strategy=ddp"),
    (["trainer.num_nodes=0"], "trainer.num_nodes=0"),
    (["+trainer.acumulate_grad_batches=2"], "trainer.accumulate_grad_batches"),
    (["+trainer.logger=null"], "trainer.logger cannot be set"),
    (["strategy=precomputed", "+trainer.accumulate_grad_batches=2"],
     "trainer.accumulate_grad_batches=2 has no effect with strategy=precomputed"),
    (["strategy=qat", "trainer.precision=16-mixed"], "trainer.precision=16-mixed cannot take"),
    (["strategy=qat", "hardware.compile=true"], "so hardware.compile cannot take effect"),
    # strategies
    (["strategy=prune", "strategy.prune.final_sparsity=1.5"], "strategy.prune.final_sparsity=1.5"),
    (["strategy=prune", "strategy.prune.scope=everything"], "strategy.prune.scope"),
    (["strategy=freeze", "strategy.freeze.frozen_stages=-1"], "strategy.freeze.frozen_stages=-1"),
    (["strategy=freeze", "strategy.freeze.frozen_stages=2",
      "strategy.freeze.unfreeze_at_epochs=[50]"],
     "strategy.freeze.unfreeze_at_epochs=[50] can never take effect"),
    (["strategy=dynamic", "strategy.dynamic.beta=2"], "strategy.dynamic.beta=2"),
    (["strategy=dynamic", "strategy.dynamic.variant=nosuch"], "strategy.dynamic.variant='nosuch'"),
    (["strategy=precomputed", "strategy.precomputed.eval_on=nowhere"],
     "strategy.precomputed.eval_on='nowhere'"),
    (["strategy=precomputed", "strategy.precomputed.bn_max_passes=0"],
     "strategy.precomputed.bn_max_passes=0"),
    (["strategy=precomputed", "strategy.precomputed.head_threads=0"],
     "strategy.precomputed.head_threads=0"),
    (["strategy=qat", "strategy.qat.qat_scope=nope"], "strategy.qat.qat_scope='nope'"),
    # stacks that cannot run
    (["strategy=[precomputed,prune]"], "strategy=[precomputed,prune] cannot run together"),
    (["strategy=[qat,precomputed]"], "strategy=[precomputed,qat] cannot run together"),
    (["strategy=[freeze,qat]", "strategy.freeze.unfreeze_at_epochs=[1]", "trainer.max_epochs=2"],
     "gradual unfreezing"),
    # data
    (["dataset.num_classes=1"], "dataset.num_classes=1"),
    (["dataset.num_train=0"], "dataset.num_train=0"),
    (["dataset=imagefolder", "dataset.root=FILES/one_class"], "at least 2"),
    (["dataset=cifar10", "dataset.root=/nonexistent/cifar"], "cifar-10-batches-py"),
    (["dataset=cifar10", "dataset.root=FILES/cifar10"], "data_batch_1"),
    (["dataset=cifar10", "dataset.root=FILES/cifar10", "dataset.val_from=validation"],
     "dataset.val_from='validation'"),
    # files from outside
    (["backbone=cifar_cnn14", "backbone.weights=FILES/weights.pt"], "weights.pt"),
    (["resume=/nonexistent/last.ckpt"], "resume=/nonexistent/last.ckpt does not exist"),
    (["resume=FILES/garbage.ckpt"], "is not a readable Lightning checkpoint"),
    (["resume=FILES/other_model.ckpt"], "is a checkpoint of another model"),
    # the typed schema (effbench/schema.py): types, ranges, required keys, before anything runs
    (["optim.optimizer.lr=inf"], "optim.optimizer.lr=inf"),
    (["optim.optimizer.lr=nan"], "optim.optimizer.lr=nan"),
    (["~optim.optimizer.lr"], "optim.optimizer.lr is required but missing"),
    (["optim.optimizer.lr="], "optim.optimizer.lr=''"),
    (["optim.early_stopping.patience=-1"], "optim.early_stopping.patience=-1"),
    (["optim.scheduler.factor=2"], "optim.scheduler.factor=2"),
    (["dataset.max_samples=-1"], "dataset.max_samples=-1"),
    (["hardware.num_workers=-1"], "hardware.num_workers=-1"),
    (["seed=-1"], "seed=-1"),
    (["dataset=digits", "dataset.root="], "dataset.root=''"),
    (["dataset=cifar10", "~dataset.root"], "dataset.root is required but missing"),
    (["objective=val/nosuch"], "objective='val/nosuch'"),
    (["strategy=[prune,prune]"], "strategy=[prune,prune] names prune twice"),
    (["dataset.num_classes=100"], "dataset.num_classes=100 is more than"),
    (["dataset=digits", "dataset.max_samples=5"], "the train split holds 5 images for 10 classes"),
    (["dataset=chestxray14", "dataset.root=FILES/cxr_leak"],
     "appear in both train_val_list.txt and test_list.txt"),
    # Hydra's own errors, for sweeps and --cfg too: one line, and no job of a sweep starts
    (["-m", "optim.optimizer.lr=0.1,abc"], "the sweep's job optim.optimizer.lr=abc"),
    (["-m", "trainer.max_epochs=[1"], "cannot parse the command line"),
    (["-m", "dataset=digits,nosuch"], "dataset=nosuch is not one of the dataset options"),
    (["--cfg", "job", "dataset=nosuch"], "dataset=nosuch is not one of the dataset options"),
    (["--cfg", "job", "strategy.nosuch=1"], "strategy.nosuch is not an option"),
    (["-m", "seed=0,1", "--cfg", "hydra"], "--cfg hydra shows the config of one job"),
    # a diverged run: recorded as diverged (test_diverged_run_is_recorded_in_strict_json)
    (["optim.optimizer.lr=1e30", "hydra.run.dir=FILES/diverged"],
     "training diverged at epoch 0: val/loss is"),
    # stacks that cannot work: a pruning schedule that cannot end, pruning only frozen layers
    (["strategy=[freeze,prune]", "strategy.freeze.frozen_stages=1"],
     "strategy.prune.end=7 is past trainer.max_epochs=1"),
    (["strategy=[freeze,prune]", "strategy.prune.end=1"], "finds no trainable layer to prune"),
    # where the records go
    (["hydra.run.dir=FILES/a_file/run"], "which is a file"),
    (["hydra.run.dir=RUN"], "already holds a completed run"),
]
if NO_GPU:
    CASES.append((["hardware=t4"], "hardware=t4 needs 1 CUDA GPU"))


def _case_args(lab: dict[str, Path], args: list[str]) -> list[str]:
    args = [a.replace("FILES", str(lab["files"])).replace("RUN", str(lab["run"])) for a in args]
    base = TINY
    if any(a.startswith("dataset=") for a in args):  # another dataset: drop synthetic's keys
        base = [a for a in TINY if not a.startswith("dataset")]
    if any(a.startswith("tracking.energy") for a in args):
        base = [a for a in base if not a.startswith("tracking.energy")]
    return [*base, *args]


def _once_per_session(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Fail when a second xdist worker starts the cases too: --dist loadgroup stopped grouping
    (it did under pytest 9.2, pytest-xdist#1386) and every case would run twice."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    mark = tmp_path_factory.getbasetemp().parent / "bad_input_cases_started"
    try:
        mark.open("x").close()
    except FileExistsError:
        pytest.fail("tests/test_bad_input.py's cases started on a second xdist worker: "
                    "--dist loadgroup no longer groups them (see pyproject.toml's pytest pin)")


@pytest.fixture(scope="module")
def answers(lab: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every case's CLI run, two at a time (each is a separate process that mostly waits on its
    own imports; the suite's time matters), and the completed run's checksums before them."""
    _once_per_session(tmp_path_factory)
    before = _checksums(lab["run"])
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = {_id(args): pool.submit(run_cli, _case_args(lab, args), lab["root"], 300)
                for args, _ in CASES}
        return {"before": before, **{k: f.result() for k, f in runs.items()}}


def _id(args: list[str]) -> str:
    return " ".join(args)


@pytest.mark.parametrize(("args", "needle"), CASES, ids=[_id(a) for a, _ in CASES])
def test_bad_input(lab: dict[str, Path], answers: dict[str, Any], args: list[str],
                   needle: str) -> None:
    res = answers[_id(args)]
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("effbench: error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    assert needle in errors[0], errors[0]
    assert "Traceback" not in res.stderr + res.stdout
    # The completed run beside them is byte for byte as it was, after every case has run.
    assert _checksums(lab["run"]) == answers["before"]
    assert json.loads((lab["run"] / "summary.json").read_text())["status"] == "completed"


def test_there_are_forty_bad_inputs() -> None:
    assert len(CASES) >= 40


def _strict(text: str) -> dict:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_diverged_run_is_recorded_in_strict_json(lab: dict[str, Path],
                                                 answers: dict[str, Any]) -> None:
    """lr=1e30: the loss is NaN after the first steps; the run says so (status diverged, the
    epoch), exits non-zero (test_bad_input above) and its summary is strict JSON."""
    summary = _strict((lab["files"] / "diverged" / "summary.json").read_text())
    # Validation ends the epoch before its training-end hook: val/loss is the first seen.
    assert summary["status"] == "diverged" and summary["diverged"] == {
        "epoch": 0, "metric": "val/loss"}
    assert "training diverged at epoch 0" in summary["error"]


def test_summary_json_is_strict(tmp_path: Path) -> None:
    from effbench.summary import write_json_atomic

    write_json_atomic(tmp_path / "s.json", {"metrics": {"val/loss": float("nan"),
                                                        "x": [1.0, float("inf")]}, "ok": 1.5})
    summary = _strict((tmp_path / "s.json").read_text())
    assert summary["metrics"] == {"val/loss": None, "x": [1.0, None]} and summary["ok"] == 1.5
    assert summary["non_finite"]["paths"] == ["metrics.val/loss", "metrics.x[1]"]


def test_freeze_prune_prunes_only_what_trains(tmp_path: Path) -> None:
    """[freeze,prune]: frozen layers can never make up for their zeros, so only the layers that
    train are pruned, and the summary counts the frozen ones left dense."""
    summary = run_job(tmp_path, ["strategy=[freeze,prune]", "backbone=cifar_cnn14",
                                 "strategy.freeze.frozen_stages=1",
                                 "strategy.prune.start=0", "strategy.prune.end=1",
                                 "strategy.prune.frequency=1", "trainer.max_epochs=1"])
    assert summary["status"] == "completed", summary["error"]
    prune = summary["strategy"]["prune"]
    frozen = summary["strategy"]["freeze"]["stages_frozen"]
    assert frozen == 2 and prune["frozen_layers_skipped"] == 7  # the first 3 + 4 convs
    pruned = list(prune["sparsity_per_layer"])
    assert pruned and not [n for n in pruned if n.startswith(("backbone.stages.0.",
                                                               "backbone.stages.1."))]
    assert prune["schedule_completed"] and prune["sparsity"] > 0.4
