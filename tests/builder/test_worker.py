"""builder.worker: which buffered rows make a worker's next shard; a settled worker process."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa

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
