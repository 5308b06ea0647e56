"""Reading a run folder that effbench did not write here: as data, never as code.

A colleague's run folder (``effbench-eval RUN_DIR``, ``effbench-compare``) can hold anything: a
``resolved_config.yaml`` whose ``_target_`` names ``torch.load`` reached through a module
attribute, a ``summary.json`` that is a symbolic link to ``/dev/zero``, strings with terminal
escape sequences. The rules, in one place:

- a file is read only if it is a regular file of bounded size (:func:`read_regular`), and parsed
  by a data-only parser (JSON, ``yaml.safe_load``; tensors by safetensors);
- nothing the file names is called: what it describes is rebuilt from names that effbench
  registers, with plain options (numbers, strings, booleans, lists of them) that the
  constructor declares (:func:`plain_options`; the dataset: ``saved_model.dataset_class``);
- a value from the file that reaches the terminal or a message goes through :func:`printable`.

Light on purpose (it imports nothing of effbench's but errors): ``effbench-compare`` uses it.
"""

from __future__ import annotations

import inspect
import os
import stat
import unicodedata
from collections.abc import Mapping
from typing import Any

from effbench.errors import EffbenchError

# Generous for what effbench writes (a summary is a few kB, a config a few kB, a manifest with
# 10,000 class names < 1 MB), small enough that a crafted file cannot exhaust memory.
TEXT_LIMIT = 16 << 20
SHOWN_CHARS = 120  # how much of a value from a file a message quotes


class RefusedFile(EffbenchError):
    """A file that is not read: the message says why ("it is not a regular file (...)")."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_regular(path: str | os.PathLike, limit: int = TEXT_LIMIT) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes (a link to one is
    fine: the file itself is checked, after opening, so it cannot be swapped in between).

    Opened non-blocking, so a named pipe cannot hang the reader; a device (``/dev/zero``) or a
    file larger than ``limit`` is refused before a byte is read. Raises :class:`RefusedFile`
    with the reason, or ``OSError`` when the file cannot be opened."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RefusedFile(f"it is {_kind(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise RefusedFile(f"it is {info.st_size:,} bytes, more than the {limit:,} that "
                              "effbench reads from such a file")
        chunks, size = [], 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:  # grew while being read
                raise RefusedFile(f"it grew past {limit:,} bytes while being read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike, limit: int = TEXT_LIMIT) -> Any:
    """A JSON file read with :func:`read_regular`; ``ValueError`` when it is not JSON."""
    import json

    return json.loads(read_regular(path, limit).decode("utf-8"))


def read_yaml(path: str | os.PathLike, limit: int = TEXT_LIMIT) -> Any:
    """A YAML file read with :func:`read_regular` and ``yaml.safe_load`` (no tags that build
    objects, no interpolation resolved: ``${...}`` stays a string)."""
    import yaml

    return yaml.safe_load(read_regular(path, limit).decode("utf-8"))


# -- showing values from a file --------------------------------------------------------------------
def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: Any, limit: int | None = None) -> str:
    """``str(value)`` with every control and format character escaped (``\\x1b`` for ESC, the
    Unicode direction overrides as ``\\u202e``), so a string from a file cannot move the cursor,
    recolour or rewrite the terminal, hide text, or break a one-line message. ``limit``: at most
    that many characters, then ``…``."""
    text = str(value)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    if text.isprintable():
        return text
    return "".join(_escape(ch) if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")
                   else ch for ch in text)


def shown(value: Any) -> str:
    """A value from a file, quoted for a one-line message."""
    return printable(repr(value) if isinstance(value, str) else value, SHOWN_CHARS)


# -- plain options ---------------------------------------------------------------------------------
PLAIN = (bool, int, float, str, type(None))


def is_plain(value: Any, depth: int = 0) -> bool:
    """A number, string, boolean or null, or a (shallow) list of them: nothing that Hydra or a
    constructor could turn into an object."""
    if isinstance(value, PLAIN):
        return True
    return isinstance(value, list) and depth < 2 and all(is_plain(v, depth + 1) for v in value)


def accepted_parameters(cls: type) -> set[str]:
    """The keyword arguments ``cls(...)`` declares, along its ``**kwargs`` chain to the bases."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.name != "self"
                  and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break  # this class passes nothing further up
    return names


def plain_options(node: Mapping[str, Any], accepted: set[str], where: str,
                  what: str) -> dict[str, Any]:
    """The options of ``node`` (a config node from a file) if each is a plain value of a name in
    ``accepted``; otherwise one sentence naming the first that is not."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if not isinstance(key, str) or key not in accepted:
            raise EffbenchError(f"{where}: {what}.{printable(key, SHOWN_CHARS)} is not an "
                                f"option of that {what}; restore the run's file, or run the "
                                "job again.")
        if not is_plain(value):
            raise EffbenchError(f"{where}: {what}.{key}={shown(value)} is not a plain value "
                                "(a number, string, boolean or a list of them); restore the "
                                "run's file, or run the job again.")
        out[key] = value
    return out


def first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return printable(lines[0] if lines else type(err).__name__, 200)
