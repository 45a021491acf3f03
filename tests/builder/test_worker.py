"""builder.worker: which buffered rows make a worker's next shard; a settled worker process."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from builder.ratelimit import QuotaExceeded
from builder.worker import cut_shard, mixed_take
from builder.writers import shard_order
from tests.processes import run_python


def test_a_shard_takes_the_classes_in_turn_oldest_first():
    labels = ["dog"] * 12 + ["cat"] * 12 + ["bird"] * 3
    picked = mixed_take(labels, 8)
    assert picked == sorted(picked) and len(set(picked)) == 8
    assert Counter(labels[i] for i in picked) == {"bird": 3, "cat": 3, "dog": 2}
    for label in ("dog", "cat", "bird"):
        mine = [i for i, other in enumerate(labels) if other == label]
        taken = [i for i in picked if labels[i] == label]
        assert taken == mine[:len(taken)]


def test_a_shard_of_one_class_is_its_oldest_rows():
    assert mixed_take(["cat"] * 5, 3) == [0, 1, 2]
    assert mixed_take(["cat", "dog"], 2) == [0, 1]


def _parts(labels: list[str], per_part: int) -> list[pa.Table]:
    rows = [{"id": f"{i:016x}", "label": label, "image": bytes([i]) * 10}
            for i, label in enumerate(labels)]
    return [pa.Table.from_pylist(rows[i:i + per_part]) for i in range(0, len(rows), per_part)]


def test_a_cut_shard_is_in_shard_order_and_leaves_the_other_rows():
    labels = ["dog"] * 6 + ["cat"] * 6
    table, rest = cut_shard(_parts(labels, 3), 4)
    ids = table["id"].to_pylist()
    assert shard_order(ids) == list(range(4))
    assert sorted(table["label"].to_pylist()) == ["cat", "cat", "dog", "dog"]
    assert rest is not None and rest.num_rows == 8
    everything = sorted(ids + rest["id"].to_pylist())
    assert everything == [f"{i:016x}" for i in range(12)]
    assert rest["id"].to_pylist() == sorted(rest["id"].to_pylist())  # oldest first still


def test_a_cut_of_one_class_takes_its_oldest_rows_and_the_whole_buffer_leaves_none():
    table, rest = cut_shard(_parts(["cat"] * 10, 4), 6)
    assert sorted(table["id"].to_pylist()) == [f"{i:016x}" for i in range(6)]
    assert rest is not None and rest["id"].to_pylist() == [f"{i:016x}" for i in range(6, 10)]
    table, rest = cut_shard(_parts(["cat"] * 5, 2), 5)
    assert table.num_rows == 5 and rest is None


def test_a_unit_cancelled_before_its_urls_are_checked_still_counts_its_candidates(tmp_path):
    """A cancel that lands between reading a unit's candidates and checking their URLs (a
    narrow window: the test cancels from the services the unit calls in between) must still
    report every candidate, so accepted + rejected == candidates."""
    import asyncio

    from builder.dedup import LocalPartitions
    from builder.quota import QuotaLedger
    from builder.spec import parse_spec
    from builder.units import INLINE, WorkUnit, inline_uid
    from builder.worker import JobPlan, LocalServices, WorkerRuntime

    urls = ["http://127.0.0.1:9/a.jpg", "ftp://127.0.0.1/b.jpg", "http://127.0.0.1:9/c.jpg"]
    spec = parse_spec({"name": "cancel", "target": 5, "classes": {"cat": {"urls": urls}},
                       "download": {"allow_private_networks": True},
                       "output": {"uri": str(tmp_path / "ds")}})

    class CancelOnRooms(LocalServices):
        worker: WorkerRuntime

        async def rooms(self) -> dict[str, int]:
            self.worker.cancel()
            return await super().rooms()

    services = CancelOnRooms(spec, LocalPartitions(4, near=True, k=1).client(),
                             QuotaLedger({"cat": 5}))
    runtime = WorkerRuntime(JobPlan(spec, str(tmp_path / "ds"), "job-1"), services)
    services.worker = runtime
    unit = WorkUnit(inline_uid(0, "cat", 0), 0, INLINE, 0, label="cat", start=0, stop=3)

    async def main():
        await runtime.start()
        try:
            report, _ = await runtime.run(unit)
        finally:
            await runtime.close()
        return report

    report = asyncio.run(main())
    tally = report.classes["cat"]
    assert tally.candidates == 3
    assert tally.accepted == 0 and sum(tally.rejected.values()) == 3
    assert tally.rejected == {"unsupported_scheme": 1, "cancelled": 2}


def test_a_settled_worker_builds_arrays_without_importing_pandas_and_can_still_import_it():
    """pyarrow asks for pandas on its first array; a worker answers that once with pandas
    hidden, and pandas stays importable for whoever needs it."""
    code = ("import sys\n"
            "from builder.worker import settle_process\n"
            "settle_process()\n"
            "import pyarrow as pa\n"
            "pa.Table.from_pylist([{'a': 1}])\n"
            "assert 'pandas' not in sys.modules, 'pyarrow imported pandas'\n"
            "import pandas\n")
    run_python(code)


def test_a_settled_worker_collects_its_young_objects_less_often():
    code = ("import gc\n"
            "from builder.worker import WORKER_GC_YOUNG, settle_process\n"
            "before = gc.get_threshold()\n"
            "settle_process()\n"
            "assert gc.get_threshold() == (WORKER_GC_YOUNG, *before[1:]), gc.get_threshold()\n"
            "assert WORKER_GC_YOUNG > before[0] and gc.get_freeze_count() > 0\n")
    run_python(code)


def test_decisions_waiting_for_their_shard_count_against_the_buffer(tmp_path):
    """Where a unit yields one image a shard takes many units to fill, and each unit's
    decisions wait for it (they are journaled at commit). They count against the worker's
    buffer: it writes a short shard and commits those units, instead of holding them all."""
    import asyncio

    from builder.spec import parse_spec
    from builder.units import INLINE, UnitReport, WorkUnit, inline_uid
    from builder.worker import JobPlan, ShardAssembler

    spec = parse_spec({"name": "sparse", "target": 1000, "classes": {"cat": {}},
                       "sources": [{"engine": "urllist", "path": str(tmp_path / "urls.txt")}],
                       "output": {"uri": str(tmp_path / "ds"), "shard_size": 1000}})
    budget = 64 << 10
    written, journaled = [], []

    class Writer:  # stands in for storage: records what the assembler asks it to write
        def write(self, table, split, number, journal, extra):
            written.append(table.num_rows)

    class Journal:
        def write_unit(self, unit, report, decisions):
            journaled.append(unit.uid)

    class Dedup:
        async def mark_written(self, ids, claims, writing=None):
            return None

    class Services:
        dedup = Dedup()
        shards = 0

        async def next_shard(self, split):
            self.shards += 1
            return self.shards - 1

        async def commit(self, uid, accepted):
            return None

    async def run_io(fn, *args):
        return fn(*args)

    assembler = ShardAssembler(JobPlan(spec, str(tmp_path / "ds"), "job-1", buffer_bytes=budget),
                               Writer(), Journal(), Services(), run_io, run_io)
    decisions = pa.table({"url": [f"http://127.0.0.1:9/gone/{i:06d}.jpg" for i in range(125)],
                          "reason": ["http_404"] * 125})
    assert decisions.nbytes > 4 << 10

    async def main():
        most_pending = 0
        for n in range(100):
            unit = WorkUnit(inline_uid(0, "cat", n), 0, INLINE, 0, label="cat", start=0, stop=1)
            row = pa.table({"id": [f"{n:016x}"], "label": ["cat"], "split": ["train"],
                            "image": [bytes(100)], "_uid": [unit.uid], "_claim": [n + 1],
                            "_sig_a": [0], "_sig_b": [0]})
            await assembler.add(unit, UnitReport(unit.uid), row, decisions, 0)
            most_pending = max(most_pending, len(assembler.pending))
            assert assembler.buffered_bytes <= budget
        await assembler.flush()
        return most_pending

    most_pending = asyncio.run(main())
    assert most_pending <= budget // decisions.nbytes + 1 < 100
    assert len(written) > 1 and sum(written) == 100  # short shards, every image once
    assert sorted(journaled) == sorted(inline_uid(0, "cat", n) for n in range(100))
    assert not assembler.pending and assembler.buffered_bytes == 0


def test_the_in_process_search_limits_count_the_day_in_the_machine_s_file(tmp_path, monkeypatch):
    """Every --local job began the day at 0, so each spent an engine's daily quota anew."""
    from builder.spec import parse_spec
    from builder.units import SEARCH, WorkUnit
    from builder.worker import LocalServices

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    spec = parse_spec({"name": "t", "target": 3, "classes": {"cat": ["q"]},
                       "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:1",
                                    "options": {"max_requests_per_day": 2}}]})
    unit = WorkUnit("u", 0, SEARCH, 0, engine="sandbox", label="cat", query="q")
    first = LocalServices(spec, dedup=None, ledger=None)
    first.acquire(unit)
    later = LocalServices(spec, dedup=None, ledger=None)  # the next job on this machine
    later.acquire(unit)
    with pytest.raises(QuotaExceeded, match="daily quota of 2"):
        LocalServices(spec, dedup=None, ledger=None).acquire(unit)
    assert [p.parent.name for p in tmp_path.rglob("sandbox@127.0.0.1_1-*.json")] == [
        "engine-days"]


def test_the_in_process_search_charges_every_request_of_a_search(tmp_path, monkeypatch):
    """A search of 25 results is three requests to Google: the limiter counted one, so
    a daily quota of 100 let 500 requests through at the default page size."""
    import asyncio

    from builder.engines.base import SearchEngine, SearchPage, count_request
    from builder.errors import EngineError
    from builder.spec import parse_spec
    from builder.units import SEARCH, WorkUnit
    from builder.worker import JobPlan, LocalServices
    from builder.worker_procs import ChannelServices, ServiceHandler

    class ThreeRequests(SearchEngine):
        name = "sandbox"

        def search(self, query, *, label, page, per_page):
            for _ in range(3):
                count_request()
            if query == "fails":
                raise EngineError("sandbox: answered HTTP 503", status=503)
            return SearchPage()

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    spec = parse_spec({"name": "t", "target": 3, "classes": {"cat": ["q"]},
                       "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:1",
                                    "options": {"max_requests_per_job": 6, "rate": 1000}}]})
    ok = WorkUnit("u", 0, SEARCH, 0, engine="sandbox", label="cat", query="q")
    failing = WorkUnit("v", 0, SEARCH, 0, engine="sandbox", label="cat", query="fails")
    engine = ThreeRequests()
    for through_a_worker_process in (False, True):
        local = LocalServices(spec, dedup=None, ledger=None)
        services = local
        if through_a_worker_process:  # the default runner's: calls to the runner's process
            handler = ServiceHandler(local)

            async def call(method, *args):
                answer = getattr(handler, method)(*args)
                return await answer if asyncio.iscoroutine(answer) else answer

            services = ChannelServices(JobPlan(spec, str(tmp_path / "ds"), "job-1"), call)
        assert asyncio.run(services.search(ok, engine)).requests == 3
        with pytest.raises(EngineError):
            asyncio.run(services.search(failing, engine))
        assert local._governor(ok).snapshot()["quota"]["job_used"] == 6
        with pytest.raises(QuotaExceeded, match="job quota of 6"):
            asyncio.run(services.search(ok, engine))


def test_a_relabelled_candidate_keeps_the_claim_the_index_filed_it_under(tmp_path):
    """The index files a candidate under a claim made from its key before the slow level
    runs. ``wrong_class: relabel`` replaces the candidate, and its row and decision then
    carried a claim made from the new label: marking it written matched nothing, so a resent
    unit wrote the image again, and a job resumed from the journal found the image an exact
    duplicate of itself."""
    import asyncio
    import dataclasses

    from builder.dedup import DedupItem, LocalPartitions
    from builder.quota import QuotaLedger
    from builder.records import Candidate, Record
    from builder.spec import parse_spec
    from builder.units import INLINE, WorkUnit, inline_uid
    from builder.worker import JobPlan, LocalServices, UnitRun, WorkerRuntime, _decision_rows

    spec = parse_spec({"name": "relabel", "target": 5,
                       "classes": {"cat": {"urls": ["http://127.0.0.1:9/a.jpg"]}, "dog": []},
                       "output": {"uri": str(tmp_path / "ds")}})
    services = LocalServices(spec, LocalPartitions(8, k=1).client(),
                             QuotaLedger({"cat": 5, "dog": 5}))
    runtime = WorkerRuntime(JobPlan(spec, str(tmp_path / "ds"), "job-1"), services)
    run = UnitRun(runtime, WorkUnit(inline_uid(0, "cat", 0), 0, INLINE, 0, label="cat",
                                    start=0, stop=1))
    record = Record(Candidate("http://127.0.0.1:9/a.jpg", "cat"))
    filed = run.claim(record)
    record.relabelled_from = "cat"
    record.candidate = dataclasses.replace(record.candidate, label="dog")
    assert run.claim(record) == filed
    assert _decision_rows([record], run.claim, run.url_hash)["claim"].to_pylist() == [filed]

    image, sig = 12345, [(1, 2)]

    async def resent_is_written() -> bool:
        client = services.dedup
        item = DedupItem(filed, 1, image, sig, sig)
        await client.decide([item])
        await client.settle([item], [True], [False])
        await client.mark_written([image], [run.claim(record)], writing=7)
        await client.mark_written([image], [run.claim(record)])
        (again,) = await client.decide([DedupItem(filed, 1, image, sig, sig)])
        return bool(again.written) and again.reason is None

    assert asyncio.run(resent_is_written())


def test_a_units_decision_rows_keep_the_checked_url_hash_and_only_a_rejects_rights(tmp_path):
    import asyncio

    from builder.dedup import LocalPartitions, url_hash
    from builder.quota import QuotaLedger
    from builder.reasons import Reason
    from builder.records import Candidate, Record
    from builder.rights import Signal
    from builder.spec import parse_spec
    from builder.units import INLINE, WorkUnit, inline_uid
    from builder.urls import normalise_url
    from builder.worker import JobPlan, LocalServices, UnitRun, WorkerRuntime, _decision_rows

    urls = ["http://127.0.0.1:9/A.jpg?b=2&a=1", "HTTP://127.0.0.1:9/b.jpg", "ftp://x/c.jpg"]
    spec = parse_spec({"name": "rows", "target": 5, "classes": {"cat": {"urls": urls}},
                       "output": {"uri": str(tmp_path / "ds")}})
    services = LocalServices(spec, LocalPartitions(8, k=1).client(), QuotaLedger({"cat": 5}))
    runtime = WorkerRuntime(JobPlan(spec, str(tmp_path / "ds"), "job-1"), services)
    run = UnitRun(runtime, WorkUnit(inline_uid(0, "cat", 0), 0, INLINE, 0, label="cat",
                                    start=0, stop=3))
    ledger = (Signal("robots_txt", "", "robots.txt group '*'", "allow"),)
    run.records = [Record(Candidate(u, "cat"), rights=ledger) for u in urls]
    asyncio.run(run._check_urls())
    kept, dropped, bad = run.records
    assert bad.reason == Reason.UNSUPPORTED_SCHEME.value
    dropped.reject(Reason.NEAR_DUPLICATE, "like another")
    late = Record(Candidate("http://127.0.0.1:9/late.jpg", "cat"), rights=ledger)
    late.reject(Reason.OVER_TARGET, "class already has 5")  # decided before any URL check

    rows = _decision_rows(run.records + [late], run.claim, run.url_hash).to_pylist()
    assert run.url_hashes.keys() == {id(kept), id(dropped)}
    assert [r["url_hash"] for r in rows] == [
        url_hash(normalise_url(u)) for u in urls + ["http://127.0.0.1:9/late.jpg"]]
    assert [r["accepted"] for r in rows] == [True, False, False, False]
    assert rows[0]["rights"] is None
    assert all(r["rights"] == [{"signal": "robots_txt", "value": "",
                                "source": "robots.txt group '*'", "verdict": "allow"}]
               for r in rows[1:])


def _one_thread_worker(tmp_path):
    """A started-to-be worker of one CPU thread (as on Ray), shards of one image, and a unit
    with one accepted row to hand its assembler."""
    from builder.dedup import LocalPartitions
    from builder.quota import QuotaLedger
    from builder.spec import parse_spec
    from builder.units import INLINE, WorkUnit, inline_uid
    from builder.worker import JobPlan, LocalServices, WorkerRuntime

    spec = parse_spec({"name": "upload", "target": 5,
                       "classes": {"cat": {"urls": ["http://127.0.0.1:9/a.jpg"]}},
                       "output": {"uri": str(tmp_path / "ds"), "shard_size": 1}})
    services = LocalServices(spec, LocalPartitions(4, k=1).client(), QuotaLedger({"cat": 5}))
    runtime = WorkerRuntime(JobPlan(spec, str(tmp_path / "ds"), "job-1", cpu_threads=1),
                            services)
    unit = WorkUnit(inline_uid(0, "cat", 0), 0, INLINE, 0, label="cat", start=0, stop=1)
    row = pa.table({"id": [f"{1:016x}"], "label": ["cat"], "split": ["train"],
                    "image": [bytes(100)], "_uid": [unit.uid], "_claim": [1],
                    "_sig_a": [0], "_sig_b": [0]})
    return runtime, unit, row


def test_a_shard_upload_that_hangs_holds_up_neither_validation_nor_the_next_unit(tmp_path):
    """A Ray shard worker has one CPU thread. A shard goes to the store on a storage thread,
    in the background: while an upload to an object store lasts, the unit that filled the
    shard is done and validation (the CPU pool) goes on. Its unit commits once it is written."""
    import asyncio
    import threading

    from builder.journal import UNIT_SCHEMA
    from builder.units import UnitReport

    runtime, unit, row = _one_thread_worker(tmp_path)
    uploading, release = threading.Event(), threading.Event()
    threads: dict[str, str] = {}

    def hanging_write(*args):
        threads["write"] = threading.current_thread().name
        uploading.set()
        release.wait(30)

    async def main() -> tuple[list[str], list[str]]:
        await runtime.start()
        runtime.writer.write = hanging_write
        try:
            await asyncio.wait_for(runtime.assembler.add(
                unit, UnitReport(unit.uid), row, UNIT_SCHEMA.empty_table(), 0), 5)
            assert await asyncio.to_thread(uploading.wait, 10)
            threads["cpu"] = await asyncio.wait_for(
                runtime._io(lambda: threading.current_thread().name), 5)
            before = runtime.assembler.take_committed()
            release.set()
            await asyncio.wait_for(runtime.assembler.flush(), 10)
            return before, runtime.assembler.take_committed()
        finally:
            release.set()
            await runtime.close()

    before, after = asyncio.run(main())
    assert (before, after) == ([], [unit.uid])
    assert threads["write"].startswith("pixcrawler-store")
    assert threads["cpu"].startswith("pixcrawler-cpu")


def test_a_shard_upload_that_fails_fails_the_flush_with_the_stores_error(tmp_path):
    """The upload runs in the background; its error must still reach the job (the next
    shard's write or the flush raises it), never a unit left uncommitted in silence."""
    import asyncio

    from builder.errors import StorageError
    from builder.journal import UNIT_SCHEMA
    from builder.units import UnitReport

    runtime, unit, row = _one_thread_worker(tmp_path)

    def failing_write(*args):
        raise StorageError("could not write shard train-00000 to s3://bucket/ds: denied")

    async def main() -> None:
        await runtime.start()
        runtime.writer.write = failing_write
        try:
            await runtime.assembler.add(unit, UnitReport(unit.uid), row,
                                        UNIT_SCHEMA.empty_table(), 0)
            with pytest.raises(StorageError, match="denied"):
                await asyncio.wait_for(runtime.assembler.flush(), 10)
            assert runtime.assembler.take_committed() == []
        finally:
            await runtime.close()

    asyncio.run(main())


@pytest.mark.parametrize("ending", ["decided", "cancelled"])
def test_a_unit_begun_before_an_index_reset_hands_nothing_over(tmp_path, ending):
    """The unit takes its worker's generation when it begins; a reset (``discard``) while
    it runs makes it stale, whether it ends decided or cancelled: ``IndexLost``, and the
    assembler holds nothing of it (the driver resends it)."""
    import asyncio

    from builder.job import IndexLost
    from builder.worker import UnitRun

    runtime, unit, _ = _one_thread_worker(tmp_path)

    async def main() -> None:
        await runtime.start()
        try:
            run = UnitRun(runtime, unit)
            await runtime.discard()
            with pytest.raises(IndexLost):
                await (run._emit() if ending == "decided" else run._finish_cancelled())
            assert not runtime.assembler.pending and not runtime.assembler.buffers
            fresh = UnitRun(runtime, unit)  # resent, after the reset: hands its rows over
            await fresh._emit()
            assert runtime.assembler.take_committed() == [unit.uid]  # no rows: commits
        finally:
            await runtime.close()

    asyncio.run(main())


def test_a_resent_unit_an_earlier_attempt_committed_keeps_that_attempts_report(tmp_path):
    """A unit commits (its journal file written, the ledger counting its images) and the
    driver never hears of it: its worker is lost, or an index reset drops the commits not
    yet sent. The driver resends it. The rerun found the class filled by its own images,
    left every candidate unused, journaled a report of nothing over the first and
    committed: the shards held images no count had, and publishing failed for good."""
    import asyncio
    import dataclasses

    from builder.dedup import LocalPartitions
    from builder.journal import UNIT_SCHEMA, Journal
    from builder.quota import QuotaLedger
    from builder.spec import parse_spec
    from builder.units import INLINE, ClassTally, UnitReport, WorkUnit, inline_uid
    from builder.worker import JobPlan, LocalServices, WorkerRuntime

    uri = str(tmp_path / "ds")
    urls = [f"http://127.0.0.1:9/{i}.jpg" for i in range(5)]
    spec = parse_spec({"name": "t", "target": 5, "classes": {"cat": {"urls": urls}},
                       "output": {"uri": uri}})
    uid = inline_uid(0, "cat", 0)
    first = WorkUnit(uid, 0, INLINE, 0, engine="inline", label="cat", start=0, stop=5)
    report = UnitReport(uid)
    report.classes["cat"] = ClassTally(5, 5, Counter())
    journal = Journal(uri, "job-1")
    journal.start(spec)
    journal.write_unit(first, report, UNIT_SCHEMA.empty_table())
    ledger = QuotaLedger({"cat": 5})
    ledger.grant(uid, {"cat": 5})
    ledger.commit(uid, {"cat": 5})
    services = LocalServices(spec, LocalPartitions(8, k=1).client(), ledger)

    async def rerun():
        runtime = WorkerRuntime(JobPlan(spec, uri, "job-1"), services)
        await runtime.start()
        try:
            again = dataclasses.replace(first, attempt=1)
            return await runtime.run(again), await runtime.flush()
        finally:
            await runtime.close()

    (again, events), flushed = asyncio.run(rerun())
    assert (again.classes["cat"].candidates, again.classes["cat"].accepted) == (5, 5)
    assert uid in events.committed + flushed.committed
    [(_, kept)] = list(Journal(uri, "job-1").iter_unit_reports())
    assert kept.classes["cat"].accepted == 5
    assert ledger.accepted["cat"] == 5 and ledger.rooms() == {"cat": 0}


@pytest.mark.parametrize("kind", ["search", "inline"])
def test_a_resent_unit_decides_every_candidate_whatever_room_is_left(tmp_path, kind):
    """A resent unit (or one a killed run left half-written) may have written the images of
    any of its candidates. Its rerun left the candidates past the class's room unused (or,
    for a search, past the cap that room gives), so written images among them were never
    decided and stayed in shards no count held: publishing failed for good. Each now goes on
    to be decided; here the fetches fail, so each ends a reject, none unused."""
    import asyncio
    import dataclasses

    from builder.dedup import LocalPartitions
    from builder.engines.base import SearchHit, SearchPage
    from builder.quota import QuotaLedger
    from builder.spec import parse_spec
    from builder.units import INLINE, SEARCH, WorkUnit
    from builder.worker import JobPlan, LocalServices, WorkerRuntime

    urls = [f"http://127.0.0.1:9/{i}.jpg" for i in range(6)]
    spec = parse_spec({"name": "t", "target": 6, "classes": {"cat": {"urls": urls}},
                       "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:1",
                                    "per_page": 6}],
                       "download": {"allow_private_networks": True, "timeout_s": 1,
                                    "retries": 0},
                       "output": {"uri": str(tmp_path / "ds")}})

    class Hits(LocalServices):
        async def search(self, unit, engine):
            return SearchPage([SearchHit(url=u, rank=i) for i, u in enumerate(urls)])

    # search: one image of room left, a cap of 2 hits; inline: no room left
    ledger = QuotaLedger({"cat": 6}, {"cat": 5 if kind == "search" else 6})
    services = Hits(spec, LocalPartitions(8, k=1).client(), ledger)
    unit = (WorkUnit("u", 0, SEARCH, 0, engine="sandbox", label="cat", query="q", per_page=6)
            if kind == "search" else
            WorkUnit("u", 0, INLINE, 0, engine="inline", label="cat", start=0, stop=6))

    async def run(unit):
        runtime = WorkerRuntime(JobPlan(spec, str(tmp_path / "ds"), "job-1"), services)
        await runtime.start()
        try:
            return (await runtime.run(unit))[0]
        finally:
            await runtime.close()

    first = asyncio.run(run(unit)).classes["cat"]
    assert first.unused == (4 if kind == "search" else 6)  # a first attempt: as before
    again = asyncio.run(run(dataclasses.replace(unit, uid="v", attempt=1))).classes["cat"]
    assert again.unused == 0 and again.candidates == 6 and sum(again.rejected.values()) == 6


def _written_row(uid: str, label: str, url: str, found_under: str = "") -> dict:
    """A journal shard row of an image unit ``uid`` wrote, its candidate found under
    ``found_under`` (default: ``label``)."""
    import hashlib

    from builder.dedup import claim_of
    from builder.records import candidate_key

    sha = hashlib.sha256(url.encode()).hexdigest()
    return {"id": sha[:16], "uid": uid, "label": label, "split": "train", "sha256": sha,
            "url": url, "format": "jpeg", "width": 64, "height": 48, "bytes": 1234,
            "claim": claim_of(f"{uid}\n{candidate_key(found_under or label, url)}"),
            "rights": [{"signal": "xmp_datamining", "value": "allowed", "source": "XMP (test)",
                        "verdict": "allow"}]}


def test_a_resent_unit_takes_back_the_images_an_earlier_attempt_wrote_without_a_fetch(
        tmp_path):
    """A resent unit (its worker lost, or a killed job resumed) fetched every candidate
    again. An image an earlier attempt had written into a committed shard, whose fetch now
    failed, ended a reject; one whose candidate the search no longer returned was never
    decided. Either way its shard kept an image no count had, and publishing failed on every
    --resume. Both are now taken back from the journal's shard rows as accepted, written,
    and counted once."""
    import asyncio

    from builder.dedup import LocalPartitions
    from builder.engines.base import SearchHit, SearchPage
    from builder.journal import SHARD_SCHEMA, Journal
    from builder.quota import QuotaLedger
    from builder.records import with_columns
    from builder.spec import parse_spec
    from builder.units import SEARCH, WorkUnit
    from builder.worker import JobPlan, LocalServices, WorkerRuntime

    uri = str(tmp_path / "ds")
    urls = [f"http://127.0.0.1:9/{i}.jpg" for i in range(4)]  # nothing listens: each fails
    spec = parse_spec({"name": "t", "target": 6, "classes": {"cat": None, "dog": None},
                       "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:1",
                                    "per_page": 4}],
                       "download": {"allow_private_networks": True, "timeout_s": 1,
                                    "retries": 0},
                       "output": {"uri": uri}})
    journal = Journal(uri, "job-1")
    journal.start(spec)
    rows = [_written_row("u", "cat", urls[0]),  # found again; its fetch fails now
            _written_row("u", "cat", "http://127.0.0.1:9/gone.jpg"),  # not found again
            _written_row("u", "dog", "http://127.0.0.1:9/moved.jpg", found_under="cat"),
            _written_row("other", "cat", "http://127.0.0.1:9/else.jpg")]
    rows.append(dict(rows[0]))  # a URL this unit found twice, written twice before a fix
    schema = pa.schema([SHARD_SCHEMA.field(name) for name in rows[0]])
    journal.write_shard("train-00000", with_columns(pa.Table.from_pylist(rows, schema=schema),
                                                    SHARD_SCHEMA, SHARD_SCHEMA.names))

    class Hits(LocalServices):
        async def search(self, unit, engine):
            return SearchPage([SearchHit(url=u, rank=i) for i, u in enumerate(urls)])

    ledger = QuotaLedger({"cat": 6, "dog": 6})
    services = Hits(spec, LocalPartitions(8, k=1).client(), ledger)
    unit = WorkUnit("u", 0, SEARCH, 0, engine="sandbox", label="cat", query="q", per_page=4,
                    attempt=1)

    async def rerun():
        runtime = WorkerRuntime(JobPlan(spec, uri, "job-1"), services)
        await runtime.start()
        try:
            report, _ = await runtime.run(unit)
            await runtime.flush()
            return report
        finally:
            await runtime.close()

    report = asyncio.run(rerun())
    cat, dog = report.classes["cat"], report.classes["dog"]
    assert (cat.candidates, cat.accepted, sum(cat.rejected.values())) == (6, 3, 3)
    assert (dog.candidates, dog.accepted) == (1, 1)
    assert report.relabelled == {("cat", "dog"): 1}
    assert report.rights.counts["xmp_datamining"]["allowed"] == 4  # their ledgers, as written
    assert ledger.accepted == {"cat": 3, "dog": 1}
    [(_, journaled)] = list(Journal(uri, "job-1").iter_unit_reports())
    assert journaled.accepted == {"cat": 3, "dog": 1}
    decisions = next(Journal(uri, "job-1").iter_tables("units")).to_pylist()
    assert sorted(r["image_id"] for r in decisions if r["accepted"]) == \
        sorted(r["id"] for r in rows[:3] + rows[4:])
    assert not list((tmp_path / "ds" / "data").glob("*.parquet"))  # nothing written again


@pytest.mark.parametrize("kept_row", [False, True], ids=["alone", "beside-a-kept-row"])
def test_a_retried_slice_naming_one_reject_twice_accepts_one_image(tmp_path, monkeypatch,
                                                                   kept_row):
    """A dataset built before one unit's twice-named URL became a duplicate_url could keep two
    transient rejects of one key. Retried in one slice, both shared a claim, which the index
    answers as the candidate's own: beside a kept row of that key (``done``, as the index
    loads a published reject), both were fetched and accepted, one image twice."""
    import asyncio

    from builder.dedup import LocalPartitions, claim_of, url_hash
    from builder.journal import Journal
    from builder.quota import QuotaLedger
    from builder.records import Candidate
    from builder.sandbox import SandboxWeb
    from builder.spec import parse_spec
    from builder.units import RETRY, WorkUnit
    from builder.urls import normalise_url
    from builder.worker import JobPlan, LocalServices, UnitRun, WorkerRuntime

    uri = str(tmp_path / "ds")
    spec = parse_spec({"name": "t", "target": 5, "classes": {"cat": None},
                       "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:1"}],
                       "download": {"allow_private_networks": True, "timeout_s": 5,
                                    "retries": 0},
                       "output": {"uri": uri}})
    Journal(uri, "job-1").start(spec)
    with SandboxWeb(classes=("cat",), images_per_class=1) as web:
        url = web.class_image_urls("cat")[0]
        parts = LocalPartitions(8, k=1)
        client = parts.client()
        if kept_row:
            key = Candidate(url=url, label="cat").key
            for p, payload in enumerate(client.load_payloads(
                    [(url_hash(normalise_url(url)), claim_of(key))], [], done=True)):
                if payload:
                    parts.partitions[p].load(payload)

        async def twice(self):
            return [Candidate(url=url, label="cat"), Candidate(url=url, label="cat")]

        monkeypatch.setattr(UnitRun, "_candidates", twice)
        services = LocalServices(spec, client, QuotaLedger({"cat": 5}))

        async def run():
            runtime = WorkerRuntime(JobPlan(spec, uri, "job-1"), services)
            await runtime.start()
            try:
                report, _ = await runtime.run(WorkUnit("r-00000000", 0, RETRY, 0, slice=0))
                await runtime.flush()
                return report
            finally:
                await runtime.close()

        cat = asyncio.run(run()).classes["cat"]
    assert (cat.candidates, cat.accepted, dict(cat.rejected)) == (2, 1, {"duplicate_url": 1})
    assert sum(pq.read_metadata(p).num_rows for p in (tmp_path / "ds" / "data").glob("*")) == 1


@pytest.fixture
def one_image_server():
    """Serves one picture at every ``*.jpg`` path, on 127.0.0.1: the same JPEG, or, under
    ``/q60/``, another encoding of it (other bytes, a near copy), or under ``/other/``
    another picture."""
    import http.server
    import threading

    from tests.images import jpeg

    bodies = {"/q60/": jpeg(7, quality=60), "/other/": jpeg(8)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            found = self.path.endswith(".jpg")
            body = bodies.get(self.path[:self.path.find("/", 1) + 1], jpeg(7)) if found else b""
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def _one_slice(monkeypatch, urls: list[tuple[str, str]]):
    """A list-slice unit whose candidates are ``urls`` ((url, label) in order)."""
    from builder.records import Candidate
    from builder.units import INLINE, WorkUnit
    from builder.worker import UnitRun

    async def candidates(self):
        return [Candidate(url=url, label=label, engine="urllist", rank=i)
                for i, (url, label) in enumerate(urls)]

    monkeypatch.setattr(UnitRun, "_candidates", candidates)
    return WorkUnit("l00-00000000", 1, INLINE, 1, label=urls[0][1], start=0, stop=len(urls))


def _report_of(runtime, unit):
    """``unit``'s report, run alone on ``runtime`` (started and closed here)."""
    import asyncio

    async def main():
        await runtime.start()
        try:
            return (await runtime.run(unit))[0]
        finally:
            await runtime.close()

    return asyncio.run(main())


class _Clip:
    """A CLIP stand-in: every picture has the embedding ``image``; a prompt, ``text(prompt)``."""

    def __init__(self, image, text):
        self.image, self.text = image, text

    def load(self):
        pass

    def preprocess(self, images):
        import numpy as np

        return np.zeros((len(images), 1), np.float32)

    def encode_images(self, pixels):
        import numpy as np

        return np.tile(np.asarray(self.image, np.float32), (len(pixels), 1))

    def encode_texts(self, texts):
        import numpy as np

        return np.array([self.text(t) for t in texts], np.float32)


def _cat_then_dog(runtime, a_reached, a_released):
    """Units A (cat) and B (dog), one candidate each, on ``runtime``: A starts, B runs whole once
    ``a_reached()`` (awaited) returns, then A is let go on (``a_released`` set) and ends.
    Returns their reports."""
    import asyncio

    from builder.units import INLINE, WorkUnit, inline_uid

    unit_a = WorkUnit(inline_uid(1, "cat", 0), 1, INLINE, 1, label="cat", start=0, stop=1)
    unit_b = WorkUnit(inline_uid(1, "dog", 0), 2, INLINE, 1, label="dog", start=0, stop=1)

    async def main():
        await runtime.start()
        try:
            a = asyncio.create_task(runtime.run(unit_a))
            await a_reached()
            b = (await runtime.run(unit_b))[0]
            a_released.set()
            return (await a)[0], b
        finally:
            await runtime.close()

    return asyncio.run(main())


def _two_class_spec(tmp_path, urls: dict[str, str]):
    from builder.spec import parse_spec

    return parse_spec({"name": "t", "target": 5,
                       "classes": {label: {"urls": [url]} for label, url in urls.items()},
                       "download": {"allow_private_networks": True, "timeout_s": 5,
                                    "retries": 0},
                       "output": {"uri": str(tmp_path / "ds")}})


@pytest.mark.parametrize("later", ["off_topic", "over_target", "never"])
def test_a_copy_of_an_image_another_unit_refuses_later_is_kept(tmp_path, one_image_server,
                                                               monkeypatch, later):
    """Units A (cat) and B (dog) find the same bytes. B reached the index while A's image was
    undecided (A waiting on its slow level or its grant) and was rejected as its duplicate at
    once; A's image was then refused, and neither copy was kept. B now waits for A and is kept.
    An image that stays undecided (``never``: its unit hangs, or was lost) holds B up to
    ``HOLD_WAIT_S`` only, after which B is the duplicate it would be."""
    import asyncio

    import builder.worker as worker_module
    from builder.dedup import LocalPartitions
    from builder.quota import QuotaLedger
    from builder.reasons import Reason
    from builder.units import POS_BITS
    from builder.worker import JobPlan, LocalServices, WorkerRuntime

    # only "never" waits the hold out; in the others a hold that is never ended fails in 10 s
    monkeypatch.setattr(worker_module, "HOLD_WAIT_S", 0.3 if later == "never" else 10)
    monkeypatch.setattr(worker_module, "HOLD_WAIT_SLOW_S", 10)  # off_topic's, a slow level
    spec = _two_class_spec(tmp_path, {"cat": f"{one_image_server}/cat/a.jpg",
                                      "dog": f"{one_image_server}/dog/b.jpg"})
    a_indexed, b_decided, a_released = asyncio.Event(), asyncio.Event(), asyncio.Event()

    class Services(LocalServices):
        @property
        def slow(self):
            return later == "off_topic"

        async def score(self, records, pool):  # the CLIP scorer's verdict, after B's check
            for r in records:
                if r.label == "cat":
                    await b_decided.wait()
                    r.reject(Reason.OFF_TOPIC, "similarity below clip_threshold")
            return records

        async def grant(self, uid, wants, floor):  # the ledger's answer, after B's check
            if "cat" in wants and later != "off_topic":
                await b_decided.wait()
                if later == "never":
                    await a_released.wait()
                else:
                    return {**await super().grant(uid, wants, floor), "cat": 0}
            return await super().grant(uid, wants, floor)

    client = LocalPartitions(4, k=1).client()
    decide = client.decide

    async def traced(items):
        out = await decide(items)
        units = {it.token >> POS_BITS for it in items}
        if 1 in units:
            a_indexed.set()
        if 2 in units:
            b_decided.set()
        return out

    client.decide = traced
    runtime = WorkerRuntime(JobPlan(spec, str(tmp_path / "ds"), "job-1"),
                            Services(spec, client, QuotaLedger({"cat": 5, "dog": 5})))
    a, b = _cat_then_dog(runtime, a_indexed.wait, a_released)  # A's index first
    cat, dog = a.classes["cat"], b.classes["dog"]
    assert cat.candidates == dog.candidates == 1
    if later == "never":
        assert (cat.accepted, dog.accepted, dict(dog.rejected)) == (1, 0, {"exact_duplicate": 1})
        return
    assert (cat.accepted, dict(cat.rejected)) == (0, {later: 1})
    assert (dog.accepted, dict(dog.rejected)) == (1, {})


def test_a_copy_of_an_image_its_own_unit_refuses_later_is_kept(tmp_path, one_image_server,
                                                               monkeypatch):
    """One unit (a list slice naming both classes) holds the same bytes twice: the index
    kept the first copy and rejected the second at once, and the slow level then refused the
    first for its class. The second now waits for the first's fate and is kept."""
    from builder.dedup import LocalPartitions
    from builder.quota import QuotaLedger
    from builder.reasons import Reason
    from builder.worker import JobPlan, LocalServices, WorkerRuntime

    cat_url, dog_url = f"{one_image_server}/x/a.jpg", f"{one_image_server}/y/b.jpg"
    spec = _two_class_spec(tmp_path, {"cat": cat_url, "dog": dog_url})
    unit = _one_slice(monkeypatch, [(cat_url, "cat"), (dog_url, "dog")])
    scored: list[str] = []

    class Services(LocalServices):
        slow = True

        async def score(self, records, pool):
            for r in records:
                scored.append(r.label)
                if r.label == "cat":
                    r.reject(Reason.OFF_TOPIC, "similarity below clip_threshold")
            return records

    runtime = WorkerRuntime(JobPlan(spec, str(tmp_path / "ds"), "job-1"),
                            Services(spec, LocalPartitions(4, k=1).client(),
                                     QuotaLedger({"cat": 5, "dog": 5})))
    report = _report_of(runtime, unit)
    assert {label: (c.accepted, dict(c.rejected)) for label, c in report.classes.items()} == {
        "cat": (0, {"off_topic": 1}), "dog": (1, {})}
    assert sorted(scored) == ["cat", "dog"]


def test_a_copy_kept_after_waiting_is_not_refused_by_the_slow_levels_store(tmp_path,
                                                                          one_image_server,
                                                                          monkeypatch):
    """The slow level's embedding store takes an image in when the level keeps it, and lets it
    go when the unit's decision reaches it. A near copy held for that image (refused here by
    the grant) was then released, kept by the index and scored against the store before the
    decision reached it: refused as the embedding duplicate of an image the dataset does not
    hold. The store learns each round's refusals before the next round."""
    from builder.dedup import LocalPartitions
    from builder.quota import QuotaLedger
    from builder.slow import SlowValidator
    from builder.worker import JobPlan, LocalServices, WorkerRuntime

    cat_url, dog_url = f"{one_image_server}/cat/a.jpg", f"{one_image_server}/q60/b.jpg"
    spec = _two_class_spec(tmp_path, {"cat": cat_url, "dog": dog_url})
    object.__setattr__(spec.validation, "embedding_dedup_threshold", 0.95)
    unit = _one_slice(monkeypatch, [(cat_url, "cat"), (dog_url, "dog")])
    same = [0.5] * 4  # every picture the same embedding, on topic for every class
    slow = SlowValidator(["cat", "dog"], nsfw=None, clip=_Clip(same, lambda _: same),
                         clip_threshold=-1.0,
                         wrong_class="ignore", embedding_dedup_threshold=0.95)

    class Services(LocalServices):
        async def grant(self, uid, wants, floor):  # cat is full by the time of the grant
            out = await super().grant(uid, wants, floor)
            return {**out, "cat": floor.get("cat", 0)} if "cat" in out else out

    runtime = WorkerRuntime(JobPlan(spec, str(tmp_path / "ds"), "job-1"),
                            Services(spec, LocalPartitions(8, k=1).client(),
                                     QuotaLedger({"cat": 5, "dog": 5}), slow=slow))
    report = _report_of(runtime, unit)
    assert {label: (c.accepted, dict(c.rejected)) for label, c in report.classes.items()} == {
        "cat": (0, {"over_target": 1}), "dog": (1, {})}


@pytest.mark.parametrize("later", ["over_target", "never"])
def test_a_near_copy_by_embedding_of_an_image_another_unit_refuses_later_is_kept(
        tmp_path, one_image_server, monkeypatch, later):
    """Units A (cat) and B (dog) find two pictures the slow level's embeddings call the same.
    A's was kept by the level, then waited for its grant; B's was meanwhile rejected as the
    embedding duplicate of A's, which the grant then refused (the class full): neither was
    kept. B now waits for A's and is scored again. One that stays undecided (``never``)
    holds B up to the slow level's wait only."""
    import asyncio

    import builder.worker as worker_module
    from builder.dedup import LocalPartitions
    from builder.quota import QuotaLedger
    from builder.slow import SlowValidator
    from builder.worker import JobPlan, LocalServices, WorkerRuntime

    # only "never" waits the hold out; in the other a hold that is never ended fails in 10 s
    monkeypatch.setattr(worker_module, "HOLD_WAIT_SLOW_S", 0.5 if later == "never" else 10)
    spec = _two_class_spec(tmp_path, {"cat": f"{one_image_server}/cat/a.jpg",
                                      "dog": f"{one_image_server}/other/b.jpg"})
    object.__setattr__(spec.validation, "embedding_dedup_threshold", 0.95)
    same = [0.5] * 4
    slow = SlowValidator(["cat", "dog"], nsfw=None, clip=_Clip(same, lambda _: same),
                         clip_threshold=-1.0, wrong_class="ignore",
                         embedding_dedup_threshold=0.95)
    b_scored, a_released = asyncio.Event(), asyncio.Event()
    scores: Counter = Counter()
    emitted = []
    emit = worker_module.UnitRun._emit

    async def traced_emit(self):
        emitted.extend(self.records)
        await emit(self)

    monkeypatch.setattr(worker_module.UnitRun, "_emit", traced_emit)

    class Services(LocalServices):
        async def score(self, records, pool):
            out = await super().score(records, pool)
            for r in records:
                scores[r.label] += 1
                if r.label == "dog":
                    b_scored.set()
            return out

        async def grant(self, uid, wants, floor):  # A's grant, after B was scored
            if "cat" in wants:
                await b_scored.wait()
                if later == "never":
                    await a_released.wait()
                else:
                    return {**await super().grant(uid, wants, floor), "cat": 0}
            return await super().grant(uid, wants, floor)

    runtime = WorkerRuntime(JobPlan(spec, str(tmp_path / "ds"), "job-1"),
                            Services(spec, LocalPartitions(4, k=1).client(),
                                     QuotaLedger({"cat": 5, "dog": 5}), slow=slow))

    async def a_scored():
        while not scores["cat"]:
            await asyncio.sleep(0.01)

    a, b = _cat_then_dog(runtime, a_scored, a_released)
    cat, dog = a.classes["cat"], b.classes["dog"]
    if later == "never":
        assert (cat.accepted, dog.accepted, dict(dog.rejected)) == (1, 0, {"near_duplicate": 1})
        [detail] = [r.detail for r in emitted if r.label == "dog"]
        assert detail.startswith("embedding cosine 1.0000 to ") and "still undecided" in detail
        return
    assert (cat.accepted, dict(cat.rejected)) == (0, {"over_target": 1})
    assert (dog.accepted, dict(dog.rejected)) == (1, {})
    assert scores["dog"] >= 2  # scored again once A's was settled
    assert slow._kept.ids and not slow._pending


def test_copies_of_an_image_their_unit_refuses_share_its_verdict_without_asking_again(
        tmp_path, one_image_server, monkeypatch):
    """Twelve copies of one picture in one unit, the first refused by the slow level: each
    other copy waited, then went through the index and the slow level again, one a round.
    Same bytes and class get the same verdict: they take the first's in the same round."""
    from builder.dedup import LocalPartitions
    from builder.quota import QuotaLedger
    from builder.reasons import Reason
    from builder.worker import JobPlan, LocalServices, WorkerRuntime

    urls = [f"{one_image_server}/cat/{i}.jpg" for i in range(12)]
    spec = _two_class_spec(tmp_path, {"cat": urls[0]})
    unit = _one_slice(monkeypatch, [(url, "cat") for url in urls])
    calls: Counter = Counter()

    class Services(LocalServices):
        slow = True

        async def score(self, records, pool):
            calls["score"] += 1
            for r in records:
                r.reject(Reason.NSFW, "nsfw score 0.99")
            return records

    client = LocalPartitions(4, k=1).client()
    decide = client.decide

    async def counted(items):
        calls["decide"] += 1
        return await decide(items)

    client.decide = counted
    runtime = WorkerRuntime(JobPlan(spec, str(tmp_path / "ds"), "job-1"),
                            Services(spec, client, QuotaLedger({"cat": 5})))
    cat = _report_of(runtime, unit).classes["cat"]
    assert (cat.candidates, cat.accepted, dict(cat.rejected)) == (12, 0, {"nsfw": 12})
    assert calls == {"decide": 1, "score": 1}


def test_an_accepted_copy_of_an_image_refused_in_another_class_stays_in_the_slow_store(
        tmp_path, one_image_server, monkeypatch):
    """One unit finds the same bytes as a dog and as a cat; the slow level refuses the dog
    (wrong class), the cat copy waits for it, is scored and accepted. The store is keyed by
    the image's id: settling the unit's refused dog after the cat took the accepted cat's
    entry out, and later copies of it were kept."""
    from builder.dedup import LocalPartitions
    from builder.quota import QuotaLedger
    from builder.slow import SlowValidator
    from builder.worker import JobPlan, LocalServices, WorkerRuntime

    dog_url, cat_url = f"{one_image_server}/dog/a.jpg", f"{one_image_server}/cat/b.jpg"
    spec = _two_class_spec(tmp_path, {"cat": cat_url, "dog": dog_url})
    object.__setattr__(spec.validation, "embedding_dedup_threshold", 0.95)
    unit = _one_slice(monkeypatch, [(dog_url, "dog"), (cat_url, "cat")])  # same bytes
    cat, dog = [1, 0, 0, 0], [0, 1, 0, 0]  # every picture is a cat
    slow = SlowValidator(["cat", "dog"], nsfw=None,
                         clip=_Clip(cat, lambda prompt: cat if "cat" in prompt else dog),
                         clip_threshold=0.5,
                         wrong_class="reject", embedding_dedup_threshold=0.95)
    runtime = WorkerRuntime(JobPlan(spec, str(tmp_path / "ds"), "job-1"),
                            LocalServices(spec, LocalPartitions(4, k=1).client(),
                                          QuotaLedger({"cat": 5, "dog": 5}), slow=slow))
    report = _report_of(runtime, unit)
    assert {label: (c.accepted, dict(c.rejected)) for label, c in report.classes.items()} == {
        "cat": (1, {}), "dog": (0, {"wrong_class": 1})}
    assert len(slow._kept.ids) == 1 and not slow._pending


def test_a_resent_units_copies_waiting_when_the_job_is_cancelled_are_cancelled(
        tmp_path, one_image_server):
    """A resent unit's stages run on through a cancel; its copies waiting for another
    unit's image were rejected as duplicates, which a continuation never decides again,
    while that image's unit was cancelled and decided again (and could be refused): they
    end cancelled, as that unit's images do."""
    import asyncio

    from builder.dedup import LocalPartitions
    from builder.quota import QuotaLedger
    from builder.units import INLINE, WorkUnit, inline_uid
    from builder.worker import JobPlan, LocalServices, WorkerRuntime

    spec = _two_class_spec(tmp_path, {"cat": f"{one_image_server}/cat/a.jpg",
                                      "dog": f"{one_image_server}/dog/b.jpg"})
    a_granting, release = asyncio.Event(), asyncio.Event()

    class Services(LocalServices):
        async def grant(self, uid, wants, floor):  # A's grant hangs until released
            if "cat" in wants:
                a_granting.set()
                await release.wait()
            return await super().grant(uid, wants, floor)

    runtime = WorkerRuntime(JobPlan(spec, str(tmp_path / "ds"), "job-1"),
                            Services(spec, LocalPartitions(4, k=1).client(),
                                     QuotaLedger({"cat": 5, "dog": 5})))
    unit_a = WorkUnit(inline_uid(1, "cat", 0), 1, INLINE, 1, label="cat", start=0, stop=1)
    unit_b = WorkUnit(inline_uid(1, "dog", 0), 2, INLINE, 1, label="dog", start=0, stop=1,
                      attempt=1)

    async def main():
        await runtime.start()
        try:
            a = asyncio.create_task(runtime.run(unit_a))
            await a_granting.wait()
            b = asyncio.create_task(runtime.run(unit_b))
            await asyncio.sleep(0.5)  # B decides, is held, and waits
            runtime.cancel()
            dog = (await asyncio.wait_for(b, 10))[0].classes["dog"]
            release.set()
            await a
            return dog
        finally:
            await runtime.close()

    dog = asyncio.run(main())
    assert (dog.candidates, dog.accepted, dict(dog.rejected)) == (1, 0, {"cancelled": 1})
