"""The whole job in one process: no Ray. Used by the builder's end-to-end tests and benchmarks.

The Ray coordinator (``cluster.coordinator``) runs the same ``JobRunner`` with a backend of actors.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from builder.dedup import DedupIndex, apply_dedup
from builder.engines import SearchEngine, SearchPage, make_engine
from builder.engines.urllist import InlineUrlsEngine
from builder.errors import EngineError
from builder.fetch import Fetcher
from builder.job import JobRunner, ProgressFn, SearchTask
from builder.journal import (Journal, ResumeError, ResumeState, load_published, published_spec,
                             remove_orphans, resumable_jobs, spec_fingerprint)
from builder.ratelimit import EngineGovernor, limits_for
from builder.reasons import TRANSIENT_REASONS
from builder.records import Candidate, Record, accepted_row, reject_row
from builder.spec import DatasetSpec
from builder.splits import assign_split
from builder.transform import ImageTransformer
from builder.validate import ImageValidator
from builder.storage import join, write_bytes
from builder.writers import DatasetWriter, read_marker

log = logging.getLogger("pixcrawler.pipeline")


def new_job_id(spec: DatasetSpec) -> str:
    return f"{spec.name}-{uuid.uuid4().hex[:8]}"


def build_engines(spec: DatasetSpec) -> list[SearchEngine]:
    """The spec's sources, in order, then the classes' inline ``urls`` if any."""
    engines = [make_engine(src, spec) for src in spec.sources]
    inline = {label: c.urls for label, c in spec.classes.items() if c.urls}
    if inline:
        engines.append(InlineUrlsEngine(inline))
    return engines


def expand_queries(spec: DatasetSpec) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Generated extra queries per class (``search.expand``), and what to record in stats.

    Never fails a job: with no LLM endpoint, or one that is down, the expander falls back to
    offline templates.
    """
    if not spec.search.expand:
        return {}, {"enabled": False}
    from builder.expand import KeywordExpander

    expander = KeywordExpander(base_url=spec.search.llm_base_url, model=spec.search.llm_model,
                               n=spec.search.expand_n)
    extra, sources = {}, {}
    for label in spec.labels:
        extra[label] = expander.expand(spec.levels_of(label)[-1], spec.queries_of(label))
        sources[label] = expander.source
    return extra, {"enabled": True, "model": expander.model, "source": sources,
                   "queries": extra}


def engine_names(engines: list[SearchEngine]) -> list[tuple[str, bool]]:
    return [(e.name, e.query_based) for e in engines]


@dataclass
class JobResult:
    job_id: str
    uri: str
    stats: dict[str, Any]
    partial: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class JournaledSink:
    """What both runners' sinks share: the manifest rows and rejects so far (seeded by a
    resume), the next shard number, and checkpoints of the journal."""

    REJECTS_PER_CHECKPOINT = 500

    def __init__(self, journal: Optional[Journal], resume: Optional[ResumeState]):
        self.journal = journal
        self.manifest: list[dict[str, Any]] = list(resume.manifest) if resume else []
        self.rejects: list[dict[str, Any]] = list(resume.rejects) if resume else []
        self.next_shard = resume.next_shard if resume else 0
        self._journaled = (len(self.manifest), len(self.rejects))

    def add_rejected(self, records: list[Record]) -> None:
        self.rejects.extend(reject_row(r) for r in records)
        if len(self.rejects) - self._journaled[1] >= self.REJECTS_PER_CHECKPOINT:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Journal what was written or decided since the last checkpoint."""
        if self.journal is None:
            return
        m, r = self._journaled
        self.journal.checkpoint(self.manifest[m:], self.rejects[r:])
        self._journaled = (len(self.manifest), len(self.rejects))


class RecordSink(JournaledSink):
    """Assigns splits, applies resize/encode, and writes shards as accepted records arrive.

    After each shard it checkpoints the journal (the shard's manifest rows and the rejects
    since the last checkpoint), so a killed job resumes from there.
    """

    def __init__(self, spec: DatasetSpec, writer: DatasetWriter,
                 journal: Optional[Journal] = None, resume: Optional[ResumeState] = None):
        super().__init__(journal, resume)
        self.spec = spec
        self.writer = writer
        self.transformer = ImageTransformer(spec.output.resize, spec.output.encode)
        self.pending: list[dict[str, Any]] = []

    def prepare(self, records: list[Record]) -> list[dict[str, Any]]:
        for record in records:
            record.split = assign_split(record.id, self.spec.output.splits)
        self.transformer(records)
        return [accepted_row(r) for r in records]

    async def add(self, records: list[Record]) -> None:
        self.pending.extend(await asyncio.to_thread(self.prepare, records))
        for r in records:
            r.data = None
        while len(self.pending) >= self.spec.output.shard_size:
            await self._flush(self.spec.output.shard_size)

    async def _flush(self, n: int) -> None:
        rows, self.pending = self.pending[:n], self.pending[n:]
        index = self.next_shard
        self.next_shard += 1
        self.manifest.extend(await asyncio.to_thread(self.writer.write_shard, rows, index))
        await asyncio.to_thread(self.checkpoint)

    async def finish(self, stats: dict[str, Any], partial: bool, merge: bool = False) -> str:
        if self.pending:
            await self._flush(len(self.pending))
        return await asyncio.to_thread(finish_dataset, self.writer, self.spec, self.manifest,
                                       self.rejects, stats, partial, merge, self.journal)


def finish_dataset(writer: DatasetWriter, spec: DatasetSpec, manifest: list[dict[str, Any]],
                   rejects: list[dict[str, Any]], stats: dict[str, Any], partial: bool,
                   merge: bool = False, journal: Optional[Journal] = None) -> str:
    """Write manifests, rejects, stats, card and spec.yaml, then publish (complete or partial;
    ``merge`` adds to the dataset already there); the journal goes once published."""
    writer.write_manifests(manifest, spec.labels)
    writer.write_rejects(rejects)
    writer.write_stats(stats)
    spec_yaml = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    writer.write_card(spec.name, spec.description, stats, spec_yaml)
    write_bytes(join(writer.staging_uri, "spec.yaml"), spec_yaml.encode(), writer.storage_options)
    if partial:
        uri = writer.publish_partial(stats.get("partial_reason") or "cancelled", merge=merge)
    else:
        uri = writer.publish(merge=merge)
    if journal is not None:
        journal.remove()
    return uri


@dataclass
class Continuation:
    """How a run continues earlier work: the state to start from and how to publish.

    ``retry`` holds candidates to decide again (``retry-failed``); such a run searches nothing.
    """

    job_id: str
    state: Optional[ResumeState] = None
    journal: Optional[Journal] = None
    merge: bool = False
    retry: Optional[list[Candidate]] = None


def plan_retry(uri: str, storage_options: Optional[dict] = None,
               job_id: Optional[str] = None) -> tuple[DatasetSpec, Continuation]:
    """``retry-failed``: the published dataset's spec and state, less the candidates rejected
    for transient reasons (timeouts, 5xx, 429, connection errors), which are tried again."""
    spec = published_spec(uri, storage_options)
    state = load_published(uri, storage_options)
    transient = {r.value for r in TRANSIENT_REASONS}
    retry = [row for row in state.rejects if row["reason"] in transient]
    state.rejects = [row for row in state.rejects if row["reason"] not in transient]
    candidates = [Candidate(url=row["url"], label=row["label"], query=row["query"] or "",
                            engine=row["engine"] or "") for row in retry
                  if row["label"] in spec.classes]
    job_id = job_id or f"{spec.name}-retry-{uuid.uuid4().hex[:6]}"
    log.info("[%s] retrying %d candidates rejected for transient reasons at %s", job_id,
             len(candidates), uri)
    return spec, Continuation(job_id, state, Journal(uri, job_id, storage_options), merge=True,
                              retry=candidates)


def plan_continuation(spec: DatasetSpec, uri: str, *, job_id: Optional[str], resume: bool,
                      storage_options: Optional[dict] = None) -> Continuation:
    """A fresh job, or (``resume``) the continuation of an interrupted one at ``uri``:
    a journal left by a killed run (its staging is reused), else a published partial dataset
    (a new run whose publish merges into it)."""
    if not resume:
        job_id = job_id or new_job_id(spec)
        journal = Journal(uri, job_id, storage_options)
        return Continuation(job_id, None, journal)
    jobs = resumable_jobs(uri, storage_options)
    if job_id is not None and job_id not in jobs and jobs:
        raise ResumeError(f"no interrupted job {job_id!r} at {uri}; there is: {', '.join(jobs)}")
    if jobs:
        if job_id is None and len(jobs) > 1:
            raise ResumeError(f"several interrupted jobs at {uri}: {', '.join(jobs)}; pick one "
                              "with --job-id")
        job_id = job_id or jobs[0]
        journal = Journal(uri, job_id, storage_options)
        state = journal.load(spec)
        removed = remove_orphans(journal, state)
        log.info("[%s] resuming from %d checkpoints: %d accepted, %d rejected so far%s", job_id,
                 state.checkpoints, len(state.manifest), len(state.rejects),
                 f"; removed {removed} unjournaled staged files" if removed else "")
        return Continuation(job_id, state, journal)
    marker = read_marker(uri, storage_options)
    if marker is not None and marker.get("status") == "partial":
        state = load_published(uri, storage_options)
        if spec_fingerprint(published_spec(uri, storage_options)) != spec_fingerprint(spec):
            raise ResumeError(f"the partial dataset at {uri} was built from a different spec; "
                              "resume needs the same spec (only 'resources' may change)")
        job_id = job_id or new_job_id(spec)
        log.info("[%s] continuing the partial dataset at %s: %d accepted, %d rejected so far",
                 job_id, uri, len(state.manifest), len(state.rejects))
        return Continuation(job_id, state, Journal(uri, job_id, storage_options), merge=True)
    raise ResumeError(f"nothing to resume at {uri}: no interrupted job and no partial dataset"
                      + (" (it holds a complete dataset)" if marker else "")
                      + "; run without --resume")


class LocalBackend:
    """fetch -> validate -> dedup in this process (validation on a thread pool)."""

    def __init__(self, spec: DatasetSpec, engines: list[SearchEngine], fetcher: Fetcher,
                 pool: ThreadPoolExecutor):
        self.spec = spec
        self.engines = engines
        self.fetcher = fetcher
        self.pool = pool
        self.validator = ImageValidator(spec.validation)
        self.governors: dict[int, EngineGovernor] = {}
        self.slow = None
        if spec.validation.level == "slow":
            from builder.slow import check_slow_requirements, make_slow_validator

            check_slow_requirements(spec)
            self.slow = make_slow_validator(
                spec, "cuda" if spec.resources.gpus_per_actor > 0 else "cpu")
        self.index = DedupIndex(spec.validation.near_duplicate_threshold,
                                near=spec.validation.level != "fast")

    def _governor(self, task: SearchTask) -> EngineGovernor:
        gov = self.governors.get(task.source)
        if gov is None:
            src = self.spec.sources[task.source] if task.source < len(self.spec.sources) else None
            gov = EngineGovernor(task.engine, limits_for(task.engine, src.options if src else None))
            self.governors[task.source] = gov
        return gov

    async def search(self, task: SearchTask) -> SearchPage:
        """One engine request, paced and guarded like the Ray runner's rate limiters."""
        engine = self.engines[task.source]
        gov = self._governor(task)
        await asyncio.sleep(gov.acquire())
        try:
            page = await asyncio.to_thread(engine.search, task.query, label=task.label,
                                           page=task.page, per_page=task.per_page)
        except EngineError as exc:
            gov.record(False, exc.status, exc.retry_after)
            raise
        gov.record(True, 200)
        return page

    async def process(self, records: list[Record]) -> list[Record]:
        records = await self.fetcher.fetch_many(records)
        loop = asyncio.get_running_loop()
        records = await loop.run_in_executor(self.pool, self.validator, records)
        apply_dedup(self.index, records)
        if self.slow is not None:
            kept = {r.id for r in records if not r.rejected}
            records = await loop.run_in_executor(self.pool, self.slow, records)
            await self.forget([r.id for r in records if r.rejected and r.id in kept])
        return records

    async def forget(self, image_ids: list[str]) -> None:
        for image_id in image_ids:
            self.index.remove(image_id)

    async def seed(self, hashes: list[tuple[str, str, str, str]]) -> None:
        """Images kept by an earlier run of the job: later duplicates of them are rejected."""
        for image_id, sha, p, d in hashes:
            self.index.add(image_id, sha, int(p or "0", 16), int(d or "0", 16))


async def run_local_async(spec: DatasetSpec, *, job_id: Optional[str] = None,
                          uri: Optional[str] = None, progress: Optional[ProgressFn] = None,
                          storage_options: Optional[dict] = None, resume: bool = False,
                          continuation: Optional[Continuation] = None,
                          runner_hook=None) -> JobResult:
    """Run a job in this process. ``runner_hook(runner)`` sees the runner (tests cancel with it).

    ``resume`` continues an interrupted job at the output URI (see ``plan_continuation``);
    ``continuation`` gives one ready-made (``plan_retry``)."""
    uri = uri or spec.output_uri()
    cont = continuation or plan_continuation(spec, uri, job_id=job_id, resume=resume,
                                             storage_options=storage_options)
    job_id = cont.job_id
    writer = DatasetWriter(spec.output, uri, job_id, storage_options, labels=spec.labels)
    if not cont.merge and cont.state is None:
        writer.check_output()
    engines = build_engines(spec)
    cont.journal.start(spec)
    sink = RecordSink(spec, writer, cont.journal, cont.state)
    try:
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="validate") as pool:
            async with Fetcher(spec.download) as fetcher:
                backend = LocalBackend(spec, engines, fetcher, pool)
                if cont.state is not None:
                    await backend.seed(cont.state.hashes)
                extra, expansion = ({}, {"enabled": False}) if cont.retry is not None \
                    else expand_queries(spec)
                runner = JobRunner(spec, backend, sink,
                                   [] if cont.retry is not None else engine_names(engines),
                                   extra_queries=extra, resume=cont.state,
                                   seed_candidates=cont.retry,
                                   batch_size=spec.batch_size(),
                                   max_in_flight=spec.resources.max_in_flight_batches or 4,
                                   progress=progress)
                if runner_hook is not None:
                    runner_hook(runner)
                stats = await runner.run()
                stats.update(job_id=job_id, name=spec.name, output_uri=uri, runner="local",
                             fetch=dict(fetcher.stats), keyword_expansion=expansion,
                             engines={g.engine: g.snapshot() for g in backend.governors.values()})
        published = await sink.finish(stats, partial=runner.cancelled, merge=cont.merge)
    except (Exception, KeyboardInterrupt):
        log.error("[%s] failed; what was written is journaled at %s: continue it with --resume",
                  job_id, uri)
        raise
    finally:
        for engine in engines:
            engine.close()
    return JobResult(job_id, published, stats, partial=runner.cancelled)


def run_local(spec: DatasetSpec, **kwargs: Any) -> JobResult:
    """Synchronous wrapper of ``run_local_async``."""
    return asyncio.run(run_local_async(spec, **kwargs))
