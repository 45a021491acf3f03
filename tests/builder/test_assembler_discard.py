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
                               Journal(), Services(), run_io)
    units = {"cat": WorkUnit("uA", 0, SEARCH, 0, label="cat"),
             "dog": WorkUnit("uB", 1, SEARCH, 0, label="dog")}

    async def main() -> list[str]:
        await assembler.add(units["cat"], UnitReport("uA"), _rows("uA", 1, "cat", [0, 1, 2, 3]),
                            NO_DECISIONS)
        adding = asyncio.ensure_future(assembler.add(
            units["dog"], UnitReport("uB"), _rows("uB", 2, "dog", [0, 1, 2, 3]), NO_DECISIONS))
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
                                NO_DECISIONS)
        await assembler.flush()
        return dropped

    dropped = asyncio.run(main())
    assert dropped == ["uA", "uB"]
    counts = Counter(i for ids in written for i in ids)
    assert len(counts) == 8 and set(counts.values()) == {1}
    assert sorted(assembler.take_committed()) == ["uA", "uB"]
    assert [t.num_rows for ts in assembler.buffers.values() for t in ts] == []
    assert assembler.buffered_bytes == 0
