"""The one CSV/TSV writer for featx's outputs: cells a spreadsheet would run are neutralised.

Class names and file names come from users, and a cell that starts with ``=``, ``+``,
``-``, ``@`` (or a tab or carriage return) is a formula to Excel, LibreOffice and Google
Sheets: ``=HYPERLINK(...)`` as a class name would run when a colleague opens
``predictions.csv``. Such a text cell is written with a leading ``'`` (OWASP's advice:
spreadsheets show the text and do not evaluate it). Numbers are left alone, so a
negative similarity stays a number. JSON outputs keep every value exactly as it is.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from typing import IO

__all__ = ["FORMULA_STARTS", "csv_writer", "safe_cell"]

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def safe_cell(value: object) -> object:
    """``value`` as a CSV cell: text a spreadsheet would evaluate gets a leading ``'``."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not _is_number(value):
        return "'" + value
    return value


class _SafeWriter:
    def __init__(self, f: IO[str], delimiter: str) -> None:
        self._w = csv.writer(f, delimiter=delimiter)

    def writerow(self, row: Iterable[object]) -> None:
        self._w.writerow([safe_cell(c) for c in row])

    def writerows(self, rows: Iterable[Iterable[object]]) -> None:
        for row in rows:
            self.writerow(row)


def csv_writer(f: IO[str], delimiter: str = ",") -> _SafeWriter:
    """A ``csv.writer`` on ``f`` whose rows go through ``safe_cell``; every featx CSV uses it."""
    return _SafeWriter(f, delimiter)
