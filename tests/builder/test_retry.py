"""Which published rejects a continuing run decides again (``builder.retry``), without Ray."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from builder.listsource import plan_slices
from builder.records import CANDIDATE_FIELDS, REJECT_SCHEMA
from builder.retry import kept_rows, redecided_counts, retry_candidates
from builder.spec import parse_spec


def _spec(page_meta: bool):
    return parse_spec({"name": "t", "classes": {"cat": None},
                       "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:9"}],
                       "download": {"signals": {"page_meta": page_meta}}})


def _rejects(path, with_candidates: bool) -> None:
    rows = [{"key": f"k{i}", "url": f"http://h/{i}.jpg", "label": "cat", "query": "cat",
             "engine": "sandbox", "stage": "fetch", "reason": "http_server_error",
             "detail": "HTTP 503", "duplicate_of": None, "http_status": 503, "rights": None,
             "rank": i, "page_url": f"http://h/page/{i}" if i else "", "title": f"t{i}",
             "license": "cc0", "author": "a", "caption": ""} for i in range(4)]
    table = pa.Table.from_pylist(rows, schema=REJECT_SCHEMA)
    if not with_candidates:  # as written before rejects kept the candidate
        table = table.drop_columns(list(CANDIDATE_FIELDS))
    pq.write_table(table, path)


def test_rejects_kept_before_their_pages_are_not_decided_again_with_page_meta(tmp_path):
    """Decided again without its page URL, a candidate's page is never read: with page_meta
    an image whose page refused (or could not be read) would come back without the check.
    Such rows stay rejects, and the counts agree with what the retry reads."""
    old, new = str(tmp_path / "old.parquet"), str(tmp_path / "new.parquet")
    _rejects(old, with_candidates=False)
    _rejects(new, with_candidates=True)
    for path, page_meta, again in ((old, False, 4), (old, True, 0), (new, True, 4),
                                   (new, False, 4)):
        spec = _spec(page_meta)
        counts = redecided_counts(path, None, spec, retry=True)
        assert sum(t.candidates for t in counts.classes.values()) == again, (path, page_meta)
        kept = sum(t.num_rows for t in kept_rows(path, None, spec, retry=True))
        assert kept == 4 - again
        plan = plan_slices(path, 10, url_column="url")
        found = [c for i in range(plan.count) for c in retry_candidates(plan, None, spec, i)]
        assert len(found) == again
    spec = _spec(True)
    plan = plan_slices(new, 10, url_column="url")
    first = retry_candidates(plan, None, spec, 0)[1]
    assert (first.page_url, first.title, first.rank, first.license) == \
        ("http://h/page/1", "t1", 1, "cc0")


def test_a_merge_holds_as_seen_exactly_the_rejects_it_does_not_decide_again(tmp_path):
    """The index marked a published reject as seen by its reason alone: with page_meta, an
    older dataset's rejects that stay as they are (no page URL kept) were not marked, so a
    resumed merge that found their URLs again decided them twice."""
    from builder.dedup import LocalPartitions
    from builder.pipeline import index_payloads

    (tmp_path / "ds").mkdir()
    _rejects(str(tmp_path / "ds" / "rejects.parquet"), with_candidates=False)
    for page_meta, seen in ((False, 0), (True, 4)):
        client = LocalPartitions(2, k=1).client()
        got = [p for chunk in index_payloads(client, _spec(page_meta), str(tmp_path / "ds"),
                                             "job1", None, merge=True, retry=True,
                                             journal=False)
               for p in chunk if "u_hash" in p and p["u_done"][0]]
        assert sum(len(p["u_hash"]) for p in got) == seen, page_meta


def test_a_continuation_keeps_the_cancelled_rejects_it_never_decided(tmp_path):
    """A continuation of a partial dataset decides its cancelled rejects again only where its
    crawl finds them again; the others stay as they were, and count as they did. A key
    cancelled twice (two sightings) and found once keeps one of its rows."""
    from builder.retry import undecided_keys

    keys = ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k6"]
    rows = [{"key": key, "url": f"http://h/{key}.jpg", "label": "cat", "query": "cat",
             "engine": "sandbox", "stage": "fetch" if i < 2 else "select",
             "reason": "timeout" if i < 2 else "cancelled", "detail": str(i),
             "duplicate_of": None, "http_status": None, "rights": None}
            for i, key in enumerate(keys)]
    path = str(tmp_path / "rejects.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=REJECT_SCHEMA), path, row_group_size=3)
    spec = _spec(False)
    decided = [pa.table({"key": ["k2", "new", "k2", "k6"]}), pa.table({"key": ["k4"]})]
    undecided = undecided_keys(path, None, spec, decided)
    assert undecided == {"k3": 1, "k5": 1, "k6": 1}
    kept = pa.concat_tables(kept_rows(path, None, spec, retry=False, undecided=undecided))
    assert sorted(zip(kept["key"].to_pylist(), kept["detail"].to_pylist())) == [
        ("k0", "0"), ("k1", "1"), ("k3", "3"), ("k5", "5"), ("k6", "6")]
    back = redecided_counts(path, None, spec, retry=False, undecided=undecided)
    assert back.classes["cat"].candidates == 3 and back.classes["cat"].rejected == \
        {"cancelled": 3}
    assert undecided_keys(path, None, spec, [pa.table({"key": keys[2:]})]) == {}
