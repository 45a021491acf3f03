"""The job coordinator on Ray: the shared ``JobRunner`` with a backend of actors.

Data path per batch: coordinator -> Downloader (async, many fetches) -> HashValidator (fast +
medium validation, dedup via the DedupActor) -> coordinator reads only the small, byte-free
records; the accepted images stay in the object store as Arrow tables. When the job ends, Ray
Data reads those tables, keeps the selected images, assigns splits and shards, resizes/re-encodes,
and writes the shards through the builder's writers; the driver writes the manifests last.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections import Counter
from typing import Any, Callable, Optional

import ray

from actors import NAMESPACE
from actors.dedup import DedupActor
from actors.download import Downloader
from actors.options import PoolPlan, plan_pools
from actors.progress import ProgressActor, progress_name
from actors.ratelimit import get_rate_limiter, limiter_name
from actors.search import SearchWorker
from actors.slow import SlowScorer
from actors.validate import HashValidator
from actors.writer import plan_shards, write_shards
from builder.engines.base import SearchPage
from builder.engines import SearchEngine
from builder.errors import EngineError, EngineUnavailable, PixCrawlerError
from builder.job import JobLedger, JobRunner, SearchTask
from builder.journal import Journal, ResumeState
from builder.pipeline import (Continuation, JobResult, JournaledSink, build_engines,
                              engine_names, expand_queries, finish_dataset, plan_continuation)
from builder.records import Record
from builder.spec import DatasetSpec
from builder.writers import DatasetWriter
from cluster.connect import connect

log = logging.getLogger("pixcrawler.coordinator")


class PlanningError(PixCrawlerError):
    """The cluster cannot run the job as configured."""


class RayBackend:
    """Actor pools for one job. ``shutdown()`` frees their resources."""

    def __init__(self, spec: DatasetSpec, plan: PoolPlan, job_id: str,
                 engines: list[tuple[str, bool]],
                 list_sources: Optional[dict[int, SearchEngine]] = None):
        self.spec = spec
        self.plan = plan
        self.job_id = job_id
        small = PoolPlan.small_options()
        self.dedup = DedupActor.options(**small).remote(
            spec.validation.near_duplicate_threshold, spec.validation.level != "fast")
        retry = {"max_restarts": 2, "max_task_retries": 2}
        self.downloaders = [Downloader.options(**plan.download_options(), **retry)
                            .remote(spec.download, job_id) for _ in range(plan.download_actors)]
        slow_spec = spec if plan.slow else None
        self.validators = [HashValidator.options(**plan.hash_options(), **retry)
                           .remote(spec.validation, self.dedup, job_id, slow_spec)
                           for _ in range(plan.hash_actors)]
        self.scorers = [SlowScorer.options(**plan.gpu_options(), **retry)
                        .remote(spec, plan.device, job_id)
                        for _ in range(plan.gpu_actors)] if plan.slow else []
        self.updates: dict[str, dict[str, Any]] = {}
        self.limiters: dict[int, Any] = {}
        names: dict[int, str] = {}
        for i, (name, query_based) in enumerate(engines):
            if query_based:
                src = spec.sources[i] if i < len(spec.sources) else None
                self.limiters[i] = get_rate_limiter(name, src)
                names[i] = limiter_name(name, src).removeprefix("ratelimit:")
        self._limiter_names = names
        limiters = self.limiters
        # List sources (URL lists) query nothing and are already loaded here: the coordinator
        # pages them itself. Search workers exist only for engines that send queries.
        self.list_sources = list_sources or {}
        query_based = any(qb for _, qb in engines)
        self.searchers = [SearchWorker.options(**small).remote(spec, limiters, job_id)
                          for _ in range(plan.search_workers if query_based else 0)]
        self.tables: dict[int, ray.ObjectRef] = {}
        self._batches = 0
        self._searches = 0
        self._load = [0] * len(self.validators)
        self._actors_alive = True

    @property
    def in_flight(self) -> int:
        return sum(self._load)

    async def search(self, task: SearchTask) -> SearchPage:
        engine = self.list_sources.get(task.source)
        if engine is not None:
            return await asyncio.to_thread(engine.search, task.query, label=task.label,
                                           page=task.page, per_page=task.per_page)
        worker = self.searchers[self._searches % len(self.searchers)]
        self._searches += 1
        status, payload = await worker.search.remote(task)
        if status == "ok":
            return payload
        if payload["final"]:
            raise EngineUnavailable(payload["message"])
        raise EngineError(payload["message"], retryable=payload["retryable"],
                          retry_after=payload["retry_after"])

    async def process(self, records: list[Record]) -> list[Record]:
        batch = self._batches
        self._batches += 1
        fetched = self.downloaders[batch % len(self.downloaders)].fetch.remote(records)
        vi = min(range(len(self.validators)), key=self._load.__getitem__)
        self._load[vi] += 1
        try:
            light_ref, table_ref, prepared_ref = self.validators[vi].validate.remote(fetched)
            light: list[Record] = await light_ref
        finally:
            self._load[vi] -= 1
        if self.scorers:
            passed = {r.id for r in light if not r.rejected}
            light = await self.scorers[batch % len(self.scorers)].score.remote(prepared_ref)
            await self.forget([r.id for r in light if r.rejected and r.id in passed])
            for r in light:
                if not r.rejected:
                    self.updates[r.id] = {"label": r.label, "nsfw_score": r.nsfw_score,
                                          "clip_score": r.clip_score, "embedding": r.embedding}
        self.tables[batch] = table_ref
        for r in light:
            r.extra["batch"] = batch
        return light

    async def forget(self, image_ids: list[str]) -> None:
        await self.dedup.forget.remote(image_ids)

    async def seed(self, hashes: list[tuple[str, str, str, str]]) -> None:
        """Images kept by an earlier run of the job (resume): the index starts with them."""
        await self.dedup.seed.remote(hashes)

    async def engine_stats(self) -> dict[str, Any]:
        """Each engine's limiter snapshot: pacing, breaker state, quotas, refusals."""
        snaps = await asyncio.gather(*[lim.snapshot.remote() for lim in self.limiters.values()])
        return {self._limiter_names[i]: snap for i, snap in zip(self.limiters, snaps)}

    async def fetch_stats(self) -> dict[str, int]:
        total: Counter = Counter()
        for stats in await asyncio.gather(*[d.stats.remote() for d in self.downloaders]):
            total.update({k: v for k, v in stats.items() if isinstance(v, (int, float))})
        return dict(total)

    def shutdown(self) -> None:
        actors, self._actors_alive = (self.downloaders + self.validators + self.searchers
                                      + self.scorers + [self.dedup]) \
            if self._actors_alive else [], False
        for actor in actors:
            ray.kill(actor)


class RaySink(JournaledSink):
    """Writes shards through Ray Data as they fill, in the background; journals each one.

    Selected images wait in the object store (their validator's Arrow table) only until a full
    shard of them exists; a table is dropped once all its selected images are written.
    """

    def __init__(self, spec: DatasetSpec, writer: DatasetWriter, backend: RayBackend,
                 plan: PoolPlan, journal: Optional[Journal] = None,
                 resume: Optional[ResumeState] = None):
        super().__init__(journal, resume)
        self.spec = spec
        self.writer = writer
        self.backend = backend
        self.plan = plan
        self.pending: list[tuple[int, str]] = []
        self._unwritten: Counter = Counter()
        self._flush: Optional[asyncio.Task] = None

    async def add(self, records: list[Record]) -> None:
        for r in records:
            self.pending.append((r.extra["batch"], r.id))
            self._unwritten[r.extra["batch"]] += 1
        if self._flush is not None and self._flush.done():
            self._flush.result()
            self._flush = None
        if self._flush is None and len(self.pending) >= self.spec.output.shard_size:
            self._flush = asyncio.ensure_future(self._write_pending(full_only=True))

    async def _write_pending(self, full_only: bool) -> None:
        size = self.spec.output.shard_size
        n = (len(self.pending) // size) * size if full_only else len(self.pending)
        items, self.pending = self.pending[:n], self.pending[n:]
        if not items:
            return
        selected: dict[int, list[str]] = {}
        for batch, image_id in items:
            selected.setdefault(batch, []).append(image_id)
        plan = plan_shards(selected, self.backend.tables, size, first=self.next_shard)
        self.next_shard += len(plan)
        self.manifest.extend(await asyncio.to_thread(self._write, plan))
        for batch, ids in selected.items():
            self._unwritten[batch] -= len(ids)
            if self._unwritten[batch] <= 0:
                self.backend.tables.pop(batch, None)
                del self._unwritten[batch]
        await asyncio.to_thread(self.checkpoint)

    def _write(self, plan: dict[int, Any]) -> list[dict[str, Any]]:
        """Ray Data: one row per shard; each task fetches its tables and writes its shard."""
        quiet_ray_data()
        ds = ray.data.from_items([{"shard": k} for k in sorted(plan)],
                                 override_num_blocks=len(plan))
        ids = {i for parts in plan.values() for _, part in parts for i in part}
        updates = {i: u for i, u in self.backend.updates.items() if i in ids}
        ds = ds.map_batches(write_shards, batch_size=1, batch_format="numpy",
                            num_cpus=self.plan.write_cpus,
                            fn_kwargs={"plan": plan, "output": self.spec.output,
                                       "writer": self.writer, "updates": updates})
        return ds.take_all()

    async def finish(self, stats: dict[str, Any], partial: bool, merge: bool = False) -> str:
        if self._flush is not None:
            await self._flush
            self._flush = None
        await self._write_pending(full_only=False)
        return await asyncio.to_thread(finish_dataset, self.writer, self.spec, self.manifest,
                                       self.rejects, stats, partial, merge, self.journal)


def quiet_ray_data() -> None:
    """Ray Data's own progress bars and INFO lines would drown the job's display."""
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


class ProgressReporter:
    """Sends snapshots and metric deltas to the progress actor; notices cancel requests."""

    def __init__(self, actor: Any, ledger: Callable[[], JobLedger], backend: RayBackend,
                 on_cancel: Callable[[], None], local: Optional[Callable] = None):
        self.actor = actor
        self.ledger = ledger
        self.backend = backend
        self.on_cancel = on_cancel
        self.local = local
        self._sent: dict[str, Counter] = {"candidates": Counter(), "accepted": Counter(),
                                          "rejected": Counter()}
        self._bytes = 0
        self._pending: list[ray.ObjectRef] = []

    def _deltas(self) -> dict[str, Any]:
        ledger = self.ledger()
        now = {"candidates": Counter({k: c.candidates for k, c in ledger.classes.items()}),
               "accepted": Counter({k: c.accepted for k, c in ledger.classes.items()}),
               "rejected": Counter()}
        from builder.reasons import Reason, stage_of

        for c in ledger.classes.values():
            for reason, n in c.rejected.items():
                now["rejected"][f"{stage_of(Reason(reason)).value}:{reason}"] += n
        deltas: dict[str, Any] = {}
        for key, counts in now.items():
            deltas[key] = {k: v - self._sent[key][k] for k, v in counts.items()
                           if v - self._sent[key][k] > 0}
            self._sent[key] = counts
        deltas["bytes"] = ledger.bytes_downloaded - self._bytes
        self._bytes = ledger.bytes_downloaded
        deltas["queues"] = {"batches_in_flight": self.backend.in_flight}
        return deltas

    def __call__(self, snapshot: dict[str, Any]) -> None:
        # Wait briefly for the answer (at most every progress_every_s), so a cancel request is
        # seen within one interval; late answers are kept and read next time, never dropped.
        self._pending.append(self.actor.update.remote(snapshot, self._deltas()))
        ready, self._pending = ray.wait(self._pending, num_returns=len(self._pending),
                                        timeout=1.0)
        if any(ray.get(ready)):
            self.on_cancel()
        if self.local is not None:
            self.local(snapshot)


def check_fits(plan: PoolPlan, resources: dict[str, float]) -> None:
    """Pools that ask for more than the cluster has would wait forever: refuse at planning."""
    need = plan.required()
    have = resources.get("CPU", 0.0)
    if need["CPU"] > have + 1e-6:
        raise PlanningError(
            f"the job's pools need {need['CPU']:.2f} CPUs but the cluster has {have:g}: lower "
            f"resources.hash_actors ({plan.hash_actors}) x hash_cpus ({plan.hash_cpus}), "
            f"download_actors ({plan.download_actors}) x download_cpus ({plan.download_cpus}), "
            f"write_cpus ({plan.write_cpus}), or leave the actor counts unset to size them "
            "from the cluster")


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


async def run_job_async(spec: DatasetSpec, *, job_id: Optional[str] = None,
                        uri: Optional[str] = None, progress: Optional[Callable] = None,
                        storage_options: Optional[dict] = None, resume: bool = False,
                        continuation: Optional[Continuation] = None,
                        install_signals: bool = False, runner_hook=None) -> JobResult:
    """Run one job on the connected Ray cluster (``resume``: continue an interrupted one;
    ``continuation``: a ready-made one, e.g. from ``plan_retry``)."""
    uri = uri or spec.output_uri()
    cont = continuation or await asyncio.to_thread(
        plan_continuation, spec, uri, job_id=job_id, resume=resume,
        storage_options=storage_options)
    job_id = cont.job_id
    writer = DatasetWriter(spec.output, uri, job_id, storage_options, labels=spec.labels)
    if not cont.merge and cont.state is None:
        await asyncio.to_thread(writer.check_output)
    resources = ray.cluster_resources()
    plan = check_gpus(spec, plan_pools(spec, resources), resources)
    check_fits(plan, resources)
    if plan.slow:
        from builder.slow import check_slow_requirements

        await asyncio.to_thread(check_slow_requirements, spec)
    engines = build_engines(spec)
    meta = engine_names(engines)
    list_sources = {i: e for i, e in enumerate(engines) if not e.query_based}
    for engine in engines:
        if engine.query_based:
            engine.close()
    await asyncio.to_thread(cont.journal.start, spec)
    log.info("[%s] starting: %d classes, pools %s", job_id, len(spec.labels), plan)
    progress_actor = ProgressActor.options(name=progress_name(job_id), namespace=NAMESPACE,
                                           get_if_exists=True).remote(job_id, spec.name)
    backend = RayBackend(spec, plan, job_id, meta, list_sources)
    sink = RaySink(spec, writer, backend, plan, cont.journal, cont.state)
    runner: Optional[JobRunner] = None
    loop = asyncio.get_running_loop()
    try:
        if cont.state is not None:
            await backend.seed(cont.state.hashes)
        extra, expansion = ({}, {"enabled": False}) if cont.retry is not None \
            else await asyncio.to_thread(expand_queries, spec)
        runner = JobRunner(spec, backend, sink, [] if cont.retry is not None else meta,
                           batch_size=plan.batch_size, extra_queries=extra,
                           resume=cont.state, seed_candidates=cont.retry,
                           max_in_flight=plan.max_in_flight,
                           search_concurrency=max(2, plan.search_workers * 2))
        runner.progress = ProgressReporter(progress_actor, lambda: runner.ledger, backend,
                                           runner.cancel, progress)
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, _cancel_once(loop, sig, runner, job_id))
        if runner_hook is not None:
            runner_hook(runner)
        stats = await runner.run()
        stats.update(job_id=job_id, name=spec.name, output_uri=uri, runner="ray",
                     fetch=await backend.fetch_stats(), pools=plan.__dict__,
                     keyword_expansion=expansion, engines=await backend.engine_stats(),
                     partial_reason="cancelled" if runner.cancelled else "",
                     resumed=cont.state is not None)
        progress_actor.set_state.remote("writing")
        backend.shutdown()
        published = await sink.finish(stats, partial=runner.cancelled, merge=cont.merge)
        state = "cancelled" if runner.cancelled else "succeeded"
        await progress_actor.set_state.remote(state, output_uri=published, stats=stats)
        log.info("[%s] %s: %d accepted, %d rejected of %d candidates -> %s", job_id, state,
                 stats["accepted"], stats["rejected"], stats["candidates"], published)
        return JobResult(job_id, published, stats, partial=runner.cancelled)
    except BaseException as exc:
        progress_actor.set_state.remote("failed", error=f"{type(exc).__name__}: {exc}")
        log.error("[%s] failed (%s: %s); what was written is journaled at %s: continue it "
                  "with --resume", job_id, type(exc).__name__, exc, uri)
        raise
    finally:
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        backend.shutdown()
        backend.tables.clear()
        for engine in list_sources.values():
            engine.close()
        ray.kill(progress_actor)


def _cancel_once(loop: asyncio.AbstractEventLoop, sig: int, runner: JobRunner,
                 job_id: str) -> Callable:
    def handler() -> None:
        log.warning("[%s] %s: stopping; what is accepted so far is written as a partial result",
                    job_id, signal.Signals(sig).name)
        runner.cancel()
        loop.remove_signal_handler(sig)
    return handler


def run_job(spec: DatasetSpec, *, address: Optional[str] = None, **kwargs: Any) -> JobResult:
    """Connect (embedded Ray unless an address is given) and run one job."""
    connect(address)
    return asyncio.run(run_job_async(spec, **kwargs))
