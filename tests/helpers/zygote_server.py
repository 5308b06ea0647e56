"""The zygote: a process that imports effbench's commands once and forks a fresh child per
command, which runs the command's ``main()`` exactly as the console script would (its own process,
argv, cwd, environment, stdout/stderr and exit code) without paying torch + Lightning's imports
again. Protocol on stdin/stdout, one JSON object per line:

  request  {"id", "module", "argv", "cwd", "env", "stdout", "stderr"}  -> {"id", "pid"}
           {"dump": id}                   (SIGUSR2: that child writes its threads' stacks)
           {"kill": id}                                                 (SIGKILL that child)
  reply when a child ends                                               -> {"id", "rc"}

This parent never computes anything (no torch op, no thread pool), so each fork starts clean.
"""

from __future__ import annotations

import atexit
import faulthandler
import importlib
import importlib.util
import json
import os
import resource
import select
import signal
import sys
import threading
import traceback

PRELOAD = ("effbench.cli", "effbench.run", "effbench.compare.cli", "effbench.eval_cli")
# What the commands import later, on first use: every child imported it again (0.3–0.4 s of a
# tiny run's 0.85 s in its child, 2026-12-04). Imported here once: every effbench module
# (techniques, datasets, backbones, compare), the loggers' and trackers' libraries (then also
# torchao, timm, torchvision's transforms through effbench's own), and Hydra's plugin scan. None
# of it starts a thread (tests/test_cli.py checks that the zygote holds one when it forks).
WARM = ("tensorboard.summary", "safetensors.torch", "tabulate", "mlflow", "sklearn.neighbors",
        "sklearn.linear_model", "sklearn.pipeline", "sklearn.preprocessing")


def _child(req: dict) -> None:
    """In the forked child: become the command, then leave with its exit code."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own group: a kill reaches what it started
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        # Where a command hung, the client asks for its stacks before killing it (SIGUSR2:
        # neither effbench nor Lightning uses it; SLURM's requeue signal is SIGUSR1).
        faulthandler.register(signal.SIGUSR2, file=sys.stderr, all_threads=True)
        os.environ.clear()
        os.environ.update(req["env"])
        os.chdir(req["cwd"])
        if req.get("umask") is not None:
            os.umask(req["umask"])
        if req.get("fsize") is not None:  # the kernel refuses writes past it (EFBIG)
            resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
        _start_up(req["env"].get("PYTHONPATH", ""))
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import __main__

        # A relaunch (Lightning's DDP) re-runs ``python -m <module> argv`` as the real command.
        __main__.__spec__ = importlib.util.find_spec(req["module"])
        sys.argv = [req["module"], *req["argv"]]
        module = importlib.import_module(req["module"])
        try:
            module.main()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if not isinstance(stop.code, int | None):
                print(stop.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - as the interpreter would: traceback, exit 1
            traceback.print_exc()
            code = 1
        # What the interpreter does at exit, in its order: join the threads and run the thread
        # pools' shutdown hooks (concurrent.futures, joblib's loky), then the atexit handlers
        # (logging's flush, codecarbon's, …).
        threading._shutdown()
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _start_up(pythonpath: str) -> None:
    """What an interpreter's start-up does with a ``PYTHONPATH`` the zygote did not start with:
    its folders go on ``sys.path``, and a ``sitecustomize`` among them runs (a test's fault
    injector, tests/faults/)."""
    new = [p for p in pythonpath.split(os.pathsep) if p and p not in sys.path]
    sys.path[:0] = new
    for folder in new:
        path = os.path.join(folder, "sitecustomize.py")
        if os.path.isfile(path):
            spec = importlib.util.spec_from_file_location("sitecustomize", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules["sitecustomize"] = module
            spec.loader.exec_module(module)
            return


def _kill(pid: int) -> None:
    """SIGKILL a child's group, or the child alone where it has left its group (or is gone): a
    kill must never end the zygote, which every later command of the worker needs."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
            return
        except OSError:
            continue


def _dump(pid: int) -> None:
    """Ask a child for its threads' stacks (its faulthandler, into its stderr)."""
    try:
        os.kill(pid, signal.SIGUSR2)
    except OSError:
        pass


# A request naming a running child by its id: what to do to it.
ACTIONS = {"kill": _kill, "dump": _dump}


def _reply(obj: dict) -> None:
    sys.__stdout__.write(json.dumps(obj) + "\n")
    sys.__stdout__.flush()


def _warm() -> None:
    """Import what the commands would import on first use (WARM); a module that cannot be
    imported here is left to the command, which then reports it as it would have."""
    import pkgutil

    import effbench

    names = [info.name for info in pkgutil.walk_packages(effbench.__path__, "effbench.")]
    for name in [*names, *WARM]:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001, S112 - the command meets it again, in its own process
            continue
    from hydra.core.plugins import Plugins

    Plugins.instance()  # Hydra scans hydra_plugins once per process


def serve() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    _warm()
    # What the client's environment is for (tests/helpers/cli.py ZYGOTE_ENV): one thread here.
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    _reply({"ready": True, "threads": threads})
    children: dict[int, str] = {}
    stdin = sys.__stdin__
    while True:
        ready, _, _ = select.select([stdin], [], [], 0.05)
        if ready:
            line = stdin.readline()
            if not line:  # the tests ended
                for pid in children:
                    _kill(pid)
                return
            req = json.loads(line)
            action = next((a for a in ACTIONS if a in req), None)
            if action is not None:
                pid = next((p for p, i in children.items() if i == req[action]), None)
                if pid is not None:
                    ACTIONS[action](pid)
                continue
            pid = os.fork()
            if pid == 0:
                _child(req)
            children[pid] = req["id"]
            _reply({"id": req["id"], "pid": pid})
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            _reply({"id": children.pop(pid), "rc": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    sys.path.pop(0)  # this folder (its cli.py) must not shadow anything
    serve()
