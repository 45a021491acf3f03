"""Failures of the job's actors as the Ray driver sees them: what a worker raised reaches the
user as its own one-line error, and actors that only report (progress, stats) never fail the
job. The executor's tests stand fake handles in for actors (no Ray); the progress actor's run
on the session's Ray."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from types import SimpleNamespace
from typing import Any, Callable, Optional

import pytest
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

from actors import NAMESPACE
from actors.progress import get_progress, progress_name
from builder.errors import StorageError
from builder.job import IndexLost, WorkerLost
from cluster.coordinator import ProgressReporter, RayExecutor

MESSAGE = "cannot write s3://bucket/pets: access denied; check the credentials"


def task_error(cause: BaseException, function: str = "ShardWorker.run") -> RayTaskError:
    """A worker's failed call as the driver gets it: an instance of its cause's class too."""
    return RayTaskError(function, f"Traceback (most recent call last):\n  {cause!r}", cause,
                        proctitle=f"ray::{function}()", pid=4242, ip="10.0.0.7"
                        ).as_instanceof_cause()


class Call:
    """An actor method whose calls end with ``outcome`` (an exception is raised)."""

    def __init__(self, outcome: Any):
        self.outcome = outcome

    def remote(self, *args: Any) -> Any:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if isinstance(self.outcome, BaseException):
            future.set_exception(self.outcome)
        else:
            future.set_result(self.outcome)
        return SimpleNamespace(future=lambda: future)


def executor(**handles: Any) -> RayExecutor:
    ex = RayExecutor.__new__(RayExecutor)
    ex.handles = [SimpleNamespace(**handles)]
    ex.incarnations = [None]
    ex.late = set()
    ex._starts, ex._rejoining = {}, set()
    return ex


@pytest.mark.parametrize("nested", [False, True], ids=["worker", "actor-the-worker-called"])
def test_a_workers_pixcrawler_error_is_raised_as_itself_not_as_a_remote_traceback(nested):
    error = task_error(StorageError(MESSAGE))
    if nested:
        error = task_error(error)
    ex = executor(run=Call(error), flush=Call(error))
    with pytest.raises(StorageError) as run:
        asyncio.run(ex.run(0, None))
    with pytest.raises(StorageError) as flush:
        asyncio.run(ex.flush())
    for raised in (run.value, flush.value):
        assert type(raised) is StorageError and str(raised) == MESSAGE
        assert raised.__suppress_context__


def test_a_workers_index_lost_and_other_errors_keep_their_meaning():
    with pytest.raises(IndexLost, match="index partition 1 restarted"):
        asyncio.run(executor(run=Call(task_error(IndexLost("index partition 1 restarted"))))
                    .run(0, None))
    bug = task_error(KeyError("uid"))
    with pytest.raises(RayTaskError) as raised:
        asyncio.run(executor(run=Call(bug)).run(0, None))
    assert raised.value is bug


def test_a_lost_worker_rejoins_once_its_actor_is_back_having_dropped_what_it_held():
    """Ray restarts a lost worker's actor, but the runner sent it nothing more until every
    worker was lost. It is late now, on its way back: it drops what it had not written (it
    was resent to others), starts, and joins again; a way back that fails is tried again."""
    calls = []

    class Logged(Call):
        def __init__(self, name: str, outcome: Any):
            super().__init__(outcome)
            self.name = name

        def remote(self, *args: Any) -> Any:
            calls.append(self.name)
            return super().remote(*args)

    ex = executor(run=Call(ActorDiedError()), discard=Logged("discard", []),
                  start=Logged("start", ActorDiedError()))

    async def main():
        with pytest.raises(WorkerLost):
            await ex.run(0, None)
        assert ex.late == {0}
        await asyncio.wait({ex._starts[0]})  # its way back ended
        assert not await ex.revive(0)  # its actor is not back yet: asked again
        await asyncio.wait({ex._starts[0]})  # its way back ended
        assert calls == ["discard", "start"] * 2
        ex.handles[0].start.outcome = "incarnation-2"
        assert not await ex.revive(0)
        await asyncio.wait({ex._starts[0]})  # its way back ended
        assert await ex.revive(0)
        assert ex.late == set() and ex.incarnations == ["incarnation-2"]
        assert calls == ["discard", "start"] * 3

    asyncio.run(main())


def test_engine_stats_mark_a_lost_rate_limiter_unavailable_and_keep_the_others():
    ex = RayExecutor.__new__(RayExecutor)
    snap = {"requests": 3, "jobs": {"j": 3}}
    ex.limiters = {0: SimpleNamespace(snapshot=Call(snap)),
                   1: SimpleNamespace(snapshot=Call(ActorDiedError()))}
    ex.limiter_names = {0: "sandbox@127.0.0.1:1", 1: "sandbox@127.0.0.1:2"}
    ex.limiter_quotas, ex.job_id = {0: None, 1: 5}, "j"
    stats = asyncio.run(ex.engine_stats())
    assert stats["sandbox@127.0.0.1:1"] == snap
    assert stats["sandbox@127.0.0.1:2"] == {
        "unavailable": "ActorDiedError: The actor died unexpectedly before finishing this task."}


def test_dedup_stats_sum_the_partitions_that_answer_and_name_the_others():
    ex = RayExecutor.__new__(RayExecutor)
    ex.partitions = [SimpleNamespace(stats=Call({"images": 2})),
                     SimpleNamespace(stats=Call(task_error(OSError("disk full"),
                                                           "DedupPartitionActor.stats")))]
    assert asyncio.run(ex.dedup_stats()) == {
        "partitions": 2, "images": 2, "unavailable": ["partition 1: OSError: disk full"]}


class Runner:
    """What the reporter reads of the job's runner."""

    def __init__(self):
        self.counts = SimpleNamespace(classes={}, bytes_downloaded=0)

    def cancel(self) -> None:
        raise AssertionError("no one asked the job to stop")


def progress_of(job_id: str) -> Optional[dict[str, Any]]:
    """The job's progress, once its actor answers."""
    try:
        return get_progress(job_id)
    except RayActorError:
        return None


def report_until(reporter: ProgressReporter, snapshot: dict[str, Any],
                 done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 60
    while not done():
        assert time.monotonic() < deadline, "the reporter never got there"
        reporter(snapshot)


def test_a_killed_progress_actor_does_not_fail_the_job(ray_session, caplog):
    import ray

    from actors.progress import ProgressActor

    actor = ProgressActor.options(name=progress_name("lost-progress"),
                                  namespace=NAMESPACE).remote("lost-progress", "pets")
    reporter = ProgressReporter(actor, Runner)
    report_until(reporter, {"units_in_flight": 1},
                 lambda: (progress_of("lost-progress") or {}).get("state") == "running")
    ray.kill(actor, no_restart=True)
    with caplog.at_level(logging.WARNING, logger="pixcrawler.coordinator"):
        report_until(reporter, {"units_in_flight": 2}, lambda: reporter.actor is None)
        reporter({"units_in_flight": 3})
    assert "progress actor was lost" in caplog.text
    assert "the job goes on without progress reports" in caplog.text


def test_a_killed_progress_actor_is_started_again_and_follows_the_job(ray_session, caplog):
    import ray

    from cluster.coordinator import progress_actor

    recreate = functools.partial(progress_actor, "restarted-progress", "pets")
    reporter = ProgressReporter(recreate(), Runner, recreate=recreate)
    try:
        report_until(reporter, {"units_in_flight": 1},
                     lambda: progress_of("restarted-progress") is not None)
        ray.kill(reporter.actor, no_restart=True)
        with caplog.at_level(logging.WARNING, logger="pixcrawler.coordinator"):
            report_until(reporter, {"units_in_flight": 5},
                         lambda: (progress_of("restarted-progress") or {}).get("progress")
                         == {"units_in_flight": 5})
        state = progress_of("restarted-progress")
        assert state is not None and state["state"] == "running" and state["name"] == "pets"
        assert caplog.text.count("progress actor was lost") == 1
        assert "it is started again" in caplog.text
    finally:
        reporter.close()


def test_a_rate_limiter_whose_process_dies_is_started_again_and_keeps_the_day_s_count(
        ray_session):
    """A limiter had no restarts: once its process died, every search unit of the engine
    failed (the runner took it for a lost worker and resent the unit, round after round).
    Then a restarted one began the day at 0, so the engine's daily quota could be spent
    again; it counts on from the day's file now."""
    import os
    import signal

    import ray

    from actors.ratelimit import get_rate_limiter

    limiter = get_rate_limiter("openverse")  # 200 requests a day
    try:
        for _ in range(3):
            assert ray.get(limiter.acquire.remote("job-1"), timeout=60)[0] == "ok"
        pid = ray.get(limiter.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
        os.kill(pid, signal.SIGKILL)
        assert ray.get(limiter.acquire.remote("job-1"), timeout=60)[0] == "ok"
        assert ray.get(limiter.__ray_call__.remote(lambda self: os.getpid()), timeout=60) != pid
        snap = ray.get(limiter.snapshot.remote(), timeout=60)
        assert snap["quota"]["day_used"] == 4 and snap["quota"]["per_day"] == 200
    finally:
        ray.kill(limiter, no_restart=True)
