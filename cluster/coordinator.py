"""A job on Ray: the shared job lifecycle (``builder.pipeline.JobLifecycle``) with shard workers
as actors.

Per job: ``workers`` ``ShardWorker`` actors spread over the nodes (each fetches, validates,
dedups and writes its units straight to the output), ``dedup_partitions`` index partitions, a
quota ledger, a progress actor, one rate limiter per engine (shared by every job of the
cluster) and, at the slow level, the GPU scorers. The driver sends units and reads back counts.

Losing a node loses no work: a worker's failure makes the driver resend the units it had not
committed to the live workers (and Ray restarts the worker where it fits); an index partition
or the ledger that restarts rebuilds itself from the journal, and everything uncommitted is
resent. A job whose output is a local path runs on one node only, unless the spec declares the
path a filesystem every node shares (``output.shared_filesystem``), which a probe on every node
proves before the crawl starts.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
import uuid
from collections import Counter
from typing import Any, Callable, Optional, Union

import ray
from ray.exceptions import (ActorDiedError, ActorUnavailableError, RayActorError, RayError,
                            RayTaskError)

from actors import NAMESPACE
from actors.dedup import DedupPartitionActor
from actors.options import PoolPlan, max_workers, plan_pools
from actors.progress import ProgressActor, progress_name
from actors.quota import QuotaActor
from actors.ratelimit import (LIMITER_PREFIX, get_rate_limiter, job_quota, limiter_name,
                              source_key)
from actors.slow import SlowScorer
from actors.worker import ServiceNames, ShardWorker
from builder.card import empty_failure
from builder.errors import CancelledUnpublished, PixCrawlerError
from builder.job import IndexLost, JobRunner, WorkerLost
from builder.pipeline import Continuation, JobLifecycle, JobResult
from builder.quota import QuotaLedger
from builder.slow import scorers_dedup_themselves
from builder.spec import DatasetSpec
from builder.storage import delete_files, is_local_uri, join, open_fs, storage_errors
from builder.units import UnitReport, WorkerEvents, WorkUnit
from builder.worker import JobPlan
from cluster.connect import connect
from cluster.rayjob import JOB_CONFIG_ENV

log = logging.getLogger("pixcrawler.coordinator")

_LOST = (ActorDiedError, ActorUnavailableError, RayActorError)


async def result(ref: Any) -> Any:
    """Await an object ref; works through Ray Client (``ray://``) too, whose refs do not
    support ``await``."""
    return await asyncio.wrap_future(ref.future())


def remote_cause(exc: RayTaskError) -> BaseException:
    """What a remote call raised, through the ``RayTaskError`` of each remote call it made
    itself (a worker that awaits an index partition)."""
    cause: BaseException = exc
    while isinstance(cause, RayTaskError):
        cause = cause.cause
    return cause


def remote_error(exc: RayTaskError) -> BaseException:
    """The error the driver raises for a worker's or an actor's failed call: ``IndexLost``
    (the runner rebuilds the index) and a ``PixCrawlerError`` (the user acts on its one-line
    message) as the worker raised them; any other stays the ``RayTaskError``.

    The ``RayTaskError`` is an instance of its cause's class too, so the CLI would catch it as
    a ``PixCrawlerError`` and print its message: the remote traceback, in colour."""
    cause = remote_cause(exc)
    return cause if isinstance(cause, (IndexLost, PixCrawlerError)) else exc


def get_remote(refs: list[Any]) -> list[Any]:
    """``ray.get``; a failed call raises what ``remote_error`` says."""
    try:
        return ray.get(refs)
    except RayTaskError as exc:
        raise remote_error(exc) from None


def _why(exc: BaseException) -> str:
    """One line for an error: its type and its message's first line (a remote call's is the
    cause's: the ``RayTaskError``'s own is a traceback)."""
    if isinstance(exc, RayTaskError):
        exc = remote_cause(exc)
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


STATS_WAIT_S = 10.0
"""How long the stats of a finished job wait for each actor's answer."""


async def _stats(refs: list[Any]) -> list[Union[dict[str, Any], str]]:
    """Each actor's stats, or why it gave none: stats never fail a finished job, so an actor
    lost since its last call is noted, and one restarting (rebuilding itself from the
    journal) is waited for ``STATS_WAIT_S`` at most."""
    async def one(ref: Any) -> Union[dict[str, Any], str]:
        try:
            return await asyncio.wait_for(result(ref), STATS_WAIT_S)
        except asyncio.TimeoutError:
            return f"no answer within {STATS_WAIT_S:g} s"
        except RayError as exc:
            return _why(exc)

    return list(await asyncio.gather(*(one(ref) for ref in refs)))


def unjournaled_margin(workers: int) -> int:
    """How far past the journal's shard numbers the job's first ledger may have numbered,
    for a ledger rebuilt after it is lost (``recover_ledger``). A worker holds at most one
    number its journal does not show yet (it asks for the next once the last one's intent is
    written: ``ShardAssembler._write``), and may drop one more each time the job's state is
    reset (an index partition or the ledger lost) before it writes; this covers eight such
    resets in a row with no shard written between them. Ledgers rebuilt later record how far
    they have numbered, so they need no margin of their own."""
    return 8 * workers


class PlanningError(PixCrawlerError):
    """The cluster cannot run the job as configured."""


class RayExecutor:
    """The job's actors; ``run``/``flush`` translate lost actors into ``WorkerLost`` /
    ``IndexLost`` for the runner."""

    def __init__(self, life: JobLifecycle, plan: PoolPlan, job_plan: JobPlan,
                 ledger: QuotaLedger):
        """``ledger``: the quota ledger as the job starts (``JobLifecycle.ledger``)."""
        self.life = life
        self.pool = plan
        self.job_plan = job_plan
        self.workers = plan.workers
        spec = life.spec
        small = PoolPlan.small_options()
        v = spec.validation
        recovery = {"spec": spec, "uri": life.uri, "job_id": life.job_id,
                    "storage_options": life.storage_options, "merge": life.merge,
                    "retry": life.retry, "journal": True}
        job = life.job_id
        names = ServiceNames(partitions=[f"dedup:{job}:{p}" for p in range(plan.partitions)],
                             quota=f"quota:{job}", limiters={},
                             scorers=[f"scorer:{job}:{i}" for i in range(plan.gpu_actors)]
                             if plan.slow else [])
        self.partitions = [
            DedupPartitionActor.options(name=name, namespace=NAMESPACE, **small).remote(
                p, plan.partitions, v.near_duplicate_threshold, v.level != "fast", recovery,
                life.index_starts_empty, signatures=life.index_signatures)
            for p, name in enumerate(names.partitions)]
        self.quota = QuotaActor.options(name=names.quota, namespace=NAMESPACE, **small).remote(
            ledger, {**life.recovery(), "unjournaled": unjournaled_margin(plan.workers)})
        self.limiters: dict[int, Any] = {}
        self.limiter_names: dict[int, str] = {}
        self.limiter_quotas: dict[int, Optional[int]] = {}
        self.job_id = life.job_id
        for i, src in enumerate(spec.sources):
            if src.engine != "urllist":
                self.limiters[i] = get_rate_limiter(src.engine, src)
                self.limiter_quotas[i] = job_quota(src)
                names.limiters[i] = limiter_name(src.engine, src)
                self.limiter_names[i] = names.limiters[i].removeprefix(LIMITER_PREFIX)
        self.scorers = [SlowScorer.options(name=name, namespace=NAMESPACE,
                                           **plan.gpu_options()).remote(
                                               spec, plan.device, job,
                                               scorers_dedup_themselves(spec, len(names.scorers)))
                        for name in names.scorers]
        self.handles = [ShardWorker.options(**plan.worker_options()).remote(job_plan, names, i)
                        for i in range(plan.workers)]
        self.incarnations: list[Optional[str]] = [None] * plan.workers
        self.nodes: Counter = Counter()
        self.late: set[int] = set()
        """Workers not started: placed late, or lost and on their way back (``_rejoin``)."""
        self._starts: dict[int, asyncio.Future] = {}
        self._rejoining: set[int] = set()

    async def start(self) -> None:
        """Every worker opens and checks it can write the output, before any download. A
        worker lost while starting (its node went away) is resent nothing until it is back.

        A worker Ray has not placed (no node has room for it: other jobs, Serve, or the small
        actors took it) does not hold the job up silently. Every ``START_WARN_S`` a warning
        says how many wait and what one asks for. Once at least one worker has started, the
        job goes on with those at the first warning; the late ones (``late``) are sent nothing
        until they start, and then join (``revive``). With none started after
        ``START_GIVE_UP_S``, the job fails with a ``PlanningError`` that says what to change."""
        self._starts = {w: asyncio.ensure_future(result(h.start.remote()))
                        for w, h in enumerate(self.handles)}
        begun = time.monotonic()
        waiting = set(self._starts)
        while waiting:
            done, _ = await asyncio.wait([self._starts[w] for w in waiting],
                                         timeout=START_WARN_S)
            for w in [w for w in waiting if self._starts[w] in done]:
                waiting.discard(w)
                self._started(w, self._starts[w])
            if not waiting or done:
                continue
            waited = time.monotonic() - begun
            pending = (f"{len(waiting)} of {self.workers} shard workers have not started after "
                       f"{waited:.0f} s (no node has room for one, or they are slow to start; "
                       f"{_needs(self.pool.worker_needs())}; free per node: "
                       f"{_describe_nodes(node_resources())})")
            if any(inc is not None for inc in self.incarnations):
                self.late = set(waiting)
                log.warning("%s; the job goes on with the %d started, and the others join "
                            "when Ray places them", pending, self.workers - len(waiting))
                break
            if waited >= START_GIVE_UP_S:
                raise PlanningError(f"{pending}. Make room on the nodes (other jobs or Serve "
                                    "may hold it), lower resources.worker_cpus, change "
                                    "resources.worker_resources, or leave resources.workers "
                                    "unset to size the pool per node")
            log.warning("%s; still waiting (the job fails after %.0f s)", pending,
                        START_GIVE_UP_S)
        alive = [w for w, inc in enumerate(self.incarnations) if inc is not None]
        if not alive:
            raise PlanningError("no worker could start: every node that could run one was "
                                "lost; check the cluster and run the job again")
        nodes = await asyncio.gather(*(result(self.handles[w].node.remote()) for w in alive),
                                     return_exceptions=True)
        self.nodes = Counter(n for n in nodes if isinstance(n, str))

    def _started(self, worker: int, start: asyncio.Future) -> None:
        """Take in a worker's finished ``start``: its incarnation, or why it has none."""
        exc = start.exception()
        if isinstance(exc, RayTaskError):
            raise PlanningError(f"a worker cannot start: {remote_cause(exc)}")
        if exc is not None:
            if not isinstance(exc, _LOST):
                raise exc
            log.warning("worker %d was lost while starting: %s", worker, exc)
        else:
            self.incarnations[worker] = start.result()

    def _lost(self, worker: int, exc: BaseException) -> WorkerLost:
        """The worker's actor died or cannot be reached: Ray restarts it (``max_restarts``),
        and it is late until it is back (``revive``)."""
        if worker not in self.late:
            self.late.add(worker)
            self._rejoining.add(worker)
            self._send_back(worker)
        return WorkerLost(worker, _why(exc))

    def _send_back(self, worker: int) -> None:
        task = asyncio.ensure_future(self._rejoin(worker))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # seen by ``revive``
        self._starts[worker] = task

    async def _rejoin(self, worker: int) -> str:
        """A lost worker's way back. What it had not written was resent to others, so it drops
        it (an actor that was only unreachable still holds it; a restarted one has none)."""
        handle = self.handles[worker]
        await result(handle.discard.remote())
        return await result(handle.start.remote())

    async def run(self, worker: int, unit: WorkUnit) -> tuple[UnitReport, WorkerEvents]:
        try:
            incarnation, report, events = await result(self.handles[worker].run.remote(unit))
        except RayTaskError as exc:
            cause = remote_cause(exc)
            if isinstance(cause, _LOST):
                raise self._lost(worker, cause) from None
            raise remote_error(exc) from None
        except _LOST as exc:
            raise self._lost(worker, exc) from None
        self.incarnations[worker] = incarnation
        return report, events

    async def flush(self) -> list[Union[WorkerEvents, WorkerLost]]:
        async def one(w: int) -> Union[WorkerEvents, WorkerLost]:
            if w in self.late:
                return WorkerLost(w, "it has not started, or not come back")
            try:
                incarnation, events = await result(self.handles[w].flush.remote())
            except RayTaskError as exc:
                raise remote_error(exc) from None
            except _LOST as exc:
                return self._lost(w, exc)
            self.incarnations[w] = incarnation
            return events

        return list(await asyncio.gather(*(one(w) for w in range(len(self.handles)))))

    async def revive(self, worker: int) -> bool:
        """Whether a late worker's start (or a lost one's ``_rejoin``) has ended, without
        waiting for it. A lost one whose way back failed (its actor was restarting, or is
        gone for good) is sent on it again."""
        start = self._starts[worker]
        if not start.done():
            return False
        if start.exception() is not None:
            if worker in self._rejoining:
                self._send_back(worker)
            return False
        self.late.discard(worker)
        self.incarnations[worker] = start.result()
        if worker in self._rejoining:
            self._rejoining.discard(worker)
            log.info("worker %d is back and rejoins the job", worker)
            return True
        try:
            self.nodes[await result(self.handles[worker].node.remote())] += 1
        except _LOST:
            return False
        log.info("worker %d has started and joins the job", worker)
        return True

    def _placed(self) -> list[Any]:
        return [h for w, h in enumerate(self.handles) if w not in self.late]

    async def reset(self) -> None:
        await asyncio.gather(*(result(h.discard.remote()) for h in self._placed()),
                             return_exceptions=True)

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel.remote()

    async def in_flight(self) -> dict[str, dict[str, int]]:
        """Every worker's ``in_flight``. The driver's loop waits for the answers, so they get
        a quarter of a second: past it (a worker busy starting, or lost) the snapshot goes
        without them."""
        try:
            answers = await asyncio.wait_for(
                asyncio.gather(*(result(h.in_flight.remote()) for h in self._placed()),
                               return_exceptions=True), 0.25)
        except asyncio.TimeoutError:
            return {}
        merged: dict[str, dict[str, int]] = {}
        for answer in answers:
            if isinstance(answer, dict):
                merged.update(answer)
        return merged

    async def dedup_stats(self) -> dict[str, Any]:
        """The partitions' stats summed; ``unavailable`` says which did not answer (their
        counts are missing from the sums)."""
        stats = await _stats([p.stats.remote() for p in self.partitions])
        total: Counter = Counter()
        for s in stats:
            if isinstance(s, dict):
                total.update(s)
        missing = [f"partition {p}: {s}" for p, s in enumerate(stats) if isinstance(s, str)]
        return {"partitions": len(self.partitions), **dict(total),
                **({"unavailable": missing} if missing else {})}

    async def engine_stats(self) -> dict[str, Any]:
        """Each engine's rate limiter's snapshot, or ``{"unavailable": why}`` for one that
        did not answer (a limiter lost since the job's last search)."""
        snaps = await _stats([lim.snapshot.remote(source_key(self.job_id, i),
                                                  self.limiter_quotas.get(i))
                              for i, lim in self.limiters.items()])
        return {self.limiter_names[i]: snap if isinstance(snap, dict) else {"unavailable": snap}
                for i, snap in zip(self.limiters, snaps)}

    def shutdown(self) -> None:
        """Kill the job's actors (their processes end, connections and all): also when the
        job itself is being cancelled, so nothing here awaits."""
        for start in self._starts.values():
            start.cancel()
        for actor in self.handles + self.partitions + self.scorers + [self.quota]:
            ray.kill(actor)


FINAL_STATE_WAIT_S = 10.0
"""How long a finished job waits for its progress actor to take its final state."""


def progress_actor(job_id: str, name: str) -> Any:
    """The job's progress actor: the live one of its name, else a new one. It restarts where
    its node is lost (its calls are retried there), and starts afresh from the next snapshot."""
    return ProgressActor.options(name=progress_name(job_id), namespace=NAMESPACE,
                                 get_if_exists=True, **PoolPlan.small_options()
                                 ).remote(job_id, name)


class ProgressReporter:
    """Sends snapshots and metric deltas to the progress actor, if the job has one; notices
    cancel requests; shows each snapshot locally (``local``).

    The actor only reports, so losing it never fails the job: ``recreate`` gets it back (the
    API and the dashboard follow the job again from the next snapshot); without one, the job
    goes on unreported. A warning says so once."""

    def __init__(self, actor: Any, runner: Callable[[], JobRunner],
                 local: Optional[Callable] = None,
                 recreate: Optional[Callable[[], Any]] = None):
        self.actor = actor
        self.runner = runner
        self.local = local
        self.recreate = recreate
        self._warned = False
        self._sent: dict[str, Counter] = {"candidates": Counter(), "accepted": Counter(),
                                          "rejected": Counter()}
        self._bytes = 0
        self._pending: list[ray.ObjectRef] = []

    def _deltas(self, snapshot: dict[str, Any]) -> dict[str, Any]:
        from builder.reasons import Reason, stage_of

        counts = self.runner().counts
        now = {"candidates": Counter({k: c.candidates for k, c in counts.classes.items()}),
               "accepted": Counter({k: c.accepted for k, c in counts.classes.items()}),
               "rejected": Counter()}
        for c in counts.classes.values():
            for reason, n in c.rejected.items():
                now["rejected"][f"{stage_of(Reason(reason)).value}:{reason}"] += n
        deltas: dict[str, Any] = {}
        for key, values in now.items():
            deltas[key] = {k: v - self._sent[key][k] for k, v in values.items()
                           if v - self._sent[key][k] > 0}
            self._sent[key] = values
        deltas["bytes"] = max(0, counts.bytes_downloaded - self._bytes)
        self._bytes = counts.bytes_downloaded
        deltas["queues"] = {"units_in_flight": snapshot.get("units_in_flight", 0)}
        return deltas

    def __call__(self, snapshot: dict[str, Any]) -> None:
        if self.actor is not None:
            self._send(snapshot)
        if self.local is not None:
            self.local(snapshot)

    def _send(self, snapshot: dict[str, Any]) -> None:
        # Wait briefly for the answer (at most every progress_every_s), so a cancel request is
        # seen within one interval; late answers are kept and read next time, never dropped.
        self._pending.append(self.actor.update.remote(snapshot, self._deltas(snapshot)))
        ready, self._pending = ray.wait(self._pending, num_returns=len(self._pending),
                                        timeout=1.0)
        answers: list[bool] = []
        lost: Optional[BaseException] = None
        for ref in ready:
            try:
                answers.append(ray.get(ref))
            except _LOST as exc:
                lost = exc
        if lost is not None:
            self._replace(lost)
        if any(answers):
            self.runner().cancel()

    def _replace(self, exc: BaseException) -> None:
        """The actor is lost (killed, or out of restarts): get it back, or go on without one.
        Its unanswered updates go with it (a cancel request it held too)."""
        if not self._warned:
            self._warned = True
            log.warning("the job's progress actor was lost (%s); %s", _why(exc),
                        "it is started again" if self.recreate is not None
                        else "the job goes on without progress reports")
        self._pending = []
        self.actor = self.recreate() if self.recreate is not None else None

    def set_state(self, state: str, **info: Any) -> None:
        """Tell the actor the job's state, without waiting for it."""
        if self.actor is not None:
            self.actor.set_state.remote(state, **info)

    async def final_state(self, state: str, **info: Any) -> None:
        """Tell the actor the job's final state and wait until it has it, or for
        ``FINAL_STATE_WAIT_S`` at most: the job is done either way."""
        if self.actor is None:
            return
        try:
            await asyncio.wait_for(result(self.actor.set_state.remote(state, **info)),
                                   FINAL_STATE_WAIT_S)
        except asyncio.TimeoutError:
            log.warning("the job's progress actor did not take its final state (%s) within "
                        "%g s", state, FINAL_STATE_WAIT_S)
        except _LOST as exc:
            log.warning("the job's progress actor was lost before its final state (%s): %s",
                        state, _why(exc))

    def close(self) -> None:
        """End the actor (the job is over)."""
        if self.actor is not None:
            ray.kill(self.actor)


def check_fits(plan: PoolPlan, resources: dict[str, float]) -> None:
    """Pools that ask for more than the cluster has would wait forever: refuse at planning."""
    need = plan.required()
    have = resources.get("CPU", 0.0)
    if need["CPU"] > have + 1e-6:
        raise PlanningError(
            f"the job's actors need {need['CPU']:.2f} CPUs but the cluster has {have:g} free "
            "(other jobs or Serve may hold the rest): lower resources.workers "
            f"({plan.workers}) x worker_cpus ({plan.worker_cpus}), or leave resources.workers "
            "unset to size the pool from what is free")


def _needs(needs: dict[str, float]) -> str:
    return "each asks for " + ", ".join(f"{v:g} {k}" for k, v in needs.items() if v)


def _describe_nodes(nodes: list[dict[str, float]]) -> str:
    """Each node's free CPUs, GPUs and custom resources (not memory, not Ray's own labels)."""
    def one(node: dict[str, float]) -> str:
        shown = {k: v for k, v in node.items() if k not in ("memory", "object_store_memory")
                 and not k.startswith(("node:", "accelerator_type:"))}
        shown.setdefault("CPU", 0.0)
        return "{" + ", ".join(f"{k}: {v:.4g}" for k, v in sorted(shown.items())) + "}"

    return ", ".join(one(n) for n in nodes) or "no live node"


def check_nodes(spec: DatasetSpec, plan: PoolPlan, nodes: list[dict[str, float]]) -> PoolPlan:
    """A worker lives on one node: a pool that fits the cluster's total can still not fit its
    nodes, and then the workers left over would wait for room forever. A pool sized from
    the cluster shrinks to what the nodes hold; one the spec sized is refused at planning,
    with what each node has free and what to change."""
    placeable = max_workers(plan, nodes) if nodes else plan.workers
    if placeable >= plan.workers:
        return plan
    if spec.resources.workers is None and placeable >= 1:
        log.info("the nodes hold %d workers of %g CPU beside the job's other actors, not %d",
                 placeable, plan.worker_cpus, plan.workers)
        from dataclasses import replace

        return replace(plan, workers=placeable)
    others = f"{plan.small_actors} small actors of 0.05 CPU"
    if plan.slow:
        others += f" and {plan.gpu_actors} scorer(s), " + _needs(plan.scorer_needs())
    fits = (f"at most {placeable} fit" if placeable >= 0
            else "not even the job's other actors fit")
    raise PlanningError(
        f"the job's {plan.workers} shard workers cannot all be placed on the cluster's nodes "
        f"({_needs(plan.worker_needs())}, and a worker runs on one node; beside them the job "
        f"runs {others}): {fits}. Free per node: {_describe_nodes(nodes)}. Lower "
        f"resources.worker_cpus ({plan.worker_cpus:g}) or resources.workers ({plan.workers})"
        + (", change resources.worker_resources" if plan.worker_resources else "")
        + ", or leave resources.workers unset to size the pool per node")


def check_gpus(spec: DatasetSpec, plan: PoolPlan, resources: dict[str, float]) -> PoolPlan:
    """At the slow level, make sure the GPUs the spec asks for exist (or fall back to CPU)."""
    if spec.validation.level != "slow" or plan.gpus_per_actor == 0:
        return plan
    need = plan.gpu_actors * plan.gpus_per_actor
    have = resources.get("GPU", 0.0)
    if have >= need:
        return plan
    if spec.resources.on_no_gpu == "fail":
        raise PlanningError(f"validation level 'slow' asks for {need:g} GPU(s) "
                            f"(resources.gpu_actors x resources.gpus_per_actor) but the cluster "
                            f"has {have:g}; add GPU nodes, or set resources.on_no_gpu: cpu")
    log.warning("no GPU in the cluster (%g needed): the slow validators run on CPU", need)
    from dataclasses import replace

    return replace(plan, gpus_per_actor=0.0)


MIN_WORKER_CPUS = 0.25
"""The smallest worker a job sized from what is free starts with."""
START_WARN_S = 30.0
"""How long ``RayExecutor.start`` waits for every worker before it warns (and goes on with
those that started)."""
START_GIVE_UP_S = 300.0
"""How long it waits for a first worker before the job fails."""


def node_resources() -> list[dict[str, float]]:
    """Each live node's free resources. The one use of Ray's ``available_resources_per_node``
    (a DeveloperAPI); through Ray Client, asked by a task on the cluster."""
    from ray.util.client import ray as client

    if client.is_connected():
        return ray.get(_node_resources.remote())
    from ray._private.state import available_resources_per_node

    return [dict(free) for free in available_resources_per_node().values()]


@ray.remote(num_cpus=0)
def _node_resources() -> list[dict[str, float]]:
    return node_resources()


async def wait_for_room(spec: DatasetSpec, wait_s: float = 15.0) -> None:
    """Wait, up to ``wait_s``, until the cluster has room for the job's small actors, its
    scorers at the slow level, and one worker: actors of a job that just ended free their
    CPUs a moment after they are killed (a cluster that also runs Serve or other jobs is
    sized from what is free, not its total)."""
    from actors.options import CPUS_PER_PARTITION, SMALL_CPUS

    total = ray.cluster_resources().get("CPU", 0.0)
    partitions = spec.resources.dedup_partitions or max(1, int(-(-total // CPUS_PER_PARTITION)))
    res = spec.resources
    need = (partitions + 2) * SMALL_CPUS + (res.worker_cpus * (res.workers or 0)
                                            or MIN_WORKER_CPUS)
    if spec.validation.level == "slow":
        need += res.gpu_actors * res.gpu_actor_cpus
    deadline = time.monotonic() + wait_s
    while ray.available_resources().get("CPU", 0.0) + 1e-6 < min(need, total) \
            and time.monotonic() <= deadline:
        await asyncio.sleep(0.2)


def cpu_nodes() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU")]


@ray.remote(num_cpus=0)
def _probe(uri: str, storage_options: Optional[dict], name: str, expect: list[str]
           ) -> tuple[str, list[str]]:
    """On one node: write a probe file into the shared output, list the others it can see."""
    fs, root = open_fs(uri, storage_options)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{name}", b"probe")
    missing = [p for p in expect if not fs.exists(f"{root}/{p}")]
    return ray.get_runtime_context().get_node_id(), missing


def check_output_nodes(spec: DatasetSpec, uri: str, storage_options: Optional[dict]) -> None:
    """A local output works only on a disk the driver (which publishes) and every node that
    writes share: on a cluster of several nodes, or from a driver outside the cluster (Ray
    Client, ``ray://``), refuse it unless the spec says the filesystem is shared, and then
    prove it: a probe file from the driver and from every node, each seen by all."""
    from ray.util.client import ray as ray_client

    nodes = cpu_nodes()
    client = ray_client.is_connected()
    if not is_local_uri(uri) or (len(nodes) <= 1 and not client):
        return
    if not spec.output.shared_filesystem:
        where = ("this driver joins the cluster through Ray Client (ray://): the workers would "
                 "write to the cluster's disks, and the dataset be published from this "
                 "machine's" if client else
                 f"the cluster has {len(nodes)} nodes and each would write to its own disk")
        raise PlanningError(
            f"the output {uri} is a local path, but {where}: use an object store "
            "(s3://bucket/prefix, gs://...), or, if the path is on a filesystem every node "
            "(and this machine) mounts (NFS, ...), set output.shared_filesystem: true")
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex[:8]
    names = [f".pixcrawler-probe-{token}-{i}" for i in range(len(nodes))]
    mine = f".pixcrawler-probe-{token}-driver"
    fs, root = open_fs(uri, storage_options)
    with storage_errors(uri, "probe"):
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(f"{root}/{mine}", b"probe")
    refs = [_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(uri, storage_options, names[i], [])
        for i, n in enumerate(nodes)]
    get_remote(refs)
    checks = [_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(uri, storage_options, f"{names[i]}-seen",
                                         names + [mine])
        for i, n in enumerate(nodes)]
    problems = [(f"node {node[:12]}", missing) for node, missing in get_remote(checks)
                if missing]
    with storage_errors(uri, "probe"):
        unseen = [n for n in names if not fs.exists(f"{root}/{n}")]
        if unseen:
            problems.append(("this driver", unseen))
        delete_files(fs, [path for name in names + [mine]
                          for path in (f"{root}/{name}", f"{root}/{name}-seen")
                          if fs.exists(path)])
    if problems:
        raise PlanningError(
            f"output.shared_filesystem is set, but {problems[0][0]} cannot see files others "
            f"wrote under {uri}: it is not shared. Use an object store, or mount the same "
            "filesystem on every node and the driver's machine")


def check_job_output(uri: str) -> None:
    """Under ``ray job submit`` a relative local path would land in the job's working
    directory, which Ray deletes when the job ends."""
    if is_local_uri(uri) and os.environ.get(JOB_CONFIG_ENV) is not None \
            and not os.path.isabs(os.path.expanduser(uri.removeprefix("file://"))):
        raise PlanningError(
            f"the output {uri!r} is a relative path, and this job runs under 'ray job submit', "
            "whose working directory Ray deletes when the job ends: give an absolute path "
            "(on a filesystem that outlives the job) or an object store URI (--output "
            "s3://bucket/prefix)")


def final_state(cancelled: bool, stats: dict[str, Any]) -> tuple[str, Optional[str]]:
    """The state, and error, whoever watches the job (the API, the dashboard) is told. An
    empty result is a failure. A retry that leaves a partial dataset partial (its crawl was
    cancelled before the retry) succeeded at what it was asked: it is not told "no image was
    accepted", which may not be so."""
    if cancelled:
        return "cancelled", None
    if stats.get("partial_reason") == "empty":
        return "failed", empty_failure(stats)
    return "succeeded", None


async def run_job_async(spec: DatasetSpec, *, job_id: Optional[str] = None,
                        uri: Optional[str] = None, progress: Optional[Callable] = None,
                        storage_options: Optional[dict] = None, resume: bool = False,
                        continuation: Optional[Continuation] = None,
                        install_signals: bool = False, runner_hook=None,
                        observed: bool = True) -> JobResult:
    """Run one job on the connected Ray cluster (``resume``: continue an interrupted one;
    ``continuation``: a ready-made one, e.g. from ``plan_retry``).

    ``observed``: the job gets a progress actor, through which the HTTP API, the dashboard's
    metrics and other drivers follow it and ask it to stop. Off only for a Ray that nothing
    else can reach (the CLI's embedded Ray without a dashboard): there it would cost an actor
    process, whose start the job waits for, and no one would read it."""
    from builder.pipeline import units_per_worker

    uri = uri or spec.output_uri()
    check_job_output(uri)
    await asyncio.to_thread(check_output_nodes, spec, uri, storage_options)
    await wait_for_room(spec)
    # One snapshot for sizing and checks: the cluster's free resources are its nodes' sum (a
    # separate read could see a finished job's actors still holding CPUs, the other not).
    nodes = await asyncio.to_thread(node_resources)
    resources = dict(sum((Counter(n) for n in nodes), Counter()))
    plan = check_gpus(spec, plan_pools(spec, resources, units_per_worker(spec), nodes),
                      resources)
    check_fits(plan, resources)
    plan = check_nodes(spec, plan, nodes)
    if plan.slow:
        from builder.slow import check_slow_requirements

        await asyncio.to_thread(check_slow_requirements, spec)
    life = JobLifecycle(spec, uri=uri, job_id=job_id, storage_options=storage_options,
                        resume=resume, continuation=continuation)
    await asyncio.to_thread(life.prepare)
    ledger = await asyncio.to_thread(life.ledger)
    job_id = life.job_id
    log.info("[%s] starting: %d classes, %d workers of %g CPU, %d index partitions", job_id,
             len(spec.labels), plan.workers, plan.worker_cpus, plan.partitions)
    recreate = functools.partial(progress_actor, job_id, spec.name)
    reporter = ProgressReporter(recreate() if observed else None, lambda: life.runner, progress,
                                recreate=recreate)
    executor = RayExecutor(life, plan, life.job_plan(cpu_threads=1, workers=plan.workers),
                           ledger)
    try:
        await executor.start()
        outcome = await life.run(executor, units_per_worker=plan.units_per_worker,
                                 progress=reporter, install_signals=install_signals,
                                 runner_hook=runner_hook)
        reporter.set_state("writing")
        extra = {"runner": "ray", "pools": plan.__dict__, "engines": await executor.engine_stats(),
                 "dedup": await executor.dedup_stats(),
                 "workers_by_node": dict(executor.nodes)}
        done = await life.publish_async(outcome, extra, install_signals=install_signals)
        state, error = final_state(outcome.cancelled, done.stats)
        await reporter.final_state(state, output_uri=done.uri, stats=done.stats, error=error)
        return done
    except CancelledUnpublished as exc:  # a cancel, which found nothing it could publish
        reporter.set_state("cancelled", error=str(exc))
        raise
    except BaseException as exc:
        reporter.set_state("failed", error=f"{type(exc).__name__}: {exc}")
        log.error("[%s] failed (%s: %s); what was committed is journaled at %s: continue it "
                  "with --resume", job_id, type(exc).__name__, exc, join(uri, ""))
        raise
    finally:
        executor.shutdown()
        reporter.close()


def run_job(spec: DatasetSpec, *, address: Optional[str] = None, **kwargs: Any) -> JobResult:
    """Connect (embedded Ray unless an address is given) and run one job."""
    connect(address)
    return asyncio.run(run_job_async(spec, **kwargs))
