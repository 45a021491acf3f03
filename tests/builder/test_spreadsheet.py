"""Text from the web written for spreadsheets: an apostrophe before a formula's first
character, nothing else changed."""

from __future__ import annotations

import pyarrow as pa
import pytest

from builder.spreadsheet import FORMULA_START, as_text, as_text_columns


@pytest.mark.parametrize("first", list(FORMULA_START))
def test_a_value_a_spreadsheet_would_read_as_a_formula_is_text(first):
    assert as_text(f"{first}HYPERLINK(\"https://evil.example/\")") == \
        f"'{first}HYPERLINK(\"https://evil.example/\")"


@pytest.mark.parametrize("value", ["", "a title", "http://h/x=1", " =1", "'=1", None, 3, -2])
def test_other_values_are_left_as_they_are(value):
    assert as_text(value) == value


def test_only_the_string_columns_named_are_changed_and_nulls_stay_null():
    table = pa.table({"title": ["=cmd|' /c calc'!A0", None, "sunset", "\n@SUM(A1)"],
                      "label": ["-cat", "-cat", "dog", "dog"],
                      "big": pa.array(["+1", "x", None, "y"], pa.large_string()),
                      "n": [-1, 2, 3, 4]})
    out = as_text_columns(table, ["title", "big", "n", "missing"])
    assert out["title"].to_pylist() == ["'=cmd|' /c calc'!A0", None, "sunset", "'\n@SUM(A1)"]
    assert out["big"].to_pylist() == ["'+1", "x", None, "y"]
    assert out["label"].equals(table["label"]) and out["n"].equals(table["n"])
    assert out.schema == table.schema


def test_a_table_with_nothing_to_change_is_returned_as_it_is():
    table = pa.table({"title": ["a", None]})
    assert as_text_columns(table, ["title"]) is table
