"""Every failure a user can cause, through the real CLI: exit ≠ 0, one line naming the bad value
(and the fix), no traceback, and a completed run next to it left byte for byte as it was."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from tests.conftest import run_cli

QUICK = ["trainer.enable_progress_bar=false", "tracking.energy=false"]
TINY = ["dataset=synthetic", "dataset.num_train=64", "dataset.num_val=32", "dataset.num_test=32",
        "trainer.max_epochs=1", *QUICK]


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


@pytest.fixture(scope="module")
def answers(lab: dict[str, Path]) -> dict[str, Any]:
    """Every case's CLI run, two at a time (each is a separate process that mostly waits on its
    own imports; the suite's time matters), and the completed run's checksums before them."""
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
