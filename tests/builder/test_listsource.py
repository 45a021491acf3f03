"""URL lists cut into slices that grow along the file (``plan_slices``'s ``grow_after``):
every row is read exactly once, in order, and the slices are the sizes asked for."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from builder.listsource import ListReader, SlicePlan, plan_slices

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
    del meta["list_slicing"]
    job_json.write_text(json.dumps(meta))
    older = JobLifecycle(parse_spec(data), uri=data["output"]["uri"], resume=True)
    older.prepare()
    assert older.list_plans[0] == plan_slices(str(urls), 64)


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
    rows = ListReader(plan_slices(str(path), 10), default_label="cat").read(0)
    assert [r.url for r in rows] == ["http://127.0.0.1:1/a.jpg", "",
                                     "http://127.0.0.1:1/b.jpg"]
    assert "byte" in rows[1].where and "not " in rows[1].where
