"""Fault injection for tests/test_faults.py and tests/test_signals.py, loaded by the effbench
process under test when this folder is on its PYTHONPATH (Python imports ``sitecustomize`` at
start-up). Nothing here is part of effbench.

- ``EFFBENCH_FAULT_PAUSE_TEST=<file>``: when the best checkpoint is about to be tested, create
  ``<file>`` and wait, so the test can kill or signal the job *during testing*.
- ``EFFBENCH_FAULT_FAIL_SEED=<seed>``: the training of the job with that seed fails (an
  unexpected error), so one job of a sweep fails and the others do not.
- ``EFFBENCH_FAULT_WRITE=<errno name>``: every ``torch.save`` to a file (checkpoints) fails with
  that error (``EROFS``: a folder gone read-only, ``ENOSPC``: a full disk) after writing part of
  the file, as a real failed write does.
- ``EFFBENCH_FAULT_PAUSE_RUNNING=<file>``: right after the ``running`` summary is written, create
  ``<file>`` and wait, so the test can signal the job the moment its summary appears.
- ``EFFBENCH_FAULT_PAUSE_EXTRACT=<file>``: right after ``precomputed`` stores the features of its
  first split, create ``<file>`` and wait, so the test can kill the job *during feature
  extraction* (the other splits not yet extracted).
"""

from __future__ import annotations

import os
import sys


def _pause_before_test(marker: str) -> None:
    import time

    import pytorch_lightning as pl

    real = pl.Trainer.test

    def test(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        open(marker, "w").close()
        time.sleep(120)
        return real(self, *args, **kwargs)

    pl.Trainer.test = test


def _fail_seed(seed: int) -> None:
    import pytorch_lightning as pl
    import torch

    real = pl.Trainer.fit

    def fit(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if torch.initial_seed() == seed:  # run() seeds with cfg.seed before fitting
            raise RuntimeError(f"injected failure of the job with seed {seed}")
        return real(self, *args, **kwargs)

    pl.Trainer.fit = fit


def _failing_writes(name: str) -> None:
    import errno

    import torch

    real = torch.save
    code = getattr(errno, name)

    def save(obj, f, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as out:
                out.write(b"partial")
            raise OSError(code, os.strerror(code), str(f))
        return real(obj, f, *args, **kwargs)

    torch.save = save


def _pause_after_running(marker: str) -> None:
    import time

    import effbench.summary

    real = effbench.summary.write_json_atomic

    def write_json_atomic(path, data):  # noqa: ANN001, ANN202
        real(path, data)
        if data.get("status") == "running":
            open(marker, "w").close()
            time.sleep(120)

    # effbench.run binds the name when it is imported, after this in a fresh interpreter; in a
    # test zygote's child (tests/helpers/zygote_server.py) it is imported already: rebind it
    # wherever it was bound.
    effbench.summary.write_json_atomic = write_json_atomic
    for module in list(sys.modules.values()):
        if getattr(module, "write_json_atomic", None) is real:
            module.write_json_atomic = write_json_atomic


def _pause_after_first_split(marker: str) -> None:
    import time

    from effbench.techniques.precomputed.cache import FeatureCache

    real = FeatureCache.store

    def store(self, key, payload):  # noqa: ANN001, ANN202
        path = real(self, key, payload)
        if "features" in payload:  # a split's features, not the BN statistics
            open(marker, "w").close()
            time.sleep(120)
        return path

    FeatureCache.store = store


if os.environ.get("EFFBENCH_FAULT_PAUSE_TEST"):
    _pause_before_test(os.environ["EFFBENCH_FAULT_PAUSE_TEST"])
if os.environ.get("EFFBENCH_FAULT_FAIL_SEED"):
    _fail_seed(int(os.environ["EFFBENCH_FAULT_FAIL_SEED"]))
if os.environ.get("EFFBENCH_FAULT_WRITE"):
    _failing_writes(os.environ["EFFBENCH_FAULT_WRITE"])
if os.environ.get("EFFBENCH_FAULT_PAUSE_RUNNING"):
    _pause_after_running(os.environ["EFFBENCH_FAULT_PAUSE_RUNNING"])
if os.environ.get("EFFBENCH_FAULT_PAUSE_EXTRACT"):
    _pause_after_first_split(os.environ["EFFBENCH_FAULT_PAUSE_EXTRACT"])
