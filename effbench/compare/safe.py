"""What effbench-compare writes from summaries it did not write: no spreadsheet formulas, no
terminal escape sequences.

Summaries come from anyone's run folders. A crafted override such as ``x==HYPERLINK(…)`` lands
in ``compare.csv``, where a spreadsheet would run it as a formula (CSV injection); an error
string with ``ESC[2J`` would clear the terminal that prints the table. The rules here:

- :func:`csv_cell`: a text cell that starts with ``= + - @``, a tab or a carriage return gets a
  leading single quote (the OWASP rule for CSV injection); numbers, and text that is a number
  (``-1``, ``+1e-3``), are left alone;
- :func:`text`: control and format characters are escaped (``\\x1b``), line breaks kept.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from effbench.received import printable

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def csv_cell(value: Any) -> Any:
    """A cell as a spreadsheet can open it without running it: escaped text, numbers as they are."""
    if not isinstance(value, str):
        return value
    if value.startswith(FORMULA_START) and not _is_number(value):
        value = "'" + value
    return printable(value)


def csv_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` with every text cell and column name through :func:`csv_cell`."""
    out = frame.copy()
    for column in out.columns:
        if not pd.api.types.is_numeric_dtype(out[column]):  # object or string columns
            out[column] = out[column].map(csv_cell)
    out.columns = [csv_cell(c) if isinstance(c, str) else c for c in out.columns]
    return out


def text(value: str) -> str:
    """Terminal or Markdown text with control characters escaped, its lines kept."""
    return "\n".join(printable(line) for line in str(value).split("\n"))


def clean(value: Any) -> Any:
    """A parsed summary with every string (keys too) through :func:`received.printable`, so
    whatever compare prints, writes or puts in an error message is one harmless line."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {clean(k): clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value
