"""Publishing cache files: complete on disk before they appear, with the user's permissions."""

from __future__ import annotations

import os
from pathlib import Path


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
    hides a shared cache from the user's group), flush it to disk, then rename it to ``target``:
    readers see the old file, none, or the complete new one, also after a power cut."""
    os.chmod(tmp, 0o666 & ~umask())
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
