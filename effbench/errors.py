"""The one exception type that the CLI turns into a single clear sentence and a non-zero exit."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


class EffbenchError(Exception):
    """A user-facing error: bad config value, missing data, absent hardware, unusable weights.

    The message is one sentence that names the bad value and says how to fix it.
    """


def root_cause(err: BaseException) -> BaseException:
    """The error under Hydra's ``InstantiationException`` wrappers (``raise … from err``)."""
    seen = set()
    while type(err).__name__ == "InstantiationException" and err.__cause__ is not None \
            and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__
    return err


def unknown_keyword(err: BaseException) -> str | None:
    """The keyword a constructor was given but does not take (``TypeError: … got an unexpected
    keyword argument 'x'``), else None."""
    import re

    match = re.search(r"unexpected keyword argument '(\w+)'", str(err))
    return match.group(1) if isinstance(err, TypeError) and match else None


def user_message(err: BaseException) -> str | None:
    """One sentence for an error the user caused (bad value, unknown option), else None.

    Hydra wraps what a constructor raises while it instantiates an object; the user must see the
    constructor's own sentence, once, not the wrapper.
    """
    import re

    cause = root_cause(err)
    if isinstance(cause, EffbenchError):
        return str(cause)
    key = unknown_keyword(cause)
    if key:
        where = re.search(r"full_key: (\S+)", str(err))
        group = where.group(1) if where else "the config"
        return (f"{group}.{key} is not an option of this {group}; remove "
                f"{group}.{key}=… (see `effbench --cfg job` for the options).")
    return None


def exit_with_one_line(prog: str, run: Callable[[list[str] | None], int],
                       argv: list[str] | None, code: int) -> NoReturn:
    """A console script's ``main``: ``run``'s exit status, or one ``<prog>: error: …`` line and
    ``code`` for an :class:`EffbenchError` (a sentence for the user, no traceback)."""
    try:
        sys.exit(run(argv))
    except EffbenchError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(code)
