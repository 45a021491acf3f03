"""The shard worker actor's services: a call to a slow-level scorer that cannot run ends; one
to a scorer that is only busy is waited for."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import ray

from actors.slow import HEALTH
from builder.errors import JobInterrupted


@ray.remote(num_cpus=0, concurrency_groups={HEALTH: 1})
class Scorer:
    """``SlowScorer``'s two methods: ``score`` takes ``busy_s`` per batch, one at a time."""

    def __init__(self, busy_s: float = 0.0):
        self.busy_s = busy_s

    @ray.method(concurrency_group=HEALTH)
    def alive(self) -> bool:
        return True

    def score(self, batch):
        time.sleep(self.busy_s)
        return batch.records


def score_with(scorer) -> list:
    from actors import worker

    services = worker.RayServices.__new__(worker.RayServices)
    services.scorers, services._scored = [scorer], 0
    services.plan = SimpleNamespace(spec=SimpleNamespace(  # no embedding dedup
        validation=SimpleNamespace(embedding_dedup_threshold=None)))
    services._prep = SimpleNamespace(prepare=lambda records: SimpleNamespace(
        records=records, index=[], nsfw_pixels=None, clip_pixels=None))
    pool = ThreadPoolExecutor(1)
    try:
        return asyncio.run(services.score([], pool))
    finally:
        pool.shutdown()
        ray.kill(scorer)


def test_a_scorer_waiting_for_a_gpu_fails_the_job_naming_resume(ray_session, monkeypatch):
    """A scorer whose GPU node was lost restarts where a GPU is free; with none left, every
    call to it waited for ever, and the job with it. Here the scorer asks for a GPU the test
    cluster does not have, so it is never placed, as such a scorer."""
    from actors import worker

    if ray.cluster_resources().get("GPU"):
        pytest.skip("this Ray has a GPU: the scorer would be placed")
    monkeypatch.setattr(worker, "SCORE_WAIT_S", 1.0)
    monkeypatch.setattr(worker, "SCORE_CHECK_S", 0.2)
    with pytest.raises(JobInterrupted, match="answered nothing for 1 s.*--resume"):
        score_with(Scorer.options(num_gpus=1).remote())


def test_a_busy_scorer_is_waited_for_past_the_limit(ray_session, monkeypatch):
    """The limit is on a scorer that answers nothing: one scoring other batches answers that
    it is alive, and may take as long as it takes (a CPU fallback behind many workers)."""
    from actors import worker

    monkeypatch.setattr(worker, "SCORE_WAIT_S", 0.5)
    monkeypatch.setattr(worker, "SCORE_CHECK_S", 0.2)
    scorer = Scorer.remote(busy_s=2.5)
    ray.get(scorer.alive.remote(), timeout=60)  # placed and started
    started = time.monotonic()
    assert score_with(scorer) == []
    assert time.monotonic() - started >= 2.5


@pytest.mark.parametrize("service", ["partition", "ledger"])
def test_an_index_partition_or_ledger_that_cannot_be_placed_fails_the_job_naming_resume(
        ray_session, monkeypatch, service):
    """An index partition or the quota ledger whose node was lost restarts where 0.05 CPU is
    free; with none left, Ray queued every call to it, and the job waited for ever. Here the
    actor asks for a resource no node has, so it is never placed, as such an actor."""
    from actors import worker
    from actors.dedup import DedupPartitionActor
    from actors.quota import QuotaActor
    from builder.quota import QuotaLedger

    monkeypatch.setattr(worker, "SERVICE_WAIT_S", 1.0)
    monkeypatch.setattr(worker, "SCORE_CHECK_S", 0.2)
    services = worker.RayServices.__new__(worker.RayServices)
    services._seen = {}
    nowhere = {"resources": {"pixcrawler-test-nowhere": 1}, "num_cpus": 0}
    if service == "partition":
        actor = DedupPartitionActor.options(**nowhere).remote(0, 1, 4, True)
        services.partitions = [actor]
        call, what = services._partition_call(0, "stats", {}), "index partition 0"
    else:
        actor = QuotaActor.options(**nowhere).remote(QuotaLedger({"cat": 1}), {})
        services.quota = actor
        call, what = services._ledger("rooms"), "the quota ledger"
    try:
        with pytest.raises(JobInterrupted, match=f"{what} has answered nothing for 1 s.*"
                                                 "--resume"):
            asyncio.run(call)
    finally:
        ray.kill(actor)


def test_a_progress_actor_that_cannot_be_placed_answers_the_api_in_bounded_time(ray_session,
                                                                              monkeypatch):
    """A job's progress actor whose node was lost waits for room to restart; every call to it
    waited with it, so a DELETE never reached Ray's stop, and the replica's reconcile thread
    and its job reads hung. Here the actor asks for a resource no node has."""
    import asyncio

    from actors import NAMESPACE
    from actors.progress import ProgressActor, progress_name
    from serve import jobs

    monkeypatch.setattr(jobs, "ACTOR_WAIT_S", 0.5)
    actor = ProgressActor.options(name=progress_name("stuck-1"), namespace=NAMESPACE,
                                  resources={"pixcrawler-test-nowhere": 1},
                                  num_cpus=0).remote("stuck-1", "stuck")
    try:
        started = time.monotonic()
        assert jobs.request_cancel("stuck-1") is False  # the caller then has Ray stop it
        assert jobs.read_live("stuck-1") is None
        assert asyncio.run(jobs.ProgressReader()._read("stuck-1")) is None
        assert time.monotonic() - started < 10
    finally:
        ray.kill(actor)


def test_the_reconcile_pass_waits_for_stuck_progress_actors_once_not_once_each(ray_session,
                                                                             monkeypatch):
    """Three jobs' progress actors waiting for room (their node lost) cost a reconcile pass
    one ``ACTOR_WAIT_S`` in all, not one each, and a job whose actor answers still reads."""
    from actors import NAMESPACE
    from actors.progress import ProgressActor, progress_name
    from serve import jobs

    monkeypatch.setattr(jobs, "ACTOR_WAIT_S", 3.0)
    stuck = [ProgressActor.options(name=progress_name(f"stuck-{i}"), namespace=NAMESPACE,
                                   resources={"pixcrawler-test-nowhere": 1},
                                   num_cpus=0).remote(f"stuck-{i}", "stuck") for i in range(3)]
    alive = ProgressActor.options(name=progress_name("alive-1"), namespace=NAMESPACE,
                                  num_cpus=0).remote("alive-1", "alive")
    try:
        ray.get(alive.get.remote())
        started = time.monotonic()
        live = jobs.read_live_all(["stuck-0", "alive-1", "stuck-1", "none-1", "stuck-2"])
        took = time.monotonic() - started
        assert [k for k, v in live.items() if v is not None] == ["alive-1"]
        assert list(live) == ["stuck-0", "alive-1", "stuck-1", "none-1", "stuck-2"]
        assert 3.0 <= took < 6.0  # one wait (and 5 actor lookups); one each would be 9 s
    finally:
        for actor in (*stuck, alive):
            ray.kill(actor)


def test_a_record_whose_score_a_cancel_cut_off_is_settled_at_the_scorers():
    """A cancel that cuts a unit's ``score`` call short leaves its records without a
    ``clip_score``, while the scorer's store kept their images: the unit's settle left those
    out, and the images stayed in the store, which the dataset does not hold."""
    from actors.worker import RayServices
    from builder.reasons import Reason
    from builder.records import Candidate, Record

    sent = []
    scorer = SimpleNamespace(settle=SimpleNamespace(remote=sent.append))
    cut_off = Record(Candidate(url="http://127.0.0.1:1/a.jpg", label="cat"), data=b"x",
                     sha256="ab" * 32).reject(Reason.CANCELLED, "job cancelled")
    unfetched = Record(Candidate(url="http://127.0.0.1:1/b.jpg", label="cat")).reject(
        Reason.CANCELLED, "job cancelled")
    asyncio.run(RayServices.settle_scores(SimpleNamespace(scorers=[scorer, scorer]),
                                          [cut_off, unfetched]))
    assert [[r.id for r in batch] for batch in sent] == [[cut_off.id]]  # the store's holder
    assert sent[0][0].data is None and sent[0][0].clip_score is None
