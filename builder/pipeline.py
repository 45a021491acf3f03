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
from builder.ratelimit import EngineGovernor, limits_for
from builder.records import Record, accepted_row, reject_row
from builder.spec import DatasetSpec
from builder.splits import assign_split
from builder.transform import ImageTransformer
from builder.validate import ImageValidator
from builder.writers import DatasetWriter

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
        extra[label] = expander.expand(label, spec.queries_of(label))
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


class RecordSink:
    """Assigns splits, applies resize/encode, and writes shards as accepted records arrive."""

    def __init__(self, spec: DatasetSpec, writer: DatasetWriter):
        self.spec = spec
        self.writer = writer
        self.transformer = ImageTransformer(spec.output.resize, spec.output.encode)
        self.pending: list[dict[str, Any]] = []
        self.manifest: list[dict[str, Any]] = []
        self.rejects: list[dict[str, Any]] = []
        self.shards = 0

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

    def add_rejected(self, records: list[Record]) -> None:
        self.rejects.extend(reject_row(r) for r in records)

    async def _flush(self, n: int) -> None:
        rows, self.pending = self.pending[:n], self.pending[n:]
        index = self.shards
        self.shards += 1
        self.manifest.extend(await asyncio.to_thread(self.writer.write_shard, rows, index))

    async def finish(self, stats: dict[str, Any], partial: bool) -> str:
        if self.pending:
            await self._flush(len(self.pending))
        return await asyncio.to_thread(finish_dataset, self.writer, self.spec, self.manifest,
                                       self.rejects, stats, partial)


def finish_dataset(writer: DatasetWriter, spec: DatasetSpec, manifest: list[dict[str, Any]],
                   rejects: list[dict[str, Any]], stats: dict[str, Any], partial: bool) -> str:
    """Write manifests, rejects, stats and card, then publish (complete or partial)."""
    writer.write_manifests(manifest, spec.labels)
    writer.write_rejects(rejects)
    writer.write_stats(stats)
    spec_yaml = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    writer.write_card(spec.name, spec.description, stats, spec_yaml)
    if partial:
        return writer.publish_partial(stats.get("partial_reason", "cancelled"))
    return writer.publish()


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
        return records

    async def forget(self, image_ids: list[str]) -> None:
        for image_id in image_ids:
            self.index.remove(image_id)


async def run_local_async(spec: DatasetSpec, *, job_id: Optional[str] = None,
                          uri: Optional[str] = None, progress: Optional[ProgressFn] = None,
                          storage_options: Optional[dict] = None,
                          runner_hook=None) -> JobResult:
    """Run a job in this process. ``runner_hook(runner)`` sees the runner (tests cancel with it)."""
    job_id = job_id or new_job_id(spec)
    uri = uri or spec.output_uri()
    engines = build_engines(spec)
    writer = DatasetWriter(spec.output, uri, job_id, storage_options, labels=spec.labels)
    sink = RecordSink(spec, writer)
    try:
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="validate") as pool:
            async with Fetcher(spec.download) as fetcher:
                backend = LocalBackend(spec, engines, fetcher, pool)
                extra, expansion = expand_queries(spec)
                runner = JobRunner(spec, backend, sink, engine_names(engines),
                                   extra_queries=extra,
                                   batch_size=spec.resources.batch_size,
                                   max_in_flight=spec.resources.max_in_flight_batches or 4,
                                   progress=progress)
                if runner_hook is not None:
                    runner_hook(runner)
                stats = await runner.run()
                stats.update(job_id=job_id, name=spec.name, output_uri=uri, runner="local",
                             fetch=dict(fetcher.stats), keyword_expansion=expansion,
                             engines={g.engine: g.snapshot() for g in backend.governors.values()})
        published = await sink.finish(stats, partial=runner.cancelled)
    except BaseException:
        writer.abort()
        raise
    finally:
        for engine in engines:
            engine.close()
    return JobResult(job_id, published, stats, partial=runner.cancelled)


def run_local(spec: DatasetSpec, **kwargs: Any) -> JobResult:
    """Synchronous wrapper of ``run_local_async``."""
    return asyncio.run(run_local_async(spec, **kwargs))
