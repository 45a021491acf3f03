"""URL lists cut into slices that grow along the file (``plan_slices``'s ``grow_after``):
every row is read exactly once, in order, and the slices are the sizes asked for."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from builder.errors import SourceError
from builder.listsource import ListReader, SlicePlan, list_identity, plan_slices

ROWS = 1000


def _urls(n: int = ROWS) -> list[str]:
    return [f"http://127.0.0.1:1/img/{i:05d}.jpg" for i in range(n)]


def _read_all(plan: SlicePlan) -> list[list[str]]:
    reader = ListReader(plan, default_label="cat")
    return [[row.url for row in reader.read(i)] for i in range(plan.count)]


@pytest.fixture
def text_list(tmp_path: Path) -> Path:
    path = tmp_path / "urls.txt"
    path.write_text("".join(f"{u}\n" for u in _urls()))
    return path


def test_text_slices_grow_past_the_first_rows_and_cover_every_line_once(text_list):
    plan = plan_slices(str(text_list), 10, grow_after=100, grown_rows=40)
    slices = _read_all(plan)
    assert [u for s in slices for u in s] == _urls()
    sizes = [len(s) for s in slices]
    assert sizes[:10] == [10] * 10
    assert set(sizes[10:-1]) == {40}
    assert plan.count == 10 + 900 // 40 + 1
    assert [plan.rows(i) for i in (0, 9, 10, plan.count - 1)] == [10, 10, 40, 40]


def test_text_slices_without_growth_are_as_before(text_list):
    plain = plan_slices(str(text_list), 10)
    assert plain.count == 100 and plain.grown_rows == 0
    assert all(len(s) == 10 for s in _read_all(plain))
    smaller = plan_slices(str(text_list), 10, grow_after=100, grown_rows=8)
    assert smaller == plain


def test_a_list_shorter_than_the_growth_point_is_cut_as_without_growth(text_list):
    plan = plan_slices(str(text_list), 10, grow_after=5000, grown_rows=40)
    assert plan.count == 100 and all(len(s) == 10 for s in _read_all(plan))


@pytest.mark.parametrize("groups", [[1000], [250, 250, 250, 250], [70, 0, 130, 800]])
def test_parquet_slices_grow_inside_and_across_row_groups(tmp_path, groups):
    path = tmp_path / "urls.parquet"
    urls = _urls()
    with pq.ParquetWriter(path, pa.schema([("url", pa.string())])) as writer:
        start = 0
        for n in groups:
            writer.write_table(pa.table({"url": pa.array(urls[start:start + n], pa.string())}))
            start += n
    plan = plan_slices(str(path), 16, grow_after=100, grown_rows=64)
    slices = _read_all(plan)
    assert [u for s in slices for u in s] == urls
    assert all(len(s) <= 16 for s in slices[:6])
    assert max(len(s) for s in slices) == 64
    assert [plan.rows(i) for i in range(plan.count)] == [len(s) for s in slices]
    # Rows past the growth point are never cut into base slices.
    first_grown = next(i for i, s in enumerate(slices) if len(s) > 16)
    assert sum(len(s) for s in slices[:first_grown]) <= 100 + 16
    with pytest.raises(IndexError):
        plan.bounds(plan.count)


def _list_job(tmp_path: Path, **resources) -> tuple[dict, Path]:
    urls = tmp_path / "long.txt"
    if not urls.exists():
        urls.write_text("".join(f"{u}\n" for u in _urls(20_000)))
    data = {"name": "lst", "target": 100, "classes": ["cat"],
            "sources": [{"engine": "urllist", "path": str(urls)}],
            "output": {"uri": str(tmp_path / "out"), "formats": ["parquet"]},
            "resources": resources}
    return data, urls


def test_a_resumed_job_cuts_its_lists_as_its_first_run_did(tmp_path):
    """Unit uids are slice numbers: a resume must cut the list as the first run did, whatever
    resources.batch_size says now, and a journal from before slices grew was cut without
    growth."""
    from builder.pipeline import JobLifecycle
    from builder.spec import parse_spec

    data, urls = _list_job(tmp_path)
    first = JobLifecycle(parse_spec(data), uri=data["output"]["uri"])
    first.prepare()
    plan = first.list_plans[0]
    assert (plan.slice_rows, plan.grow_after, plan.grown_rows) == (64, 8192, 256)
    changed, _ = _list_job(tmp_path, batch_size=16)
    resumed = JobLifecycle(parse_spec(changed), uri=data["output"]["uri"], resume=True)
    resumed.prepare()
    assert resumed.job_id == first.job_id and resumed.list_plans[0] == plan
    assert resumed.unit_size == 64

    job_json = tmp_path / "out" / "_journal" / first.job_id / "job.json"
    meta = json.loads(job_json.read_text())
    del meta["list_slicing"], meta["lists"]  # as a journal written before either
    job_json.write_text(json.dumps(meta))
    older = JobLifecycle(parse_spec(data), uri=data["output"]["uri"], resume=True)
    older.prepare()
    assert older.list_plans[0] == plan_slices(str(urls), 64)


def test_a_resume_refuses_a_list_that_changed_and_cuts_an_unchanged_one_as_recorded(
        tmp_path, monkeypatch):
    """The resume cut the list again as it was then: rows added, removed or edited moved the
    slices' bounds, and rows were lost or counted twice, silently. The first run's cut and
    the file's identity are in job.json now: a changed list is refused, naming the source,
    and an unchanged one is cut as recorded (whatever the planning would say today)."""
    from builder import listsource
    from builder.journal import ResumeError
    from builder.pipeline import JobLifecycle
    from builder.spec import parse_spec

    data, urls = _list_job(tmp_path)
    first = JobLifecycle(parse_spec(data), uri=data["output"]["uri"])
    first.prepare()
    plan = first.list_plans[0]
    with monkeypatch.context() as patch:  # the planning changed since
        patch.setattr(listsource, "_line_bytes", lambda sample, whole: 7)
        resumed = JobLifecycle(parse_spec(data), uri=data["output"]["uri"], resume=True)
        resumed.prepare()
    assert resumed.list_plans[0] == plan
    copy = tmp_path / "copy.txt"  # the same list, copied (another mtime)
    copy.write_bytes(urls.read_bytes())
    copy.replace(urls)
    JobLifecycle(parse_spec(data), uri=data["output"]["uri"], resume=True).prepare()
    with urls.open("a") as f:
        f.write("".join(f"{u}\n" for u in _urls(100)))
    with pytest.raises(ResumeError, match=r"sources\.0\.path .*long\.txt is not the list this "
                                          r"job's first run cut"):
        JobLifecycle(parse_spec(data), uri=data["output"]["uri"], resume=True).prepare()


def test_a_resume_searches_the_queries_its_first_run_expanded(tmp_path, monkeypatch):
    """The expanded queries were asked of the LLM again on resume: another day (or node, or
    with the LLM down) gave other queries, so the first run's pages were never searched on
    and new ones started from the first."""
    from builder import pipeline
    from builder.pipeline import JobLifecycle
    from builder.spec import parse_spec

    data, _ = _list_job(tmp_path)
    data["search"] = {"expand": True}
    first = JobLifecycle(parse_spec(data), uri=data["output"]["uri"])
    first.prepare()
    assert first.extra_queries["cat"]
    monkeypatch.setattr(pipeline, "expand_queries", lambda spec: (
        {"cat": ["another answer"]}, {"enabled": True, "queries": {"cat": ["another answer"]}}))
    resumed = JobLifecycle(parse_spec(data), uri=data["output"]["uri"], resume=True)
    resumed.prepare()
    assert resumed.extra_queries == first.extra_queries
    assert resumed.expansion == first.expansion


def test_a_first_line_longer_than_the_sample_makes_no_slice_hold_more_than_its_rows(tmp_path):
    """The sampled head held no whole line, so the typical line was taken to be the sample
    (65,537 bytes): every slice of 64 rows held thousands, all fetched and held at once."""
    path = tmp_path / "urls.jsonl"
    urls = _urls(5000)
    path.write_text(json.dumps({"url": "http://127.0.0.1:1/big.jpg", "note": "x" * 70_000})
                    + "\n" + "".join(json.dumps({"url": u}) + "\n" for u in urls))
    plan = plan_slices(str(path), 64)
    slices = _read_all(plan)
    assert [u for s in slices for u in s][1:] == urls
    assert max(len(s) for s in slices) <= 64


def test_a_journal_from_before_cuts_were_recorded_resumes_with_the_cut_it_made(tmp_path):
    """Such a journal holds no cut: its resume plans the list again, as the version that
    started it did, though this one cuts a list of a long first line otherwise (slice
    numbers are unit uids)."""
    from builder.pipeline import JobLifecycle
    from builder.spec import parse_spec

    path = tmp_path / "urls.jsonl"
    path.write_text(json.dumps({"url": "http://127.0.0.1:1/big.jpg", "note": "x" * 70_000})
                    + "\n" + "".join(json.dumps({"url": u}) + "\n" for u in _urls(5000)))
    data = {"name": "lst", "target": 100, "classes": ["cat"],
            "sources": [{"engine": "urllist", "path": str(path)}],
            "output": {"uri": str(tmp_path / "out"), "formats": ["parquet"]}}
    first = JobLifecycle(parse_spec(data), uri=data["output"]["uri"])
    first.prepare()
    job_json = tmp_path / "out" / "_journal" / first.job_id / "job.json"
    meta = json.loads(job_json.read_text())
    del meta["lists"]  # as an earlier version wrote it
    job_json.write_text(json.dumps(meta))
    resumed = JobLifecycle(parse_spec(data), uri=data["output"]["uri"], resume=True)
    resumed.prepare()
    unit_size, grow_after, grown_rows = meta["list_slicing"]
    legacy = plan_slices(str(path), unit_size, grow_after=grow_after, grown_rows=grown_rows,
                         legacy=True)
    assert resumed.list_plans[0] == legacy != first.list_plans[0]


def test_a_list_whose_server_gives_no_size_is_a_source_error_at_planning(tmp_path):
    """fsspec's size of such an HTTP list was 0: it was cut into no slice, and the job found
    no candidate in it, without a word."""
    from aiohttp import web

    from tests.builder.test_fetch import ThreadServer

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write("".join(f"{u}\n" for u in _urls(50)).encode())
        return resp

    app = web.Application()
    app.router.add_get("/list.txt", chunked)
    server = ThreadServer(app).start()
    try:
        with pytest.raises(SourceError, match="gives no size for it"):
            plan_slices(f"http://127.0.0.1:{server.port}/list.txt", 10)
    finally:
        server.stop()


def test_a_byte_order_mark_does_not_cost_the_first_row(tmp_path):
    """Editors on Windows start UTF-8 files with a BOM: the first URL, or JSON line, is read."""
    txt, jsonl = tmp_path / "urls.txt", tmp_path / "urls.jsonl"
    txt.write_bytes(b"\xef\xbb\xbfhttp://127.0.0.1:1/a.jpg\nhttp://127.0.0.1:1/b.jpg\n")
    jsonl.write_bytes(b'\xef\xbb\xbf{"url": "http://127.0.0.1:1/a.jpg"}\n')
    assert _read_all(plan_slices(str(txt), 10)) == [["http://127.0.0.1:1/a.jpg",
                                                    "http://127.0.0.1:1/b.jpg"]]
    assert _read_all(plan_slices(str(jsonl), 10)) == [["http://127.0.0.1:1/a.jpg"]]


@pytest.mark.parametrize("name,bad", [
    ("urls.csv", "x" * 140_000 + ",cat"),  # a field past csv.field_size_limit()
    ("urls.jsonl", "[" * 100_000 + "]" * 100_000),  # nested past the recursion limit
    ("urls.jsonl", '{"url": ' + "9" * 5_000 + "}"),  # an int past Python's digit limit
])
def test_a_row_the_parser_refuses_is_a_bad_row_and_the_rest_is_read(tmp_path, name, bad):
    """Each becomes a row without a URL that says where it is and why (the job rejects it as
    an invalid URL); the rows around it are read."""
    path = tmp_path / name
    good = ('{"url": "http://127.0.0.1:1/%s.jpg"}' if name.endswith("jsonl")
            else "http://127.0.0.1:1/%s.jpg,cat")
    header = "url,label\n" if name.endswith("csv") else ""
    path.write_text(header + "\n".join([good % "a", bad, good % "b"]) + "\n")
    plan = plan_slices(str(path), 10)
    reader = ListReader(plan, default_label="cat")
    rows = [row for i in range(plan.count) for row in reader.read(i)]
    assert [r.url for r in rows] == ["http://127.0.0.1:1/a.jpg", "",
                                     "http://127.0.0.1:1/b.jpg"]
    assert "byte" in rows[1].where and "not " in rows[1].where


@pytest.mark.parametrize("name,data,says", [
    ("latin1.csv", b"url,l\xe9bel\nhttp://127.0.0.1:1/a.jpg,cat\n", "not UTF-8"),
    ("mac.csv", b"url,label\rhttp://127.0.0.1:1/a.jpg,cat\r", "lone \\r"),
    ("urls.csv.gz", b"\x1f\x8b\x08\x00", "decompress it"),
    ("urls.txt.zst", b"\x28\xb5\x2f\xfd", "decompress it"),
    ("a.parquet", b"url\nhttp://127.0.0.1:1/a.jpg\n", "not a readable Parquet file"),
    ("b.parquet", b"", "not a readable Parquet file"),
])
def test_a_list_that_cannot_be_parsed_is_a_source_error_at_planning(tmp_path, name, data,
                                                                    says):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(SourceError, match=re.escape(says)) as err:
        plan_slices(str(path), 10)
    assert str(path) in str(err.value)


def test_a_directory_is_a_source_error_at_planning(tmp_path):
    path = tmp_path / "urls.csv"
    path.mkdir()
    with pytest.raises(SourceError, match="is a directory"):
        plan_slices(str(path), 10)


def test_an_s3_list_without_credentials_is_a_source_error_at_planning(monkeypatch):
    """botocore's NoCredentialsError is no OSError: it must not escape as a traceback."""
    from botocore.exceptions import NoCredentialsError

    import builder.storage

    class NoCredentials:
        def info(self, path: str) -> dict:
            raise NoCredentialsError()

        size = info

    monkeypatch.setattr(builder.storage, "open_fs", lambda uri, opts: (NoCredentials(), uri))
    with pytest.raises(SourceError, match="s3://bucket/urls.txt.*credentials"):
        plan_slices("s3://bucket/urls.txt", 10)


def test_parquet_columns_are_checked_by_the_top_level_names_the_reader_uses(tmp_path):
    """A struct with a field named url is not a url column; a url column twice is refused."""
    nested, twice = tmp_path / "nested.parquet", tmp_path / "twice.parquet"
    pq.write_table(pa.table({"meta": pa.array([{"url": "http://127.0.0.1:1/a.jpg"}])}), nested)
    url = pa.array(["http://127.0.0.1:1/a.jpg"])
    pq.write_table(pa.Table.from_arrays([url, url], names=["url", "url"]), twice)
    with pytest.raises(SourceError, match=r"no column 'url' \(columns: meta\)"):
        plan_slices(str(nested), 10)
    with pytest.raises(SourceError, match="'url' appear more than once"):
        plan_slices(str(twice), 10)


def test_dates_and_times_out_of_pythons_range_are_bad_rows_not_a_crash(tmp_path):
    """A list whose url, label or caption column held a date past year 9999 (or a duration
    past Python's) raised OverflowError out of the reader, which stopped the whole job."""
    path = tmp_path / "dates.parquet"
    pq.write_table(pa.table({
        "url": pa.array([253402300800 * 10, 0], pa.timestamp("s")),
        "label": pa.array([2**31 - 1, 0], pa.date32()),
        "cap": pa.array([2**62, 1], pa.duration("s"))}), path)
    reader = ListReader(plan_slices(str(path), 10), caption_column="cap")
    rows = reader.read(0)
    reader.close()
    assert len(rows) == 2 and all(not r.url.startswith("http") for r in rows)
    assert rows[1].label == "1970-01-01" and "out of range" in rows[0].label
    nested = tmp_path / "nested.parquet"  # such a value inside a list or a struct
    pq.write_table(pa.table({
        "url": pa.array([[253402300800 * 10], [0]], pa.list_(pa.timestamp("s"))),
        "label": pa.array([{"d": 2**31 - 1}, {"d": 0}], pa.struct([("d", pa.date32())]))}),
        nested)
    reader = ListReader(plan_slices(str(nested), 10))
    rows = reader.read(0)
    reader.close()
    assert len(rows) == 2 and all(not r.url.startswith("http") for r in rows)
    assert "unreadable value" in rows[0].url


def test_a_duplicate_caption_column_is_a_source_error_when_read(tmp_path):
    path = tmp_path / "caps.parquet"
    url, cap = pa.array(["http://127.0.0.1:1/a.jpg"]), pa.array(["a cat"])
    pq.write_table(pa.Table.from_arrays([url, cap, cap], names=["url", "cap", "cap"]), path)
    reader = ListReader(plan_slices(str(path), 10), caption_column="cap")
    with pytest.raises(SourceError, match="'cap' appear more than once"):
        reader.read(0)


def test_a_damaged_row_group_is_a_source_error_naming_the_slice(tmp_path):
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": _urls(100)}), path, row_group_size=50,
                   compression="none")
    plan = plan_slices(str(path), 50)
    data = bytearray(path.read_bytes())
    data[4:200] = b"\xff" * 196  # the first row group's pages; the footer stays intact
    path.write_bytes(bytes(data))
    with pytest.raises(SourceError, match=re.escape(f"{path} (slice 0)")):
        ListReader(plan).read(0)


def test_a_text_list_gone_after_planning_is_a_source_error_naming_the_slice(text_list):
    plan = plan_slices(str(text_list), 10)
    text_list.unlink()
    with pytest.raises(SourceError, match=re.escape(f"{text_list} (slice 3)")):
        ListReader(plan).read(3)


def test_a_line_past_the_limit_is_a_bad_row_read_past_in_pieces(tmp_path):
    """A line without an end (here 8 MiB) never sits in memory whole: it becomes a row without
    a URL saying how long it was, and every other line is read once, whatever the cut. The
    slices that start inside it cost no more than their own bytes."""
    import tracemalloc

    from builder.listsource import MAX_LINE_BYTES

    path = tmp_path / "urls.txt"
    urls = _urls(200)
    long = "http://127.0.0.1:1/" + "x" * (8 * MAX_LINE_BYTES)
    path.write_text("\n".join(urls[:100] + [long] + urls[100:]) + "\n")
    plan = plan_slices(str(path), 50)
    reader = ListReader(plan, default_label="cat")
    tracemalloc.start()
    try:
        rows = [row for i in range(plan.count) for row in reader.read(i)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r.url for r in rows] == urls[:100] + [""] + urls[100:]
    assert f"a line of {len(long) + 1:,} bytes" in rows[100].where
    assert peak < 4 * MAX_LINE_BYTES


def test_one_long_line_at_the_head_does_not_swell_the_slices(tmp_path):
    """Slices are cut from the sampled head's typical line, not its mean: a 60 KiB comment
    first would otherwise make each slice of 100 rows hold every row of the file."""
    path = tmp_path / "urls.txt"
    urls = _urls(5000)
    path.write_text("# " + "x" * 60_000 + "\n" + "".join(f"{u}\n" for u in urls))
    plan = plan_slices(str(path), 100)
    slices = _read_all(plan)
    assert [u for s in slices for u in s] == urls
    assert max(len(s) for s in slices[1:]) <= 110
    assert plan.count >= 50


def test_a_text_list_of_lone_carriage_returns_is_a_source_error(tmp_path):
    path = tmp_path / "mac.txt"
    path.write_bytes(b"".join(u.encode() + b"\r" for u in _urls(50)))
    with pytest.raises(SourceError, match=re.escape("lone \\r")):
        plan_slices(str(path), 10)


def test_a_parquet_slice_never_holds_its_whole_row_group(tmp_path):
    """A list written as one row group of 100,000 rows: reading one slice of 64 rows holds a
    batch of the group, not the group's 100,000 URLs as Python strings, and slices read out of
    order (a resent unit) still give their own rows."""
    import tracemalloc

    path = tmp_path / "urls.parquet"
    urls = [f"http://127.0.0.1:1/{i:06d}/{'%032x' % (i * 2654435761)}.jpg"
            for i in range(100_000)]
    pq.write_table(pa.table({"url": urls}), path, row_group_size=len(urls))
    plan = plan_slices(str(path), 64)
    reader = ListReader(plan, default_label="cat")
    try:
        tracemalloc.start()
        try:
            middle = reader.read(800)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert [r.url for r in middle] == urls[800 * 64:801 * 64]
        assert peak < 4_000_000
        assert [r.url for r in reader.read(3)] == urls[3 * 64:4 * 64]
        assert [r.url for r in reader.read(801)] == urls[801 * 64:802 * 64]
        assert reader.read(801)[0].where.endswith(f"row group 0 row {801 * 64}")
    finally:
        reader.close()


def test_a_parquet_slices_bounds_cost_no_walk_over_the_row_groups_before_it(tmp_path,
                                                                            monkeypatch):
    """bounds() walked every row group before the slice's at each call: a list of 10M rows
    in groups of 1,000 took 6.7 ms a slice near its end, 133 s per pass over its slices, on
    the driver's event loop. The cuts are worked out once per plan; the slices are the same
    (every row once, in order)."""
    path = tmp_path / "urls.parquet"
    urls = _urls(3000)
    with pq.ParquetWriter(path, pa.schema([("url", pa.string())])) as writer:
        for at in range(0, 3000, 100):
            writer.write_table(pa.table({"url": urls[at:at + 100]}))
    calls = []
    real = SlicePlan._group_cuts
    monkeypatch.setattr(SlicePlan, "_group_cuts",
                        lambda self, rows, first: calls.append(1) or real(self, rows, first))
    plan = plan_slices(str(path), 64, grow_after=1000, grown_rows=256)
    planned = len(calls)
    bounds = [plan.bounds(i) for i in range(plan.count)]
    assert len(calls) - planned <= len(plan.row_groups)
    assert [u for s in _read_all(plan) for u in s] == urls
    assert bounds[-1][0] == len(plan.row_groups) - 1
    with pytest.raises(IndexError):
        plan.bounds(plan.count)


def test_a_list_whose_server_ignores_ranges_is_a_source_error_not_read_whole(tmp_path):
    """Python's http.server answers a range request with the whole file: the identity's two
    ranged reads took the whole list, twice, into the driver's memory."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    (tmp_path / "list.txt").write_text("".join(f"{u}\n" for u in _urls(20_000)))
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(SourceError, match="support range requests"):
            list_identity(f"http://127.0.0.1:{server.server_address[1]}/list.txt")
    finally:
        server.shutdown()
        server.server_close()


def test_a_parquet_list_replaced_after_its_plan_is_refused_not_read(tmp_path):
    """A plan pinned to the file's inode (``SlicePlan.inode``, from the HTTP API's check) reads
    that file only: another one put at its path, as a link or a copy, is a clear error."""
    import os

    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": _urls(10)}), path)
    plan = plan_slices(str(path), 4, inode=path.stat().st_ino)
    assert sum(_read_all(plan), []) == _urls(10)
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"url": ["SECRET"]}), other)
    path.unlink()
    os.symlink(other, path)
    with pytest.raises(SourceError, match="not the file this server checked"):
        _read_all(plan)
    with pytest.raises(SourceError, match="not the file this server checked"):
        list_identity(str(path), None, plan.inode)
    assert _read_all(plan_slices(str(path), 4)) == [["SECRET"]]  # unpinned: as before
