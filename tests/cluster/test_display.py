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
    assert shortfall_cause(stats(partial=True, partial_reason="cancelled")) == "job cancelled"


def test_the_summary_says_why_the_dataset_is_partial():
    """``partial_reason`` (stats.json) names it: an empty result is not called cancelled."""
    def printed(**extra) -> str:
        out = io.StringIO()
        summary(stats(**extra), "/tmp/x", stream=out)
        return " ".join(out.getvalue().split())

    empty = printed(partial=True, partial_reason="empty")
    assert "dataset PARTIAL (empty: nothing accepted)" in empty
    assert "cancelled" not in empty and "shortfall (sources ran dry)" in empty
    cancelled = printed(partial=True, partial_reason="cancelled")
    assert "dataset PARTIAL (cancelled)" in cancelled
    assert "shortfall (job cancelled)" in cancelled
    kept = printed(partial=True, partial_reason="cancelled", partial_kept=True)
    assert "dataset PARTIAL (its crawl was cancelled before this retry)" in kept
    assert "shortfall (crawl cancelled before this retry)" in kept
    assert "dataset complete" in printed(partial=False, partial_reason="")


def test_a_servers_error_text_is_shown_as_it_is():
    """A search error's text is a server's: Rich read ``[/x]`` in it as markup and the
    summary failed with a traceback (and the command with the wrong exit code), and
    ``[link=...]`` became a terminal link."""
    hostile = stats(search_errors=[{"engine": "webjson",
                                    "error": "bad [/x] [link=https://e]a :warning:"}])
    out = io.StringIO()
    summary(hostile, "/tmp/x", stream=out)
    assert "the last: webjson: bad [/x] [link=https://e]a :warning:" in out.getvalue()


def test_a_partial_datasets_reason_reaches_the_summary_without_escape_sequences():
    """The reason a partial dataset gives comes from its stats.json (a retry keeps the
    reason of the dataset it retried, which may be someone else's): it is shown printable."""
    from cluster.display import partial_state

    kept = {"partial": True, "partial_reason": "cancelled\x1b]0;pwned\x07", "partial_kept": True}
    assert partial_state(kept) == "PARTIAL (its crawl was cancelled?]0;pwned? before this retry)"
    assert partial_state({"partial": True, "partial_reason": "empty"}) == \
        "PARTIAL (empty: nothing accepted)"
    bad = stats(name="x\x1b]0;pwned\x07")
    bad["classes"]["cat"]["rejected_by_reason"] = {"timeout\x1b[2J": 1}
    out = io.StringIO()
    summary(bad, "/tmp/x", stream=out)
    assert "\x1b" not in out.getvalue() and "timeout?[2J 1" in out.getvalue()
