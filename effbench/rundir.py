"""Owning a run dir, checking a checkpoint to resume from, and writing files atomically.

A job writes only into a run dir it owns: not one that holds another completed run (unless it
resumes that run) and not one that a live job holds (an OS file lock, released by the kernel if the
job is killed). Files are written to a temp file in the same folder, fsynced, renamed over the
target, and the folder is fsynced, so a reader (or a crash) never sees half a file.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from effbench.errors import EffbenchError

LOCK_NAME = ".effbench.lock"
# A write refused by the disk or the folder, not by a bug: one sentence, no traceback.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
WRITE_FIX = ("free space there, or choose a writable folder with hydra.run.dir=… "
             "(hydra.sweep.dir=… for a sweep)")


def write_failure(err: BaseException) -> str | None:
    """One sentence for a full disk, a file-size limit or a read-only folder (else None), found
    in ``err`` or what it was raised from."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in WRITE_ERRNOS:
            where = f" {cause.filename}" if cause.filename else ""
            return f"cannot write{where} ({cause.strerror or cause}); {WRITE_FIX}."
        cause = cause.__cause__ or cause.__context__
    return None


def umask() -> int:
    """The process umask. Read from /proc where it is listed: ``os.umask`` can only read it by
    setting it, and a file created meanwhile by another thread would get the temporary value."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def publish(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Give ``tmp`` the mode a plain ``open()`` would have (``tempfile.mkstemp`` makes 0600, which
    hides a shared file from the user's group), flush it to disk, rename it to ``target`` and
    fsync the folder: readers see the old file, none, or the complete new one, also after a power
    cut."""
    os.chmod(tmp, 0o666 & ~umask())
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    fsync_dir(Path(target).parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder, then :func:`publish`; the temp file goes on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def fsync_dir(folder: Path) -> None:
    """Makes a rename in ``folder`` durable (the new name survives a power cut)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RunDirLock:
    """Claims ``run_dir`` for this job (see the module docstring)."""

    def __init__(self, run_dir: Path, resume: str | None) -> None:
        self.run_dir, self.resume = Path(run_dir), resume
        self._lock: FileLock | None = None

    def acquire(self) -> None:
        self._refuse_inside()  # before mkdir: a refused run creates nothing
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.run_dir / LOCK_NAME), timeout=0)
            lock.acquire()
        except Timeout as err:
            raise EffbenchError(f"run dir {self.run_dir} is in use by another effbench job; "
                                "give this run its own folder (drop hydra.run.dir=… or choose "
                                "a new one).") from err
        except OSError as err:
            raise EffbenchError(f"cannot write to the run dir {self.run_dir} "
                                f"({err.strerror or err}); choose a writable folder with "
                                "hydra.run.dir=… (hydra.sweep.dir=… for a sweep).") from err
        self._lock = lock
        try:
            self._refuse_completed()
        except EffbenchError:
            self.release()
            raise

    def _refuse_inside(self) -> None:
        problem = refused_run_dir(self.run_dir)
        if problem:
            raise EffbenchError(problem)

    def _refuse_completed(self) -> None:
        summary = self.run_dir / "summary.json"
        if not summary.is_file():
            return
        try:
            status = json.loads(summary.read_text()).get("status")
        except (OSError, ValueError, AttributeError):
            status = None
        resuming_here = self.resume and _inside(Path(str(self.resume)), self.run_dir)
        if status == "completed" and not resuming_here:
            raise EffbenchError(f"run dir {self.run_dir} already holds a completed run, which "
                                "effbench never overwrites; choose a new hydra.run.dir, or "
                                f"resume that run with resume={self.run_dir}/checkpoints/"
                                "last.ckpt.")

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def refused_run_dir(run_dir: str | os.PathLike) -> str | None:
    """A run never goes into the folder of a sweep nor inside a completed run (one sentence)."""
    path = Path(run_dir).expanduser()
    if (path / "multirun.yaml").is_file():
        return (f"run dir {path} is the folder of a sweep (multirun.yaml); give this run its own "
                "folder (drop hydra.run.dir=… or choose a new one).")
    holder = completed_above(path)
    if holder is not None:
        return (f"run dir {path} lies inside the completed run {holder}, which effbench never "
                "writes into; choose a folder outside it with hydra.run.dir=… .")
    return None


def completed_above(folder: Path) -> Path | None:
    """The nearest folder above ``folder`` that holds a completed run, if any."""
    for parent in Path(folder).resolve().parents:
        try:
            if json.loads((parent / "summary.json").read_text()).get("status") == "completed":
                return parent
        except (OSError, ValueError, AttributeError):
            continue
    return None


def reused_sweep_dir(sweep_dir: str) -> str | None:
    """Hydra rewrites ``multirun.yaml`` when a sweep starts: a sweep into the folder of an earlier
    one would replace that sweep's record (one sentence, or None)."""
    if (Path(sweep_dir).expanduser() / "multirun.yaml").is_file():
        return (f"hydra.sweep.dir={sweep_dir} already holds a sweep (multirun.yaml), which "
                "effbench never overwrites; choose a new hydra.sweep.dir, or drop it (each "
                "sweep gets its own folder).")
    return None


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def check_resume(path: Any) -> dict[str, Any] | None:
    """The checkpoint to resume from, checked before anything is built: it exists, is a Lightning
    checkpoint, and loads without running code (``weights_only=True``)."""
    if path in (None, ""):
        return None
    import torch

    ckpt = Path(str(path))
    fix = "point it at <run dir>/checkpoints/last.ckpt of the run to continue"
    if not ckpt.is_file():
        raise EffbenchError(f"resume={path} does not exist; {fix}.")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch reports bad files through many types
        raise EffbenchError(f"resume={path} is not a readable Lightning checkpoint "
                            f"({type(err).__name__}); {fix}.") from err
    if not isinstance(state, dict) or "state_dict" not in state or "epoch" not in state:
        raise EffbenchError(f"resume={path} is not a Lightning checkpoint (no state_dict/epoch); "
                            f"{fix}.")
    shapes = {k: tuple(v.shape) for k, v in state["state_dict"].items() if hasattr(v, "shape")}
    return {"path": str(ckpt), "epoch": int(state["epoch"]), "run_dir": str(ckpt.parent.parent),
            "shapes": shapes}


def check_resume_matches(resume: dict[str, Any] | None, model: Any) -> None:
    """A checkpoint of another model (backbone, classes, technique) is refused before training."""
    if not resume:
        return
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = resume["shapes"]
    # Techniques may re-parametrise weights (pruning masks appear during training), so names
    # present on one side only are allowed; a shape mismatch or no shared name is another model.
    common = set(mine) & set(theirs)
    wrong = sorted(k for k in common if mine[k] != theirs[k])
    if wrong or not common:
        what = (f"{wrong[0]} has shape {theirs[wrong[0]]}, this model's {mine[wrong[0]]}"
                if wrong else "no parameter names in common")
        raise EffbenchError(f"resume={resume['path']} is a checkpoint of another model ({what}); "
                            "resume with the same backbone, dataset and strategy as the run "
                            "that wrote it.")
