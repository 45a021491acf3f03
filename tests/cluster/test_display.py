"""The end-of-job summary says why classes fell short."""

from __future__ import annotations

import io

from cluster.display import shortfall_cause, summary


def stats(**extra):
    return {"name": "x", "job_id": "x-1", "accepted": 0, "rejected": 0, "candidates": 0,
            "shortfall": {"cat": 2},
            "classes": {"cat": {"target": 2, "accepted": 0, "shortfall": 2, "candidates": 0,
                                "rejected": 0}}, **extra}


def test_failed_searches_are_not_called_sources_running_dry():
    failed = stats(search_errors=[{"engine": "wikimedia", "query": "cat", "page": 0,
                                   "label": "cat", "error": "Name or service not known"}])
    out = io.StringIO()
    summary(failed, "/tmp/x", stream=out)
    assert "1 searches failed, the last: wikimedia: Name or service not known" in out.getvalue()
    assert shortfall_cause(stats()) == "sources ran dry"
    assert shortfall_cause(stats(partial=True)) == "job cancelled"
