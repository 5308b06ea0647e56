"""Unknown names: one sentence with the closest valid ones (difflib)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from effbench.errors import EffbenchError

_LISTED = 30  # a short list of valid names is printed whole; a long one only its close matches


def unknown_name(name: str, valid: Iterable[str], what: str, key: str) -> EffbenchError:
    """The error for ``key=name`` that is not one of ``valid`` (``what`` names the kind)."""
    valid = sorted(set(valid))
    close = difflib.get_close_matches(str(name), valid, n=5, cutoff=0.5)
    hint = f"closest: {', '.join(close)}" if close else "no close match"
    if len(valid) <= _LISTED:
        listing = f"valid ones are {', '.join(valid)}"
    else:
        listing = f"{len(valid)} are available"
    return EffbenchError(f"Unknown {what} {key}={name} ({hint}); {listing}.")
