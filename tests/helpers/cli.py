"""The commands as a user runs them: ``effbench``, ``effbench-compare``, ``effbench-eval``.

Each call is a process of its own with the command's ``main()``, its argv, cwd, environment, exit
code and stderr, as the console script is. By default it is forked from a zygote that imported
effbench once (tests/helpers/zygote_server.py): the door is the same, minus the ~5 s of torch and
Lightning imports that every real subprocess pays (most of the suite's time before). A
``PYTHONPATH`` in ``env`` (a fault injector's ``sitecustomize``) is honoured as an interpreter's
start-up would (the zygote's child puts it on ``sys.path`` and runs its ``sitecustomize``).
:func:`start_cli` starts a command in the background for the signal and kill tests, with
``subprocess.Popen``'s ``pid`` (its own process group), ``poll``, ``wait`` and ``communicate``. Set
``EFFBENCH_TEST_SUBPROCESS=1`` to run every command as a fresh interpreter instead; a few tests
always do (tests/test_startup.py, one signal and one kill test, DDP, torchrun, submitit's jobs).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

SERVER = Path(__file__).with_name("zygote_server.py")
ZYGOTE_ENV = {"OPENBLAS_NUM_THREADS": "1", "JE_ARROW_MALLOC_CONF": "background_thread:false"}
ROOT = SERVER.parents[2]


class _Zygote:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
            # No native thread in the zygote when it forks (a fork copies one thread and every
            # lock the others held): its imports otherwise start numpy's and scipy's OpenBLAS
            # thread servers and pyarrow's jemalloc background thread (pandas, via sklearn). A
            # command forked from it hung, rarely, before printing anything (2 of 3 suites
            # here). Its children keep the single-threaded BLAS they inherit; their own
            # subprocesses get the test's environment.
            **ZYGOTE_ENV}
        self.proc = subprocess.Popen([sys.executable, str(SERVER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, bufsize=1, cwd=ROOT, env=env)
        first = json.loads(self.proc.stdout.readline() or "{}")
        if not first.get("ready"):
            raise RuntimeError("the test zygote did not start; run with EFFBENCH_TEST_SUBPROCESS=1")
        self.threads = int(first.get("threads", 1))  # native threads when it forks
        self.lock = threading.Lock()
        self.waiting: dict[str, Future] = {}  # id -> its exit code
        self.started: dict[str, Future] = {}  # id -> its pid, once forked
        self.ids = itertools.count()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            table, value = (self.waiting, msg["rc"]) if "rc" in msg else (self.started,
                                                                             msg.get("pid"))
            with self.lock:
                future = table.pop(msg["id"], None)
            if future is not None:
                future.set_result(value)
        with self.lock:  # the zygote is gone: every command still waiting fails now
            waiting = [*self.waiting.values(), *self.started.values()]
            self.waiting, self.started = {}, {}
        for future in waiting:
            future.set_exception(RuntimeError("the test zygote ended while a command ran"))

    def _send(self, obj: dict) -> None:
        with self.lock:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()

    def start(self, module: str, argv: list[str], cwd: Path, env: dict[str, str],
              umask: int | None = None, fsize: int | None = None) -> Started:
        """Fork the command (under ``umask`` and a file-size limit of ``fsize`` bytes if given)
        and return once it runs."""
        ident = str(next(self.ids))
        done: Future = Future()
        forked: Future = Future()
        folder = Path(tempfile.mkdtemp(prefix="effbench-cmd-"))
        out, err = folder / "stdout", folder / "stderr"
        with self.lock:
            self.waiting[ident], self.started[ident] = done, forked
        self._send({"id": ident, "module": module, "argv": argv, "cwd": str(cwd),
                    "env": env, "stdout": str(out), "stderr": str(err), "umask": umask,
                    "fsize": fsize})
        return Started([module, *argv], forked.result(timeout=120), done, folder,
                       lambda action: self._send({action: ident}))

    def run(self, module: str, argv: list[str], cwd: Path, env: dict[str, str],
            timeout: float, umask: int | None) -> subprocess.CompletedProcess:
        cmd = self.start(module, argv, cwd, env, umask)
        try:
            out, err = cmd.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            cmd.ask("dump")  # its threads' stacks, into its stderr
            time.sleep(2)
            cmd.ask("kill")
            out, err = cmd.communicate(timeout=60)
            raise _Hung([module, *argv], timeout, out[-3000:], err[-3000:]) from None
        return subprocess.CompletedProcess([module, *argv], cmd.returncode, out, err)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Started:
    """A command forked from the zygote, running in the background: what the signal and kill
    tests hold, as they would hold a ``subprocess.Popen`` (``pid`` leads its own process group,
    so ``os.killpg(pid, …)`` reaches it and what it started)."""

    def __init__(self, args: list[str], pid: int, done: Future, folder: Path,
                 ask: Callable[[str], None]) -> None:
        self.args, self.pid, self._done, self._folder, self.ask = args, pid, done, folder, ask

    @property
    def returncode(self) -> int | None:
        return self._done.result() if self._done.done() else None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        try:
            return self._done.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise subprocess.TimeoutExpired(self.args, timeout) from None

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the end; its stdout and stderr (the files are removed then)."""
        self.wait(timeout)
        texts = _text(self._folder / "stdout"), _text(self._folder / "stderr")
        shutil.rmtree(self._folder, ignore_errors=True)
        return texts


class _Hung(subprocess.TimeoutExpired):
    """A command past its time, with what it had printed (where it hung) in the message."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nits stderr ended with:\n{self.stderr}"


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


_zygote: _Zygote | None = None
_start_lock = threading.Lock()


def _shared() -> _Zygote:
    global _zygote
    with _start_lock:
        if _zygote is None or _zygote.proc.poll() is not None:
            _zygote = _Zygote()
            atexit.register(_zygote.close)
        return _zygote


def run_command(module: str, args: list[str], cwd: Path, timeout: float = 600,
                env: dict | None = None, umask: int | None = None) -> subprocess.CompletedProcess:
    """``python -m <module> args`` in ``cwd`` (a user's command, under ``umask`` if given),
    captured as text."""
    full_env = {**os.environ, **(env or {})}
    Path(cwd).mkdir(parents=True, exist_ok=True)
    if os.environ.get("EFFBENCH_TEST_SUBPROCESS") == "1":
        return _fresh(module, args, cwd, timeout, full_env, umask)
    try:
        return _shared().run(module, [str(a) for a in args], Path(cwd), full_env, timeout,
                             umask)
    except _Hung as hung:
        # A command forked from the zygote hung, rarely, before printing anything (1 of ~1,000
        # commands of a suite, 2026-12-03; not reproduced). The zygote is the suite's shortcut,
        # not the user's door: the command runs once more as a fresh interpreter, so a hang of
        # the fork alone does not fail a test and a hang of the command still does; the
        # warning carries the hung child's stacks.
        warnings.warn(f"a command forked from the test zygote hung; ran it again as a fresh "
                      f"interpreter:\n{hung}", stacklevel=2)
        return _fresh(module, args, cwd, timeout, full_env, umask)


def _fresh(module: str, args: list[str], cwd: Path, timeout: float, env: dict[str, str],
           umask: int | None) -> subprocess.CompletedProcess:
    """The command as a fresh interpreter, ``python -m <module> args``."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env,
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))


def start_cli(args: list[str], cwd: Path, env: dict | None = None, fresh: bool = False,
              fsize: int | None = None) -> Started | subprocess.Popen:
    """``effbench args`` started in ``cwd`` in the background, in a process group of its own (a
    terminal's job, a SLURM step), with its output captured; ``fresh``: as a fresh interpreter
    (``subprocess.Popen``), the real console script's start-up and all. ``fsize``: the kernel
    refuses its writes past that many bytes (``RLIMIT_FSIZE``)."""
    Path(cwd).mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    args = [str(a) for a in args]
    if fresh or os.environ.get("EFFBENCH_TEST_SUBPROCESS") == "1":
        limit = None if fsize is None else (lambda: resource.setrlimit(
            resource.RLIMIT_FSIZE, (fsize, fsize)))
        return subprocess.Popen([sys.executable, "-m", "effbench.cli", *args], cwd=cwd,
                                env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True, preexec_fn=limit)
    return _shared().start("effbench.cli", args, Path(cwd), full_env, fsize=fsize)


def run_cli(args: list[str], cwd: Path, timeout: float = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """``effbench args`` in ``cwd`` (so outputs/ lands there)."""
    return run_command("effbench.cli", args, cwd, timeout, env)


def run_compare(args: list[str], cwd: Path, timeout: float = 600,
                env: dict | None = None, umask: int | None = None) -> subprocess.CompletedProcess:
    """``effbench-compare args`` in ``cwd``."""
    return run_command("effbench.compare.cli", args, cwd, timeout, env, umask)


def run_eval(args: list[str], cwd: Path, timeout: float = 600,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """``effbench-eval args`` in ``cwd``."""
    return run_command("effbench.eval_cli", args, cwd, timeout, env)


def one_error_line(res: subprocess.CompletedProcess) -> str:
    """A refused command as the user must see it: exit != 0, exactly one ``effbench: error:``
    line and no traceback; returns that line."""
    assert res.returncode != 0, res.stdout[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("effbench: error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr + res.stdout
    return errors[0]
