"""A job's classes as the API shows them, from the stored spec (no Ray): hierarchical
``categories`` show their leaves as labels (``mammals/dog``), with their targets, before the
job has any progress, and those are the labels GET /v1/jobs/{id}/samples takes."""

from __future__ import annotations

import time
from typing import Any

import yaml

from builder.spec import parse_spec
from serve.app import class_view, job_view, spec_classes
from serve.store import JobRow

ZOO = """
name: zoo
target: 10
classes: {cat: [cat photo]}
categories:
  mammals:
    dog: [dog photo]
    fox: {target: 4}
sources: [{engine: duckduckgo}]
"""


def stored_row(spec: dict[str, Any], job_id: str = "zoo-00000001") -> JobRow:
    """A job row holding the spec as the API stores it (the parsed spec dumped as JSON)."""
    now = time.time()
    data = parse_spec(spec).model_dump(mode="json")
    return JobRow(id=job_id, owner="o", name=data["name"], state="starting", created_at=now,
                  updated_at=now, output_uri="/out", spec=data)


def test_category_leaves_are_the_jobs_classes_with_their_targets():
    row = stored_row(yaml.safe_load(ZOO))
    assert "mammals/dog" not in row.spec["classes"]  # the dump keeps them under categories
    assert spec_classes(row) == {"cat": 10, "mammals/dog": 10, "mammals/fox": 4}
    view = job_view(row)
    assert list(view["classes"]) == ["cat", "mammals/dog", "mammals/fox"]
    assert view["classes"]["mammals/fox"] == {"target": 4, "accepted": 0, "candidates": 0,
                                              "rejected": 0}


def test_progress_and_stats_fill_in_the_category_classes():
    row = stored_row(yaml.safe_load(ZOO), "zoo-00000002")
    progress = {"classes": {"mammals/dog": {"accepted": 2, "candidates": 3, "rejected": 1}}}
    stats = {"classes": {"mammals/fox": {"target": 4, "accepted": 4, "shortfall": 0}}}
    classes = class_view(row, progress, stats)
    assert set(classes) == {"cat", "mammals/dog", "mammals/fox"}
    assert classes["mammals/dog"]["accepted"] == 2 and classes["mammals/dog"]["target"] == 10
    assert classes["mammals/fox"]["accepted"] == 4 and classes["mammals/fox"]["shortfall"] == 0


def test_a_flat_spec_and_an_unreadable_one_still_show_their_classes():
    row = stored_row({"name": "pets", "target": 5, "classes": {"cat": None, "dog":
                      {"queries": ["dog"], "target": 2}}, "sources": [{"engine": "duckduckgo"}]},
                     "pets-00000001")
    assert spec_classes(row) == {"cat": 5, "dog": 2}
    # A spec this version cannot parse (written by another one): its flat classes as stored.
    now = time.time()
    odd = JobRow(id="old-00000001", owner="o", name="old", state="succeeded", created_at=now,
                 updated_at=now, output_uri="/out",
                 spec={"name": "old", "target": 3, "classes": {"a": {"target": 1}, "b": {}},
                       "retired_option": True})
    assert spec_classes(odd) == {"a": 1, "b": 3}
