"""What a run leaves behind when it is stopped before it ends.

- Killed outright (``kill -9``, the OOM killer, a node lost): the ``running`` summary written when
  the run starts stays, so ``effbench-compare`` lists the run as incomplete instead of losing it.
- Stopped by a signal (SIGTERM: what SLURM sends at pre-emption or the time limit; SIGINT:
  Ctrl-C): an ``interrupted`` summary naming the last checkpoint and the exact command that
  resumes from it, and the exit status of a process ended by that signal (143, 130).

Lightning has its own SIGTERM handling during ``fit``/``test`` (its ``_SignalConnector``): it
registers a handler that notes the signal, calls the handler that was there before (ours), and
stops at the next batch with ``SIGTERMException``. Here, inside a Lightning loop, SIGTERM is only
noted and Lightning stops cleanly; outside (set-up, between phases, saving) and for SIGINT the
run stops at once with :class:`Interrupted`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
log = logging.getLogger(__name__)


class Interrupted(BaseException):
    """The run was stopped by a signal. A ``BaseException`` like ``KeyboardInterrupt``: no
    ``except Exception`` on the way may swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGINT and SIGTERM handlers for the time of a run (main thread only; restored after)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        self._handler = self._handle  # one bound method, to recognise it later

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is not self._handler:
            return  # called by Lightning's handler: it stops at the next batch
        if first:  # a second Ctrl-C while the summary is written is ignored
            raise Interrupted(signum)

    def received(self, err: BaseException) -> int | None:
        """The signal that ``err`` comes from, if the run was stopped by one."""
        if isinstance(err, Interrupted):
            return err.signum
        if isinstance(err, KeyboardInterrupt):
            return int(signal.SIGINT)
        if isinstance(err, SystemExit) and self.signum is not None:
            return self.signum  # Lightning's SIGTERMException (a SystemExit)
        return None


def exit_code(signum: int) -> int:
    """The shell's status for a process ended by ``signum`` (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


def last_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """``<run>/checkpoints/last.ckpt`` and the epoch it ends (None if there is none yet)."""
    path = Path(run_dir) / "checkpoints" / "last.ckpt"
    if not path.is_file():
        return None
    try:
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        epoch = int(state["epoch"])
    except Exception:  # noqa: BLE001 - an unreadable file is not a checkpoint to resume from
        return None
    return {"path": str(path), "epoch": epoch}


def resume_command(overrides: list[str], run_dir: Path, checkpoint: str) -> str:
    """The command that continues this run in its own folder from ``checkpoint``."""
    kept = [o for o in overrides
            if o.lstrip("+~").split("=", 1)[0] not in ("resume", "hydra.run.dir")]
    return shlex.join(["effbench", *kept, f"hydra.run.dir={run_dir}", f"resume={checkpoint}"])


def interrupted_message(signum: int, run_dir: Path, overrides: list[str],
                        max_epochs: Any) -> tuple[str, dict[str, Any] | None, str | None]:
    """The summary's ``error`` sentence, the checkpoint, and the resume command."""
    name = signal.Signals(signum).name
    ckpt = last_checkpoint(run_dir)
    if ckpt is None:
        return (f"interrupted by {name} before the first checkpoint; run the same command "
                "again to start over.", None, None)
    command = resume_command(overrides, run_dir, ckpt["path"])
    of = f" of {max_epochs}" if max_epochs not in (None, -1) else ""
    return (f"interrupted by {name} after epoch {ckpt['epoch'] + 1}{of}; resume with: {command}",
            ckpt, command)


def slurm_job_id() -> str | None:
    """This SLURM job (``<array job>_<task>`` for an array task), as Lightning's SLURM plugin names
    it for ``scontrol requeue``; None outside SLURM."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = (f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array
           else os.environ.get("SLURM_JOB_ID"))
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


def requeue(job: str) -> str:
    """``scontrol requeue <job>`` (what Lightning's SLURM plugin runs): a sentence for the
    summary saying whether it worked."""
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                                timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return f"SLURM job {job} could not be requeued ({err})"
    if result.returncode != 0:
        return (f"SLURM job {job} could not be requeued (scontrol: "
                f"{(result.stderr or result.stdout).strip() or result.returncode})")
    return f"SLURM job {job} requeued: it starts again in this folder and resumes from there"


def interrupted_checkpoint(run_dir: Path) -> str | None:
    """The checkpoint an ``interrupted`` run in ``run_dir`` named (a requeued job resumes it)."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    ckpt = summary.get("checkpoint") if isinstance(summary, dict) else None
    if summary.get("status") != "interrupted" or not isinstance(ckpt, str):
        return None
    return ckpt if Path(ckpt).is_file() else None


def exit_now(code: Any) -> None:
    """Ends the process with ``code`` (a ``SystemExit`` code) without the interpreter's teardown.

    With torch's CUDA build, the teardown after a command's last line takes 1.3–2.3 s on a
    2-core machine (``python -c "import torch"`` spends 1.35 s after its last line; ``import
    effbench.run`` 2.3 s): unloading native libraries and freeing every module, most of a short
    command's tail. What an exit must still do is done first, in the interpreter's order: join
    the non-daemon threads and run the thread pools' shutdown hooks (concurrent.futures, joblib's
    loky), then the atexit callbacks (logging's flush and close, multiprocessing's clean-up),
    then flush the standard streams. (CPython's own functions for those steps: there is no
    public API for "exit, but skip freeing the modules".)
    """
    import atexit
    import sys

    if code is None:
        status = 0
    elif isinstance(code, int) and not isinstance(code, bool):
        status = code
    else:  # sys.exit("message"): printed, status 1, as the interpreter does
        print(code, file=sys.stderr)
        status = 1
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to flush into
            pass
    os._exit(status)
