"""The quota ledger and the index partitions on Ray: at a new job's first start they take what
the driver gives them and read nothing, nor import the job's modules to read with (0.4 s of
CPU and 80 MB each); a resumed job's partition reads the journal at its first start; and
either one that restarts (its process was lost), or cannot tell whether it did, rebuilds
itself from the journal."""

from __future__ import annotations

import os
import random
import signal
import sys
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import ray
from ray.exceptions import RpcError

from actors.dedup import DedupPartitionActor
from actors.options import PoolPlan
from actors.quota import QuotaActor
from builder.quota import RESERVE_BLOCK, QuotaLedger
from builder.spec import parse_spec
from builder.journal import Journal
from builder.units import UnitReport, WorkUnit
from tests.builder.test_journal import UNITS, _shard_rows, unit_table, write_journal


CATS = parse_spec({"name": "ds", "classes": {"cat": {"urls": ["http://h/1"]}}})


def own_process() -> dict[str, Any]:
    """The job's options for a small actor, in a process of its own: a runtime env no other
    worker has keeps it out of a pooled worker that imported modules for another test."""
    return {**PoolPlan.small_options(),
            "runtime_env": {"env_vars": {"PIXCRAWLER_TEST_ACTOR": uuid.uuid4().hex}}}


def imported(actor: Any, module: str) -> bool:
    return ray.get(actor.__ray_call__.remote(lambda self: module in sys.modules), timeout=60)


def kill_process(actor: Any) -> None:
    os.kill(ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60),
            signal.SIGKILL)


def test_a_ledger_starts_as_the_driver_gave_it_and_a_restarted_one_reads_the_journal(
        ray_session, tmp_path):
    uri = str(tmp_path / "ds")
    _, tables = write_journal(uri, None)
    accepted = sum(int(pc.sum(t["accepted"].cast(pa.int64())).as_py() or 0) for t in tables)
    assert accepted > 0
    spec = parse_spec({"name": "ds", "target": 1000, "classes": {"cat": None},
                       "sources": [{"engine": "urllist", "path": str(tmp_path / "urls.txt")}],
                       "output": {"uri": uri}})
    recovery = {"spec": spec, "uri": uri, "job_id": "job1", "storage_options": None,
                "merge": False, "unjournaled": 3}
    actor = QuotaActor.options(**own_process()).remote(QuotaLedger({"cat": 1000}), recovery)
    try:
        first, rooms = ray.get(actor.call.remote("rooms"), timeout=60)
        assert rooms == {"cat": 1000}  # the ledger it was given, not the journal's
        assert ray.get(actor.call.remote("next_shard", "train"), timeout=60)[1] == 0
        assert not imported(actor, "builder.pipeline")
        kill_process(actor)
        again, rooms = ray.get(actor.call.remote("rooms"), timeout=60)
        assert again != first
        assert rooms == {"cat": 1000 - accepted}
        # Past the numbers the lost ledger may have handed out and no journal shows yet.
        assert ray.get(actor.call.remote("next_shard", "train"), timeout=60)[1] == 3
        kill_process(actor)  # a rebuilt ledger recorded how far it numbered
        assert ray.get(actor.call.remote("next_shard", "train"), timeout=60)[1] \
            >= 3 + RESERVE_BLOCK
    finally:
        ray.kill(actor, no_restart=True)


@pytest.mark.parametrize("starts_empty", [True, False], ids=["new-job", "resumed-job"])
def test_a_partition_reads_the_journal_when_its_job_resumes_or_it_restarts(
        ray_session, tmp_path, starts_empty):
    uri = str(tmp_path / "ds")
    _, tables = write_journal(uri, None)
    urls = sum(1 for t in tables for h in t["url_hash"].to_pylist() if h)
    assert urls > 0
    recovery = {"spec": CATS, "uri": uri, "job_id": "job1", "storage_options": None,
                "merge": False, "retry": False, "journal": True}
    actor = DedupPartitionActor.options(**own_process()).remote(0, 1, 4, True, recovery,
                                                                starts_empty)
    try:
        assert ray.get(actor.stats.remote(), timeout=60)["urls"] == (0 if starts_empty
                                                                     else urls)
        assert imported(actor, "builder.pipeline") is not starts_empty
        kill_process(actor)
        assert ray.get(actor.stats.remote(), timeout=60)["urls"] == urls
    finally:
        ray.kill(actor, no_restart=True)


def test_each_partition_of_a_resumed_job_reads_its_own_share_of_the_journal(ray_session,
                                                                            tmp_path):
    """Each of a resumed job's partitions asks for its own payloads (``only``: its index)
    and holds what the journal split among all of them gives it: URL claims, written images
    and their signatures."""
    from builder.dedup import LocalPartitions
    from builder.pipeline import index_payloads

    uri = str(tmp_path / "ds")
    journal = Journal(uri, "job1", None)
    rng = random.Random(7)
    for u in range(UNITS):  # URL hashes spread over both partitions (their high bits)
        table = unit_table(u, rng)
        spread = pa.array([h << 32 | h for h in table["url_hash"].to_pylist()], pa.uint64())
        table = table.set_column(table.schema.get_field_index("url_hash"), "url_hash", spread)
        journal.write_unit(WorkUnit(uid=f"l00-{u:05d}", seq=u, kind="list", source=0, start=u),
                           UnitReport(f"l00-{u:05d}"), table)
    _, shard = _shard_rows(rng, 12, [[(rng.getrandbits(64), rng.getrandbits(64))
                                      for _ in range(2)] for _ in range(12)])
    journal.write_shard("train-00000", shard)
    recovery = {"spec": CATS, "uri": uri, "job_id": "job1", "storage_options": None,
                "merge": False, "retry": False, "journal": True}
    local = LocalPartitions(4, k=2)
    for payloads in index_payloads(local.client(), **recovery):
        for partition, payload in zip(local.partitions, payloads):
            partition.load(payload)
    held = ("urls", "images", "signatures")
    want = [{name: partition.stats()[name] for name in held} for partition in local.partitions]
    assert all(min(share.values()) > 0 for share in want)
    actors = [DedupPartitionActor.options(**own_process()).remote(i, 2, 4, True, recovery)
              for i in range(2)]
    try:
        got = [ray.get(a.stats.remote(), timeout=60) for a in actors]
        assert [{name: share[name] for name in held} for share in got] == want
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)


class _Context:
    def __init__(self, answer: Any):
        self.answer = answer

    @property
    def was_current_actor_reconstructed(self) -> Any:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.mark.parametrize("answer, expected", [
    (False, False), (True, True),
    ({}, True),  # Ray's cluster database has no record of the actor
    (RpcError("GCS unavailable"), True),
])
def test_an_actor_that_cannot_tell_whether_it_restarted_reads_the_journal(
        monkeypatch, answer, expected):
    """Taking a restart for a first start would bring the ledger or a partition back empty
    in the middle of a job; reading the journal when it need not is only slower."""
    from actors import restarted

    monkeypatch.setattr(ray, "get_runtime_context", lambda: _Context(answer))
    assert restarted() is expected


def test_a_partition_takes_its_share_of_the_expected_signatures_after_a_restart_too(
        ray_session):
    """The index's expected signatures reach each of its ``k`` partitions as a ``1/k`` share,
    at the first start and at a restart (Ray runs ``__init__`` again with the same
    arguments)."""
    from builder.dedup import DedupPartition

    want = DedupPartition(4, True, 1000)._near.capacity
    assert 1024 < want < DedupPartition(4, True, 4000)._near.capacity
    actor = DedupPartitionActor.options(**own_process()).remote(1, 4, 4, True, None, False,
                                                                signatures=4000)

    def capacity() -> int:
        return ray.get(actor.__ray_call__.remote(lambda self: self.part._near.capacity),
                       timeout=60)

    try:
        assert capacity() == want
        kill_process(actor)
        assert capacity() == want
    finally:
        ray.kill(actor, no_restart=True)
