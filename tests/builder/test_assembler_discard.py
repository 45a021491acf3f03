"""builder.worker.ShardAssembler: a discard (an index reset) that comes while a shard is being
written keeps none of the dropped units' rows, and returns only once a shard already being
written is marked written, so their resent runs write each image once."""

from __future__ import annotations

import asyncio
from collections import Counter

import pyarrow as pa
import pytest

from builder.spec import parse_spec
from builder.units import SEARCH, UnitReport, WorkUnit
from builder.worker import _BUFFER_SCHEMA, JobPlan, ShardAssembler, _decision_rows


NO_DECISIONS = _decision_rows([], lambda r: 0, lambda r: 0)
"""A unit's decisions, journaled at its commit: their contents play no part here."""


def _rows(uid: str, number: int, label: str, ids: list[int]) -> pa.Table:
    return pa.Table.from_pylist([{"id": f"{number:010x}{i:06x}", "label": label,
                                  "split": "train", "_uid": uid, "_claim": i + 1}
                                 for i in ids], schema=_BUFFER_SCHEMA)


@pytest.mark.parametrize("stage", ["cut_shard", "next_shard", "mark_writing", "write",
                                   "mark_written"])
def test_a_discard_during_a_shard_write_keeps_none_of_the_dropped_units_rows(tmp_path, stage):
    """Two classes, shards of 2: the second unit's 4 rows make 8 buffered, and its ``add``
    writes a shard. The discard comes while that write waits at ``stage``. Nothing of the two
    units stays buffered or is written later (only the shard already being written, at
    ``write`` or ``mark_written``, lands, and the discard returns once it is marked written);
    resent, they write every image exactly once."""
    spec = parse_spec({"name": "t", "target": 50, "classes": {"cat": ["q"], "dog": ["q"]},
                       "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:1"}],
                       "output": {"uri": str(tmp_path / "ds"), "shard_size": 2}})
    written: list[list[str]] = []
    marked: list[list[int]] = []
    reached, release = asyncio.Event(), asyncio.Event()

    async def stop_at(name: str) -> None:  # the one await the discard comes at
        if name == stage and not reached.is_set():
            reached.set()
            await release.wait()

    class Writer:
        def write(self, table, split, number, journal, extra):
            written.append(table["id"].to_pylist())

    class Journal:
        def write_unit(self, unit, report, decisions):
            return None

    class Dedup:
        async def mark_written(self, ids, claims, writing=None):
            await stop_at("mark_writing" if writing is not None else "mark_written")
            if writing is None:
                marked.append(list(ids))

    class Services:
        dedup = Dedup()
        shards = 0

        async def next_shard(self, split):
            await stop_at("next_shard")
            self.shards += 1
            return self.shards

        async def commit(self, uid, accepted):
            return None

    async def run_io(fn, *args):
        await stop_at(fn.__name__)  # cut_shard, write (the writer's), write_unit
        return fn(*args)

    assembler = ShardAssembler(JobPlan(spec, str(tmp_path / "ds"), "job-1"), Writer(),
                               Journal(), Services(), run_io, run_io)
    units = {"cat": WorkUnit("uA", 0, SEARCH, 0, label="cat"),
             "dog": WorkUnit("uB", 1, SEARCH, 0, label="dog")}

    async def main() -> list[str]:
        await assembler.add(units["cat"], UnitReport("uA"), _rows("uA", 1, "cat", [0, 1, 2, 3]),
                            NO_DECISIONS, 0)
        adding = asyncio.ensure_future(assembler.add(
            units["dog"], UnitReport("uB"), _rows("uB", 2, "dog", [0, 1, 2, 3]), NO_DECISIONS,
            0))
        await asyncio.wait_for(reached.wait(), 10)
        in_write = stage in ("write", "mark_written")
        dropping = asyncio.ensure_future(assembler.discard())
        await asyncio.sleep(0.05)
        assert dropping.done() is not in_write  # it waits only for a shard being written
        assert [t.num_rows for ts in assembler.buffers.values() for t in ts] == []
        assert assembler.buffered_bytes == 0 and not assembler.pending
        release.set()
        dropped = await asyncio.wait_for(dropping, 10)
        # When it returns, the resent units can see every image already written as such.
        assert len(written) == in_write
        assert marked == [[int(i, 16) for i in ids] for ids in written]
        await adding
        assert [t.num_rows for ts in assembler.buffers.values() for t in ts] == []
        assert assembler.buffered_bytes == 0 and not assembler.pending
        await assembler.flush()
        assert len(written) == in_write
        # Resent: the images already in a shard are kept as they are, not rows again.
        done = {i for ids in written for i in ids}
        for number, (label, unit) in enumerate(units.items(), 1):
            ids = [i for i in range(4) if f"{number:010x}{i:06x}" not in done]
            await assembler.add(unit, UnitReport(unit.uid), _rows(unit.uid, number, label, ids),
                                NO_DECISIONS, assembler.generation)
        await assembler.flush()
        return dropped

    dropped = asyncio.run(main())
    assert dropped == ["uA", "uB"]
    counts = Counter(i for ids in written for i in ids)
    assert len(counts) == 8 and set(counts.values()) == {1}
    assert sorted(assembler.take_committed()) == ["uA", "uB"]
    assert [t.num_rows for ts in assembler.buffers.values() for t in ts] == []
    assert assembler.buffered_bytes == 0


def _one_class(tmp_path, shard_size: int):
    return parse_spec({"name": "t", "target": 50, "classes": {"cat": ["q"]},
                       "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:1"}],
                       "output": {"uri": str(tmp_path / "ds"), "shard_size": shard_size}})


class ListWriter:
    """A shard writer that keeps each shard's ids in ``written``."""

    def __init__(self) -> None:
        self.written: list[list[str]] = []

    def write(self, table, split, number, journal, extra):
        self.written.append(table["id"].to_pylist())


class NoJournal:
    def write_unit(self, unit, report, decisions):
        return None


class NoDedup:
    async def mark_written(self, ids, claims, writing=None):
        return None


class NumberingServices:
    """The services an assembler calls: shards numbered 1, 2, ...; commits accepted."""

    def __init__(self, dedup=None) -> None:
        self.dedup = dedup or NoDedup()
        self.shards = 0

    async def next_shard(self, split):
        self.shards += 1
        return self.shards

    async def commit(self, uid, accepted):
        return None


async def run_now(fn, *args):
    return fn(*args)


def held_at(name: str, reached: asyncio.Event, release: asyncio.Event):
    """A storage runner whose first call of ``name`` (``write_unit``: a unit's journal file)
    sets ``reached`` and waits for ``release``."""
    async def run(fn, *args):
        if fn.__name__ == name and not reached.is_set():
            reached.set()
            await release.wait()
        return fn(*args)
    return run


def gated_store(gate: asyncio.Future):
    """A storage runner whose shard writes wait for ``gate`` (the first shard's upload holds
    until the test resolves it)."""
    async def store(fn, *args):
        if fn.__name__ == "write" and not gate.done():
            await gate
        return fn(*args)
    return store


def test_a_shard_written_before_a_discard_commits_none_of_the_resent_units(tmp_path):
    """A shard uploads in the background and commits its units after it is written. A
    discard that comes while it commits them (here: the first unit's journal file is being
    written) drops the rest once that commit is journaled; a unit resent then under the same
    uid, its row not yet in any shard, must not be committed by the old shard's count. Nor is
    the commit that was under way reported: the driver resends that unit too, which finds its
    journal file."""
    journaling, release = asyncio.Event(), asyncio.Event()
    run = held_at("write_unit", journaling, release)
    assembler = ShardAssembler(JobPlan(_one_class(tmp_path, 2), str(tmp_path / "ds"), "job-1"),
                               ListWriter(), NoJournal(), NumberingServices(), run, run)
    units = {uid: WorkUnit(uid, 0, SEARCH, 0, label="cat") for uid in ("uA", "uB")}

    async def main() -> None:
        await assembler.add(units["uA"], UnitReport("uA"), _rows("uA", 1, "cat", [0]),
                            NO_DECISIONS, 0)
        await assembler.add(units["uB"], UnitReport("uB"), _rows("uB", 2, "cat", [0]),
                            NO_DECISIONS, 0)  # a shard of 2: uploads, then commits uA, uB
        await asyncio.wait_for(journaling.wait(), 10)
        dropping = asyncio.ensure_future(assembler.discard())  # uA is committing
        await asyncio.sleep(0.05)
        assert not dropping.done()  # it waits for uA's journal file
        release.set()
        assert await asyncio.wait_for(dropping, 10) == ["uB"]
        await assembler.add(units["uB"], UnitReport("uB"), _rows("uB", 2, "cat", [1]),
                            NO_DECISIONS, 1)  # resent: one row, no shard yet
        for _ in range(20):
            await asyncio.sleep(0)
        assert assembler.take_committed() == []
        assert assembler.pending["uB"]["remaining"] == 1
        await assembler.flush()
        await assembler.close()

    asyncio.run(main())


def test_a_failed_upload_raises_once_and_a_reset_clears_it(tmp_path):
    """A background upload whose index call fails (a partition restarted) raises in the next
    ``add``; the runner then resets. The resent units must not meet the old error again, or
    every reset would fail anew until the unit runs out of sends."""
    from builder.job import IndexLost

    lost = {"now": True}

    class LosingDedup:
        async def mark_written(self, ids, claims, writing=None):
            if writing is None and lost["now"]:
                raise IndexLost("index partition 0 restarted")

    writer = ListWriter()
    assembler = ShardAssembler(JobPlan(_one_class(tmp_path, 1), str(tmp_path / "ds"), "job-1"),
                               writer, NoJournal(), NumberingServices(LosingDedup()), run_now,
                               run_now)
    units = {uid: WorkUnit(uid, 0, SEARCH, 0, label="cat") for uid in ("u1", "u2")}

    async def main() -> None:
        await assembler.add(units["u1"], UnitReport("u1"), _rows("u1", 1, "cat", [0]),
                            NO_DECISIONS, 0)
        with pytest.raises(IndexLost):
            await assembler.add(units["u2"], UnitReport("u2"), _rows("u2", 2, "cat", [0]),
                                NO_DECISIONS, 0)
        assert await assembler.discard() == ["u1", "u2"]
        lost["now"] = False
        for number, uid in enumerate(units, 3):
            await assembler.add(units[uid], UnitReport(uid), _rows(uid, number, "cat", [0]),
                                NO_DECISIONS, 1)
        await assembler.flush()

    asyncio.run(main())
    assert assembler.take_committed() == ["u1", "u2"]
    assert len(writer.written) == 3  # u1's first shard, then u1's and u2's resent rows


def test_an_upload_that_fails_as_the_unit_waiting_on_it_is_cancelled_still_fails_the_flush(
        tmp_path):
    """The next shard's ``add`` waits for the upload before it. If that upload fails in the
    same turn as the waiting ``add`` is cancelled (a job being torn down), the error must stay
    for the flush: else the flush returns and the shard's unit is never committed."""
    async def main() -> None:
        gate = asyncio.get_running_loop().create_future()
        store = gated_store(gate)

        assembler = ShardAssembler(JobPlan(_one_class(tmp_path, 1), str(tmp_path / "ds"),
                                           "job-1"), ListWriter(), NoJournal(),
                                   NumberingServices(), run_now, store)
        units = {uid: WorkUnit(uid, 0, SEARCH, 0, label="cat") for uid in ("u1", "u2")}
        await assembler.add(units["u1"], UnitReport("u1"), _rows("u1", 1, "cat", [0]),
                            NO_DECISIONS, 0)
        adding = asyncio.ensure_future(assembler.add(
            units["u2"], UnitReport("u2"), _rows("u2", 2, "cat", [0]), NO_DECISIONS, 0))
        for _ in range(5):
            await asyncio.sleep(0)
        gate.set_exception(OSError("the store answered 503"))
        adding.cancel()
        await asyncio.gather(adding, return_exceptions=True)
        with pytest.raises(OSError, match="503"):
            await assembler.flush()
        await assembler.close()

    asyncio.run(main())


def test_a_unit_that_waited_for_the_lock_across_a_discard_hands_nothing_over(tmp_path):
    """uB holds the lock, waiting for the upload before it; uC, begun before the discard,
    waits for the lock. The discard (an index reset) comes meanwhile: uC is stale and must
    not put its rows or its pending entry into the new generation, or its resent attempt
    writes an image twice and commits with a row still buffered."""
    from builder.job import IndexLost

    decisions = pa.table({"x": list(range(1000))})  # held in the budget until the commit

    async def main() -> None:
        gate = asyncio.get_running_loop().create_future()
        store = gated_store(gate)

        writer = ListWriter()
        assembler = ShardAssembler(JobPlan(_one_class(tmp_path, 2), str(tmp_path / "ds"),
                                           "job-1"), writer, NoJournal(), NumberingServices(),
                                   run_now, store)
        units = {uid: WorkUnit(uid, 0, SEARCH, 0, label="cat") for uid in ("uA", "uB", "uC")}
        await assembler.add(units["uA"], UnitReport("uA"), _rows("uA", 1, "cat", [0, 1]),
                            decisions, 0)
        holding = asyncio.ensure_future(assembler.add(
            units["uB"], UnitReport("uB"), _rows("uB", 2, "cat", [0, 1]), decisions, 0))
        for _ in range(5):
            await asyncio.sleep(0)
        waiting = asyncio.ensure_future(assembler.add(
            units["uC"], UnitReport("uC"), _rows("uC", 3, "cat", [0]), decisions, 0))
        for _ in range(5):
            await asyncio.sleep(0)
        discarding = asyncio.ensure_future(assembler.discard())
        for _ in range(5):
            await asyncio.sleep(0)
        gate.set_result(None)
        assert await discarding == ["uA", "uB"]  # uA's shard was being written
        await holding
        with pytest.raises(IndexLost):
            await waiting
        assert not assembler.pending and not assembler.buffers
        assert assembler.buffered_bytes == 0
        await assembler.add(units["uC"], UnitReport("uC"), _rows("uC", 3, "cat", [0, 1]),
                            decisions, 1)  # resent
        assert assembler.take_committed() == []
        await assembler.flush()
        assert assembler.take_committed() == ["uC"] and assembler.buffered_bytes == 0
        ids = Counter(i for shard in writer.written for i in shard)
        assert max(ids.values()) == 1

    asyncio.run(main())


def test_an_error_of_a_shard_written_before_a_discard_is_not_the_new_generations(tmp_path):
    """The discard returns once the shard is written and the commits under way have ended.
    If such a commit fails, that failure belongs to the dropped generation (its units are
    resent): the resent units' ``add`` must not raise it."""
    from builder.job import IndexLost

    async def main() -> None:
        committing = asyncio.Event()
        failing = asyncio.get_running_loop().create_future()

        class Services(NumberingServices):
            async def commit(self, uid, accepted):
                if not failing.done():
                    committing.set()
                    await failing  # the ledger call of the old shard's commit

        assembler = ShardAssembler(JobPlan(_one_class(tmp_path, 1), str(tmp_path / "ds"),
                                           "job-1"), ListWriter(), NoJournal(), Services(),
                                   run_now, run_now)
        units = {uid: WorkUnit(uid, 0, SEARCH, 0, label="cat") for uid in ("u1", "u2")}
        await assembler.add(units["u1"], UnitReport("u1"), _rows("u1", 1, "cat", [0]),
                            NO_DECISIONS, 0)
        await asyncio.wait_for(committing.wait(), 10)
        dropping = asyncio.ensure_future(assembler.discard())  # u1 is committing
        await asyncio.sleep(0.05)
        assert not dropping.done()  # it waits for the commit under way, which fails
        failing.set_exception(IndexLost("the quota ledger restarted"))
        assert await asyncio.wait_for(dropping, 10) == []
        await assembler.add(units["u1"], UnitReport("u1"), _rows("u1", 1, "cat", [1]),
                            NO_DECISIONS, 1)
        await assembler.add(units["u2"], UnitReport("u2"), _rows("u2", 2, "cat", [0]),
                            NO_DECISIONS, 1)
        await assembler.flush()
        assert sorted(assembler.take_committed()) == ["u1", "u2"]

    asyncio.run(main())


@pytest.mark.parametrize("rows", [0, 2])
def test_a_discard_returns_only_once_a_commit_under_way_is_journaled(tmp_path, rows):
    """A unit's commit (its journal file, then the ledger) was still under way when a
    discard returned: the shard's upload had ended, or the unit wrote no rows. The driver
    resent the unit, whose new attempt found no journal file and ran again; the first
    attempt's commit then landed, and the ledger and the journal told two stories. The
    discard now waits for it, so the resent attempt finds the file (and keeps its report)."""
    journaled: list[str] = []
    reached, release = asyncio.Event(), asyncio.Event()

    class Journal:
        def write_unit(self, unit, report, decisions):
            journaled.append(unit.uid)

    run_io = held_at("write_unit", reached, release)
    assembler = ShardAssembler(JobPlan(_one_class(tmp_path, 2), str(tmp_path / "ds"), "job-1"),
                               ListWriter(), Journal(), NumberingServices(), run_io, run_io)
    unit = WorkUnit("uA", 0, SEARCH, 0, label="cat")

    async def main() -> None:
        adding = asyncio.ensure_future(assembler.add(
            unit, UnitReport("uA"), _rows("uA", 1, "cat", list(range(rows))), NO_DECISIONS, 0))
        await asyncio.wait_for(reached.wait(), 10)
        dropping = asyncio.ensure_future(assembler.discard())
        await asyncio.sleep(0.05)
        assert not dropping.done() and journaled == []
        release.set()
        await asyncio.wait_for(dropping, 10)
        assert journaled == ["uA"]
        await asyncio.gather(adding, return_exceptions=True)
        await assembler.flush()

    asyncio.run(main())
