"""A shard worker as a Ray actor: ``builder.worker.WorkerRuntime`` with the job's services
reached through their actors (index partitions, quota ledger, rate limiters, GPU scorers).

Every answer from a stateful service carries that actor's incarnation: when one changes (the
actor restarted on another node and rebuilt itself from the journal), the worker raises
``IndexLost`` so the driver resends what the lost state had decided but not committed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import numpy as np
import ray

from actors import NAMESPACE
from actors.metrics import stage_latency
from actors.ratelimit import job_quota, source_key
from builder.dedup import DedupClient
from builder.engines import SearchEngine, SearchPage
from builder.errors import EngineError, EngineUnavailable, JobInterrupted
from builder.job import IndexLost
from builder.records import Record
from builder.units import UnitReport, WorkerEvents, WorkUnit
from builder.worker import JobPlan, LedgerCalls, WorkerRuntime, settle_process

SCORE_WAIT_S = 900.0
"""How long a worker waits for a slow-level scorer that answers nothing, not even ``alive``.
A scorer whose node was lost restarts where a GPU is free; with none left, its calls would
wait for ever. A busy one (it answers ``alive``) is waited for as long as it takes."""
SCORE_CHECK_S = 30.0
"""How often a worker waiting for a batch's scores asks whether its scorer is there (and
one waiting for an index partition or the quota ledger, whether it is)."""
SERVICE_WAIT_S = 900.0
"""How long a worker waits for an index partition or the quota ledger that answers nothing,
not even ``alive``. One whose node was lost restarts where 0.05 CPU is free; with none left,
calls to it wait for ever (Ray queues them for a restarting actor), and the job with them. A
busy one, or one rebuilding itself from the journal, answers ``alive`` once its queue gets
there."""


class RayServices(LedgerCalls):
    """The job's services as actor calls (see the module docstring)."""

    def __init__(self, plan: JobPlan, partitions: list[Any], quota: Any,
                 limiters: dict[int, Any], scorers: list[Any]):
        v = plan.spec.validation
        self.plan = plan
        self.partitions = partitions
        self.quota = quota
        self.limiters = limiters
        self.scorers = scorers
        self.dedup = DedupClient(v.near_duplicate_threshold, v.level != "fast",
                                 len(partitions), self._partition_call)
        self._seen: dict[int, str] = {}
        self._prep = None
        self._scored = 0

    def _check(self, key: int, incarnation: str) -> None:
        known = self._seen.setdefault(key, incarnation)
        if known != incarnation:
            raise IndexLost(f"{'the quota ledger' if key < 0 else f'index partition {key}'} "
                            "restarted")

    def forget_incarnations(self) -> None:
        self._seen.clear()

    async def _partition_call(self, p: int, method: str,
                              payload: dict[str, np.ndarray]) -> Any:
        actor = self.partitions[p]
        incarnation, result = await _answered(actor.call.remote(method, payload), actor.alive,
                                              SERVICE_WAIT_S, f"index partition {p}")
        self._check(p, incarnation)
        return result

    async def _ledger(self, method: str, *args: Any) -> Any:
        incarnation, result = await _answered(self.quota.call.remote(method, *args),
                                              self.quota.alive, SERVICE_WAIT_S,
                                              "the quota ledger")
        self._check(-1, incarnation)
        return result

    async def search(self, unit: WorkUnit, engine: SearchEngine) -> SearchPage:
        limiter = self.limiters.get(unit.source)
        if limiter is not None:
            status, answer = await limiter.acquire.remote(
                source_key(self.plan.job_id, unit.source),
                job_quota(self.plan.spec.sources[unit.source]))
            if status == "circuit_open":
                raise answer  # a CircuitOpen
            if status != "ok":
                raise EngineUnavailable(answer)
            if answer > 0:
                await asyncio.sleep(answer)
        try:
            page = await asyncio.to_thread(engine.search, unit.query, label=unit.label,
                                           page=unit.page, per_page=unit.per_page)
        except EngineError as exc:
            if limiter is not None:
                self._charge(limiter, unit, exc.requests)
                limiter.record.remote(False, exc.status, exc.retry_after)
            raise
        if limiter is not None:
            self._charge(limiter, unit, page.requests)
            limiter.record.remote(True, 200, None)
        return page

    def _charge(self, limiter: Any, unit: WorkUnit, requests: int) -> None:
        """The search's requests past the one ``acquire`` counted (``SearchPage.requests``)."""
        if requests > 1:
            limiter.charge.remote(source_key(self.plan.job_id, unit.source), requests - 1)

    @property
    def slow(self) -> bool:
        return bool(self.scorers)

    async def score(self, records: list[Record], pool: ThreadPoolExecutor) -> list[Record]:
        """Preprocess here (CPU), score on a scorer actor (GPU), copy the outcome back."""
        from builder.slow import (PreparedBatch, apply_scores, make_slow_validator,
                                  scorers_dedup_themselves)

        if self._prep is None:
            self._prep = make_slow_validator(self.plan.spec, "cpu")
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(pool, self._prep.prepare, records)
        light = [dataclasses.replace(r, data=None) for r in prepared.records]
        scorer = self.scorers[self._scored % len(self.scorers)]
        self._scored += 1
        ref = scorer.score.remote(PreparedBatch(light, prepared.index, prepared.nsfw_pixels,
                                                prepared.clip_pixels))
        scored = await _scores(scorer, ref)
        if not scorers_dedup_themselves(self.plan.spec, len(self.scorers)):
            holder = self.scorers[0]  # holds the embedding store for every scorer
            scored = await _scores(holder, holder.dedup.remote(scored))
        return apply_scores(records, scored)

    async def settle_scores(self, records: list[Record]) -> None:
        """To the first scorer, which holds the embedding store for all (``dedup_scored``), in
        order after this worker's calls to it, as Ray runs an actor's calls from one caller;
        not awaited: a lost scorer's store is lost with it."""
        light = [dataclasses.replace(r, data=None, embedding=None) for r in records
                 if r.sha256]  # (one whose score a cancel cut off has no clip_score here)
        if light:
            self.scorers[0].settle.remote(light)


async def _scores(scorer: Any, ref: Any) -> list[Record]:
    """The answer to ``ref`` (a scorer's ``score`` call); raises ``JobInterrupted`` once the
    scorer has answered nothing, ``alive`` included, for ``SCORE_WAIT_S``."""
    return await _answered(ref, scorer.alive, SCORE_WAIT_S, "a slow-level scorer",
                           "a node with a free GPU", "add a GPU node")


async def _answered(ref: Any, alive: Any, wait_s: float, what: str,
                    needs: str = "a node with 0.05 CPU free",
                    add: str = "add a node or free a CPU") -> Any:
    """The answer to ``ref``, a call to the actor whose ``alive`` method is given; raises
    ``JobInterrupted`` once the actor has answered nothing, ``alive`` included, for
    ``wait_s`` (asked every ``SCORE_CHECK_S``)."""
    answer = asyncio.wrap_future(ref.future())
    heard = time.monotonic()
    while True:
        done, _ = await asyncio.wait({answer}, timeout=SCORE_CHECK_S)
        if done:
            return answer.result()
        try:
            await asyncio.wait_for(asyncio.wrap_future(alive.remote().future()),
                                   SCORE_CHECK_S)
            heard = time.monotonic()
        except asyncio.TimeoutError:
            if time.monotonic() - heard >= wait_s:
                answer.cancel()
                ray.cancel(ref)
                raise JobInterrupted(
                    f"{what} has answered nothing for {wait_s:g} s: it waits for {needs} "
                    "(its own was lost, and no node left can run it); check the cluster "
                    f"(ray status), {add}, then continue the job with --resume") from None


@dataclasses.dataclass(frozen=True)
class ServiceNames:
    """The job's service actors by name (in the ``pixcrawler`` namespace). Workers look them up
    by name: actor handles among an actor's constructor arguments would make Ray keep those
    arguments in the object store to restart it, and warn at every start."""

    partitions: list[str]
    quota: str
    limiters: dict[int, str]
    scorers: list[str]

    def resolve(self) -> tuple[list[Any], Any, dict[int, Any], list[Any]]:
        def get(name: str) -> Any:
            return ray.get_actor(name, namespace=NAMESPACE)

        return ([get(n) for n in self.partitions], get(self.quota),
                {i: get(n) for i, n in self.limiters.items()}, [get(n) for n in self.scorers])


@ray.remote
class ShardWorker:
    """One worker of a job on Ray. ``incarnation`` changes when Ray restarts it."""

    def __init__(self, plan: JobPlan, names: ServiceNames, index: int):
        self.plan = plan
        self.names = names
        self.index = index
        self.services: Optional[RayServices] = None
        self.runtime: Optional[WorkerRuntime] = None
        self.incarnation = uuid.uuid4().hex
        self._started: Optional[asyncio.Task] = None
        self.busy_s = 0.0

    async def _open(self) -> None:
        partitions, quota, limiters, scorers = await asyncio.to_thread(self.names.resolve)
        self.services = RayServices(self.plan, partitions, quota, limiters, scorers)
        self.runtime = WorkerRuntime(self.plan, self.services, worker_id=f"w{self.index}")
        self.runtime.incarnation = self.incarnation
        latency, job = stage_latency(), self.plan.job_id
        self.runtime.on_stage = lambda stage, s: latency.observe(
            s, tags={"stage": stage, "job": job})
        await self.runtime.start()
        settle_process()

    async def _ready(self) -> WorkerRuntime:
        if self._started is None:
            self._started = asyncio.ensure_future(self._open())
        await self._started
        assert self.runtime is not None
        return self.runtime

    async def start(self) -> str:
        """Open the worker and check it can write the output; returns its incarnation."""
        await self._ready()
        return self.incarnation

    async def run(self, unit: WorkUnit) -> tuple[str, UnitReport, WorkerEvents]:
        runtime = await self._ready()
        t0 = time.perf_counter()
        report, events = await runtime.run(unit)
        self.busy_s += time.perf_counter() - t0
        return self.incarnation, report, events

    async def flush(self) -> tuple[str, WorkerEvents]:
        runtime = await self._ready()
        return self.incarnation, await runtime.flush()

    async def discard(self) -> list[str]:
        if self.services is None or self.runtime is None:
            return []
        self.services.forget_incarnations()
        return await self.runtime.discard()

    def cancel(self) -> None:
        if self.runtime is not None:
            self.runtime.cancel()

    def in_flight(self) -> dict[str, dict[str, int]]:
        """Candidates fetched so far in the units running here (``WorkerRuntime.in_flight``)."""
        return self.runtime.in_flight() if self.runtime is not None else {}

    def ping(self) -> str:
        return self.incarnation

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()
