"""The output folder and atomic file writes: a reader (or a second compare) never sees half a
table or plot, and a failed write leaves neither a truncated file nor a stray temp file.

The default output folder is ``compare/`` inside a run or sweep folder that may come from
someone else: a ``compare`` that is a symbolic link (to a folder of the user's, say), or an
output file in it that is one, is refused rather than followed, so compare never writes
anywhere but into a real folder at the path shown."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from effbench.errors import EffbenchError
from effbench.received import printable
from effbench.rundir import publish

OUTPUT_SUFFIXES = (".md", ".csv", ".png")  # what compare writes into the folder


def _link_error(link: Path) -> EffbenchError:
    try:
        target = os.readlink(link)
    except OSError:
        target = "?"
    return EffbenchError(f"{printable(link)} is a symbolic link (to {printable(target)}), which "
                         "effbench-compare never writes through; remove it, or pass a real "
                         "folder with --out DIR.")


def prepare_out(out: Path) -> Path:
    """Creates the output folder, or says in one sentence why it cannot be used."""
    if out.is_symlink():
        raise _link_error(out)
    if out.exists() and not out.is_dir():
        raise EffbenchError(f"output folder {out} is an existing file; pass a folder with "
                            f"--out DIR (it is created if missing).")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EffbenchError(f"cannot create the output folder {out} ({err.strerror}); pass a "
                            f"writable folder with --out DIR.") from None
    if not os.access(out, os.W_OK | os.X_OK):  # a read-only sweep dir: say so before any work
        raise EffbenchError(f"cannot write to {out} (read-only); pass a writable folder with "
                            f"--out DIR.")
    for entry in sorted(out.iterdir()):  # before any file is written: all or nothing
        if entry.suffix in OUTPUT_SUFFIXES and entry.is_symlink():
            raise _link_error(entry)
    return out


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` fills a temp file in the same folder, then ``os.replace`` puts it in place.

    mkstemp creates the file 0600; it gets the mode a plain ``open`` would give (0666 & ~umask).
    The rename replaces a link at ``path`` rather than following it; a link there is refused
    anyway (see :func:`prepare_out`), and mkstemp never opens an existing file.
    """
    if path.is_symlink() or path.parent.is_symlink():
        raise _link_error(path if path.is_symlink() else path.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise EffbenchError(f"cannot write {path} ({err.strerror}); pass a writable folder with "
                            f"--out DIR.") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        publish(tmp, path)  # the user's umask, fsync, rename
    except OSError as err:  # disk full, folder gone: the user's to fix, not a bug
        tmp.unlink(missing_ok=True)
        raise EffbenchError(f"cannot write {path} ({err.strerror or err}); pass a writable "
                            f"folder with --out DIR.") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))
