"""A job's classes as the API shows them, from the stored spec (no Ray): hierarchical
``categories`` show their leaves as labels (``mammals/dog``), with their targets, before the
job has any progress, and those are the labels GET /v1/jobs/{id}/samples takes."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
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


def test_the_parsed_class_lists_a_replica_keeps_are_bounded_in_bytes(monkeypatch):
    """The cache of parsed class lists was cleared at 10,000 jobs: a key submitting jobs of
    900 labels of 1 KB and cancelling them grew a replica by about 1 MB a job, to 10 GB.
    It now drops the least recently used past its size in bytes, and keeps what was used
    last."""
    import serve.app as app_mod
    from serve.cache import SizedLru

    monkeypatch.setattr(app_mod, "_CLASS_TARGETS", SizedLru(100_000, app_mod._class_targets_size))
    parses = []
    real = app_mod.parse_spec
    monkeypatch.setattr(app_mod, "parse_spec", lambda *a, **k: parses.append(1) or real(*a, **k))
    rows = [stored_row({"name": "big", "target": 1, "sources": [{"engine": "duckduckgo"}],
                        "output": {"formats": ["parquet"]},
                        "classes": {f"{j:03d}" + "x" * 240 + "/" + "y" * 250: None
                                    for j in range(60)}},
                       f"big-{i:08d}") for i in range(20)]
    for row in rows:
        assert len(spec_classes(row)) == 60
    cache = app_mod._CLASS_TARGETS
    assert cache.bytes <= 100_000 and 1 <= len(cache) < 5 and len(parses) == 20
    spec_classes(rows[-1])
    assert len(parses) == 20  # the last one used is kept
    spec_classes(rows[0])
    assert len(parses) == 21


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


def test_the_view_takes_the_state_further_along_with_its_progress():
    """The row says writing (stored when seen); a live answer read a moment earlier still says
    running: the view says writing, with the row's figures, never running 71/188."""
    row = stored_row(yaml.safe_load(ZOO), "zoo-00000003")
    row.state, row.progress = "writing", {"accepted": 150, "candidates": 188}
    live = {"state": "running", "progress": {"accepted": 71, "candidates": 188}}
    view = job_view(row, live)
    assert view["state"] == "writing" and view["progress"]["accepted"] == 150
    row.state = "running"
    live = {"state": "writing", "progress": {"accepted": 160, "candidates": 188}}
    view = job_view(row, live)
    assert view["state"] == "writing" and view["progress"]["accepted"] == 160


def _stream_of(views: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """What GET /v1/jobs/{id}/events sends while the job's view goes through ``views``."""
    import asyncio
    import json

    from serve.app import JobAPI

    row = stored_row(yaml.safe_load(ZOO), "zoo-00000004")
    answers = iter(views)

    async def current(_row: JobRow) -> dict[str, Any]:
        return next(answers)

    async def reread(_job_id: str, _principal: Any) -> JobRow:
        return row

    fake = SimpleNamespace(settings=SimpleNamespace(events_interval_s=0.0), _current=current,
                           _row=reread)

    async def collect() -> list[str]:
        async def key_still_valid() -> None:
            return None

        return [chunk async for chunk in JobAPI.func_or_class._stream(fake, row, None,
                                                                      key_still_valid)]

    events = []
    for chunk in asyncio.run(collect()):
        if chunk.startswith("event: "):
            name, data = chunk.split("\n")[:2]
            events.append((name[len("event: "):], json.loads(data[len("data: "):])))
    return events


def test_the_event_stream_sends_each_change_once_without_the_spec_and_never_goes_back():
    row = stored_row(yaml.safe_load(ZOO), "zoo-00000005")
    base = job_view(row)
    assert "spec" in base

    def at(state: str, accepted: int, updated: float) -> dict[str, Any]:
        return {**base, "state": state, "updated_at": updated,
                "progress": {"accepted": accepted}}

    events = _stream_of([at("running", 1, 1.0), at("running", 1, 2.0), at("running", 5, 3.0),
                         at("writing", 9, 4.0), at("running", 7, 5.0),
                         at("succeeded", 9, 6.0)])
    assert [(name, e["state"], e["progress"]["accepted"]) for name, e in events] == [
        ("progress", "running", 1), ("progress", "running", 5), ("progress", "writing", 9),
        ("end", "succeeded", 9)]
    assert all("spec" not in e for _, e in events)


def test_the_docs_pages_need_nothing_from_the_internet():
    """Swagger UI's and ReDoc's files come from the fastapi-offline package, served under
    /docs/assets."""
    import asyncio
    import re

    from starlette.routing import Mount, Route

    from serve.app import DOCS_ASSETS, app

    mount = next(r for r in app.routes if isinstance(r, Mount) and r.path == DOCS_ASSETS)
    for path in ("/docs", "/redoc"):
        route = next(r for r in app.routes if isinstance(r, Route) and r.path == path)
        request = SimpleNamespace(scope={"root_path": ""})
        html = asyncio.run(route.endpoint(request)).body.decode()
        assert not re.search(r"(src|href)=[\"']?https?://", html), html
        files = re.findall(rf"{DOCS_ASSETS}/([\w.-]+)", html)
        assert any(f.endswith(".js") for f in files), html
        for name in files:
            assert (Path(mount.app.directory) / name).is_file(), name


def test_progress_counts_behind_ones_already_sent_are_held_back():
    from serve.app import _counts_behind

    sent = {"candidates": 12, "accepted": 3, "rejected": 1}
    assert _counts_behind({"candidates": 12, "accepted": 0, "rejected": 1}, sent)
    assert _counts_behind({}, sent)
    assert not _counts_behind({"candidates": 20, "accepted": 3, "rejected": 4}, sent)
    assert not _counts_behind({}, {})


def test_a_replica_keeps_one_first_page_per_set_of_states_without_class_progress(tmp_path):
    """The job list's cache was keyed by the query as spelled (a state repeated, another
    limit or offset) and kept every job's per-class progress: one key holder could fill a
    replica's memory with copies of its pages."""
    import asyncio

    from serve.app import JobAPI, parse_states
    from serve.auth import Principal
    from serve.cache import ReadCache
    from serve.store import JobStore

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    for i in range(5):
        store.create_job(f"job-{i}", "alice", "ds", {"name": "ds"}, f"/out/{i}")
        store.update_job(f"job-{i}", state="succeeded",
                         progress={"accepted": i, "classes": {"cat": {"accepted": i}}})
    store.create_job("job-5", "alice", "ds", {"name": "ds"}, "/out/5")  # no progress yet
    api = SimpleNamespace(store=store, reads=ReadCache(60))
    list_rows = JobAPI.func_or_class._list_rows
    alice = Principal(owner="alice", name="alice")

    async def pages() -> list[Any]:
        out = []
        for state in ("succeeded", "succeeded,succeeded", " succeeded ,succeeded"):
            for limit in (1, 2, 50):
                out.append(await list_rows(api, alice, parse_states(state), limit, 0))
        out.append(await list_rows(api, alice, parse_states("running,succeeded"), 3, 0))
        out.append(await list_rows(api, alice, parse_states("succeeded,running"), 3, 0))
        out.append(await list_rows(api, alice, None, 2, 2))  # a later page: read, not kept
        return out

    found = asyncio.run(pages())
    assert list(api.reads._entries) == [("list", "alice", ("succeeded",)),
                                        ("list", "alice", ("running", "succeeded"))]
    assert api.reads.loads == 2
    rows, total = found[0]
    assert total == 5 and len(rows) == 5 and rows[0].progress == {"accepted": 4}
    page = JobAPI.func_or_class._list_page(found[0], 2, 0)
    assert [j["id"] for j in page["jobs"]] == ["job-4", "job-3"] and page["next_offset"] == 2
    later = JobAPI.func_or_class._list_page(found[-1], 2, 2)
    assert [j["id"] for j in later["jobs"]] == ["job-3", "job-2"]
    assert asyncio.run(list_rows(api, alice, None, 1, 0))[0][0].progress is None
    assert store.get_job("job-4").progress["classes"] == {"cat": {"accepted": 4}}


def test_an_event_stream_held_back_by_counts_behind_stays_alive(monkeypatch):
    """After a lost worker the counts fall (its units are taken back): every view was skipped
    as behind what was sent, with no keep-alive, until they passed their peak, and proxies
    closed the idle stream."""
    import asyncio

    import serve.app as app_mod

    stream_of = app_mod.JobAPI.func_or_class._stream
    # Serve's ingress gives the deployment's methods a namespace of their own
    monkeypatch.setitem(stream_of.__globals__, "KEEP_ALIVE_S", 0.05)
    views = [{"state": "running", "progress": {"candidates": 10, "accepted": 5, "rejected": 5}}]
    views += [{"state": "running", "progress": {"candidates": 4, "accepted": 2,
                                                 "rejected": 2}}] * 8

    async def current(row):
        return views.pop(0) if len(views) > 1 else views[0]

    async def row_of(job_id, principal):
        return row

    async def valid():
        return None

    row = JobRow(id="j-1", owner="o", name="x", state="running", created_at=0.0,
                 updated_at=0.0, output_uri="/out", spec={})
    api = SimpleNamespace(_current=current, _row=row_of,
                          settings=SimpleNamespace(events_interval_s=0.02))
    monkeypatch.setitem(stream_of.__globals__, "event_view",
                        lambda view: {**view, "updated_at": 0})

    async def first_events() -> list[str]:
        out = []
        stream = stream_of(api, row, None, valid, max_s=0.3)
        async for event in stream:
            out.append(event.split("\n", 1)[0])
        return out

    events = asyncio.run(first_events())
    assert events[0] == "event: progress" and ": keep-alive" in events[1:-1]
    assert events[-1] == "event: error"
