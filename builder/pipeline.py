"""One job lifecycle for both runners, and the in-process runner (no Ray).

``JobLifecycle`` is everything a job does around its units, whichever executor runs them:

1. **plan the continuation**: a fresh job; ``--resume`` of an interrupted one (its journal is in
   the output: committed units are done, their counts and index entries are read back); the
   continuation of a published partial dataset; or ``retry-failed`` of a published one;
2. **check and clear the output** before any download (``DatasetPublisher``), start the
   journal, cut URL lists into slices;
3. **run** the units through a ``JobRunner`` and an executor (``LocalExecutor`` here,
   ``cluster.coordinator.RayExecutor`` on Ray), with Ctrl-C / SIGTERM stopping it cleanly;
4. **publish**: remove files of shards that never committed, stream the manifests, rejects,
   stats, card and spec from the journal (plus the dataset a merge continues), write the marker
   last, remove the journal.

A run that accepts nothing is not a dataset: it is published as ``_PARTIAL`` (reason
``empty``), and the CLI exits non-zero.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from builder.dedup import (U64, DedupClient, LocalPartitions, WrittenImages, claim_of,
                           id_number, url_hash)
from builder.errors import CancelledUnpublished, JobInterrupted
from builder.job import (Executor, JobCounts, JobRunner, ProgressFn, RunOutcome, UnitPlanner,
                         WorkerLost)
from builder.journal import (Journal, ResumeError, ResumeState, new_job_id,
                             parquet_stem, published_spec, resumable_jobs, spec_fingerprint,
                             splits_reordered)
from builder.listsource import SlicePlan, list_identity, plan_slices
from builder.malloc import fix_mmap_threshold
from builder.quota import QuotaLedger
from builder.records import REJECT_SCHEMA
from builder.retry import kept_rows, redecided_counts, undecided_keys
from builder.rights import RightsTally
from builder.similarity import MAX_STORED
from builder.spec import DatasetSpec, require_trusted_networks, require_trusted_opt_outs
from builder.storage import open_fs, storage_errors
from builder.units import ClassTally, UnitReport, WorkerEvents, WorkUnit, retry_uid
from builder.worker import JobPlan, LocalServices, WorkerRuntime
from builder.worker_procs import ProcessExecutor, WorkerProcesses
from builder.worker_start import LOCAL_CPU_THREADS, StartedWorkers, local_workers
from builder.writers import (DatasetPublisher, manifest_entry, parquet_shards, read_marker,
                             shard_name, unbalanced)

log = logging.getLogger("pixcrawler.pipeline")

MANIFEST_COLUMNS = ("id", "path", "label", "split", "license")
"""What the label manifests take from a journal shard's rows."""

INDEX_CHUNK = 50_000
"""Rows per batch when the dedup index is rebuilt from the journal."""

__all__ = ["Continuation", "JobLifecycle", "JobResult", "LocalExecutor", "new_job_id",
           "plan_retry", "run_local", "run_local_async"]


@dataclass
class JobResult:
    job_id: str
    uri: str
    stats: dict[str, Any]
    partial: bool = False


@dataclass
class Continuation:
    """How a run continues earlier work. ``merge``: add to the published dataset at the URI
    (a partial one continued, or ``retry-failed``); ``retry``: decide again the candidates it
    rejected for transient reasons (timeouts, 5xx, 429, connection errors)."""

    job_id: str
    merge: bool = False
    retry: bool = False
    partial_reason: str = ""
    """Why the dataset a retry decides again is partial ('' if complete): a retry does not
    continue the crawl, so its result stays partial for the same reason."""


def _require_parquet(spec: DatasetSpec, uri: str, what: str) -> None:
    """Refuse, before the output is touched, to continue a dataset written without Parquet:
    the continuation reads the dataset's images from its shards."""
    if "parquet" not in spec.output.formats:
        raise ResumeError(f"{uri} was written without the parquet format, which {what} reads "
                          "the dataset's images from; build it again with parquet among "
                          "output.formats")


def plan_retry(uri: str, storage_options: Optional[dict] = None,
               job_id: Optional[str] = None, *, allow_private_networks: bool = False,
               allow_weaker_opt_outs: bool = False) -> tuple[DatasetSpec, Continuation]:
    """``retry-failed``: the published dataset's spec, and a continuation that decides again
    the candidates it rejected for transient reasons and merges what is accepted. A spec that
    sets ``download.allow_private_networks`` is refused unless ``allow_private_networks``
    (``require_trusted_networks``), one that honours fewer opt-outs than the defaults unless
    ``allow_weaker_opt_outs`` (``require_trusted_opt_outs``)."""
    spec = published_spec(uri, storage_options)
    require_trusted_networks(spec, uri, "retry-failed", allow_private_networks)
    require_trusted_opt_outs(spec, uri, "retry-failed", allow_weaker_opt_outs)
    marker = read_marker(uri, storage_options)
    if marker is None:
        raise ResumeError(f"{uri} holds no published dataset (_SUCCESS or _PARTIAL)")
    _require_parquet(spec, uri, "retry-failed")
    job_id = job_id or f"{spec.name}-retry-{uuid.uuid4().hex[:6]}"
    return spec, Continuation(job_id, merge=True, retry=True,
                              partial_reason=_crawl_partial(uri, storage_options, marker))


def _crawl_partial(uri: str, storage_options: Optional[dict], marker: dict[str, Any]) -> str:
    """Why the crawl of a published dataset did not finish ('' if it did): a retry decides
    its rejects again, not its unfinished crawl, so the dataset stays partial for that reason
    only. Not for being empty (a retry that accepts images ends that), nor for a cancelled
    retry (the next retry decides the candidates it left). Datasets published before stats
    recorded ``crawl_partial`` go by their marker."""
    stats = published_stats(uri, storage_options)
    if "crawl_partial" in stats:
        return str(stats["crawl_partial"] or "")
    reason = (marker.get("reason") or "partial") if marker.get("status") == "partial" else ""
    return "" if reason == "empty" else reason


def published_stats(uri: str, storage_options: Optional[dict] = None) -> dict[str, Any]:
    """A published dataset's stats.json; ``ResumeError`` without one (its counts cannot be
    carried over, and guessing them would publish wrong figures)."""
    fs, root = open_fs(uri, storage_options)
    path = f"{root.rstrip('/')}/stats.json"
    fs.invalidate_cache(path)
    if not fs.exists(path):
        raise ResumeError(f"{uri} has no stats.json, so its counts cannot be carried over: "
                          "restore the file, or build the dataset again with --overwrite")
    try:
        stats = json.loads(fs.cat_file(path))
    except ValueError as exc:
        raise ResumeError(f"{uri}/stats.json is not valid JSON ({exc}): restore the file, or "
                          "build the dataset again with --overwrite") from None
    if not isinstance(stats, dict):
        raise ResumeError(f"{uri}/stats.json is not a JSON object: restore the file, or build "
                          "the dataset again with --overwrite")
    return stats


def count_retryable(uri: str, storage_options: Optional[dict] = None) -> int:
    """How many of a published dataset's rejects a ``retry-failed`` would decide again."""
    report = redecided_counts(rejects_path(uri), storage_options,
                              published_spec(uri, storage_options), retry=True)
    return sum(t.candidates for t in report.classes.values())


class LocalExecutor:
    """One worker in this process (``builder.worker.WorkerRuntime``)."""

    workers = 1

    def __init__(self, plan: JobPlan, services: LocalServices):
        self.late: set[int] = set()
        self.runtime = WorkerRuntime(plan, services)

    async def start(self) -> None:
        await self.runtime.start()

    async def run(self, worker: int, unit: WorkUnit) -> tuple[UnitReport, WorkerEvents]:
        return await self.runtime.run(unit)

    async def flush(self) -> list[Union[WorkerEvents, WorkerLost]]:
        return [await self.runtime.flush()]

    async def revive(self, worker: int) -> bool:
        return False

    async def reset(self) -> None:
        await self.runtime.discard()

    def cancel(self) -> None:
        self.runtime.cancel()

    async def in_flight(self) -> dict[str, dict[str, int]]:
        return self.runtime.in_flight()

    async def close(self) -> None:
        await self.runtime.close()


def _plan_json(plan: SlicePlan) -> dict[str, Any]:
    """A list's cut as ``job.json`` records it (``JobLifecycle._pin``)."""
    return {k: v for k, v in dataclasses.asdict(plan).items() if k != "path"}


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


class JobLifecycle:
    """Everything a job does around its units (see the module docstring)."""

    def __init__(self, spec: DatasetSpec, *, uri: Optional[str] = None,
                 job_id: Optional[str] = None, storage_options: Optional[dict] = None,
                 resume: bool = False, continuation: Optional[Continuation] = None):
        self.spec = spec
        self.uri = uri or spec.output_uri()
        self.storage_options = storage_options
        self.requested_job_id = job_id
        self.resume = resume
        self.cont = continuation
        self.job_id = ""
        self.merge = False
        self.retry = False
        self.state: Optional[ResumeState] = None
        self.partial_units: dict[str, dict[str, int]] = {}
        """Units a killed run wrote images of but never committed, and per class those
        images: they run to the end even if this run is cancelled."""
        self.kept_partial = ""
        """A retry of a partial dataset stays partial, for the same reason."""
        self.base = UnitReport("base")
        self.base_uri = self.uri
        """Where a merge reads the dataset it continues (stats.json, rejects.parquet) from: the
        journal's copy once it is made (``Journal.keep_base``)."""
        self.list_plans: dict[int, SlicePlan] = {}
        self.retry_plan: Optional[SlicePlan] = None
        self._undecided_keys: Optional[dict[str, int]] = None
        self.unit_size = spec.batch_size()
        """Rows per unit of a URL list, a retry's rejects or inline urls (before growth)."""
        self.journal: Optional[Journal] = None
        self.publisher: Optional[DatasetPublisher] = None
        self.expansion: dict[str, Any] = {"enabled": False}
        self.extra_queries: dict[str, list[str]] = {}
        self.runner: Optional[JobRunner] = None

    # -- 1. and 2. ----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Plan the continuation; check and clear the output; start the journal. Blocking."""
        spec, uri, opts = self.spec, self.uri, self.storage_options
        if self.cont is not None:
            self.job_id = self.cont.job_id
            self.merge, self.retry = self.cont.merge, self.cont.retry
            self.kept_partial = self.cont.partial_reason
        elif self.resume:
            self._plan_resume()
        else:
            self.job_id = self.requested_job_id or new_job_id(spec)
        self.publisher = DatasetPublisher(spec.output, uri, self.job_id, opts, spec.labels)
        self.journal = Journal(uri, self.job_id, opts)
        if self.state is not None:  # resuming this job's own journal
            meta = self.journal.meta()
            self.merge, self.retry = bool(meta.get("merge")), bool(meta.get("retry"))
            self.kept_partial = meta.get("kept_partial", "")
            if self.merge:  # the published dataset this job adds to counts, as in its first run
                self._keep_base()  # both refuse before a marker is touched
                self._load_base()
            removed = self.publisher.remove_files(self.journal.orphan_files())
            self.publisher.prepare(merge=True)
            self.partial_units = self.journal.partial_units(self.state.done)
            log.info("[%s] resuming: %d units committed%s", self.job_id,
                     self.state.committed_units,
                     f"; removed {removed} files of shards that never committed" if removed
                     else "")
        else:
            self.publisher.check(merge=self.merge)
            self.journal.begin_new(replaced=spec.output.overwrite and not self.merge)
            if self.merge:
                self._load_base()
            self.publisher.prepare(merge=self.merge)
        self.journal.start(spec, list_slicing=[spec.batch_size(), *spec.list_growth()],
                           merge=self.merge, retry=self.retry, kept_partial=self.kept_partial)
        if self.merge or self.retry:
            self._mark_journal()
        if self.merge and self.state is None:
            self._keep_base()
        # A resumed job cuts its lists as its first run did (unit uids are slice numbers),
        # whatever resources.batch_size says now; a journal written before slices grew holds
        # no record, and was cut by the batch size alone.
        meta = self.journal.meta()
        unit_size, grow_after, grown_rows = meta.get("list_slicing",
                                                     [spec.batch_size(), 0, 0])
        self.unit_size = unit_size
        pinned = meta.get("lists")
        lists: dict[str, Any] = {}
        for i, src in enumerate(spec.sources):
            # A retry reads the dataset's rejects, not its lists (whose path spec.yaml holds
            # with its credentials masked).
            if src.engine == "urllist" and not self.retry:
                inode = src.path_inode or 0
                identity = list_identity(src.path or "", opts, inode)
                first = (pinned or {}).get(str(i))
                if first is not None:
                    self.list_plans[i] = dataclasses.replace(
                        self._pinned_plan(i, src.path or "", first, identity), inode=inode)
                else:  # a new job's, or one an earlier version journaled (cut as it did)
                    self.list_plans[i] = plan_slices(
                        src.path or "", unit_size, url_column=src.url_column,
                        label_column=src.label_column, storage_options=opts,
                        grow_after=grow_after, grown_rows=grown_rows,
                        legacy=self.state is not None and pinned is None, inode=inode)
                lists[str(i)] = {"identity": identity,
                                 "plan": _plan_json(self.list_plans[i])}
        if self.retry:
            self.retry_plan = plan_slices(rejects_path(self.base_uri), unit_size,
                                          url_column="url", storage_options=opts)
        if not self.retry:
            if "expansion" in meta:  # the queries this job's first run searched
                self.expansion = meta["expansion"]
                self.extra_queries = self.expansion.get("queries") or {}
            else:
                self.extra_queries, self.expansion = expand_queries(spec)
        self._pin(meta, lists)

    def _pinned_plan(self, i: int, path: str, first: dict[str, Any], identity: str
                     ) -> SlicePlan:
        """The cut of list ``i`` as this job's first run recorded it, once the file is the
        one it cut."""
        if first.get("identity") != identity:
            raise ResumeError(
                f"sources.{i}.path {path} is not the list this job's first run cut (its size "
                "or its first or last bytes changed): a resumed job cuts its lists as that run "
                "did, so rows would be lost or counted twice. Put the list back as it was, or "
                "build into a new output without --resume")
        plan = dict(first["plan"])
        return SlicePlan(path=path, **{**plan, "header": tuple(plan.get("header", ())),
                                       "row_groups": tuple(plan.get("row_groups", ()))})

    def _pin(self, meta: dict[str, Any], lists: dict[str, Any]) -> None:
        """Record in ``job.json`` what a resume must plan as this run did: each list's cut and
        identity, and the queries the expansion gave (an LLM answers otherwise, or not at
        all, another day)."""
        assert self.journal is not None
        wanted = {"lists": lists} if "lists" not in meta else {}
        if "expansion" not in meta and not self.retry:
            wanted["expansion"] = self.expansion
        if wanted:
            self.journal.write_meta({**meta, **wanted})

    def _plan_resume(self) -> None:
        spec, uri, opts = self.spec, self.uri, self.storage_options
        jobs = resumable_jobs(uri, opts)
        job_id = self.requested_job_id
        if job_id is not None and job_id not in jobs and jobs:
            raise ResumeError(f"no interrupted job {job_id!r} at {uri}; there is: "
                              f"{', '.join(jobs)}")
        if jobs:
            if job_id is None and len(jobs) > 1:
                raise ResumeError(f"several interrupted jobs at {uri}: {', '.join(jobs)}; pick "
                                  "one with --job-id")
            self.job_id = job_id or jobs[0]
            self.state = Journal(uri, self.job_id, opts).load(spec)
            return
        marker = read_marker(uri, opts)
        if marker is not None and marker.get("status") == "partial":
            published = published_spec(uri, opts)
            if spec_fingerprint(published) != spec_fingerprint(spec):
                raise ResumeError(f"the partial dataset at {uri} was built from a different "
                                  "spec; resume needs the same spec (only 'resources' may "
                                  "change)")
            reordered = splits_reordered(published.model_dump(mode="json"), spec)
            if reordered:
                raise ResumeError(f"the partial dataset at {uri}: {reordered}")
            _require_parquet(spec, uri, "continuing a partial dataset")
            self.job_id = job_id or new_job_id(spec)
            self.merge = True
            log.info("[%s] continuing the partial dataset at %s", self.job_id, uri)
            return
        raise ResumeError(f"nothing to resume at {uri}: no interrupted job and no partial "
                          "dataset" + (" (it holds a complete dataset)" if marker else "")
                          + "; run without --resume")

    def _mark_journal(self) -> None:
        assert self.journal is not None
        meta = self.journal.meta()
        if meta.get("merge") != self.merge or meta.get("retry") != self.retry or \
                meta.get("kept_partial", "") != self.kept_partial:
            self.journal.write_meta({**meta, "merge": self.merge, "retry": self.retry,
                                     "kept_partial": self.kept_partial})

    def _keep_base(self) -> None:
        assert self.journal is not None
        self.journal.keep_base(resuming=self.state is not None)
        self.base_uri = self.journal.base_uri() or self.uri

    def _load_base(self) -> None:
        """The counts of the dataset this merge continues; refuses figures that do not
        balance (an older version published some after a cancel): they could never be
        published again, and the refusal comes before the dataset's marker is removed."""
        stats = published_stats(self.base_uri, self.storage_options)
        wrong = unbalanced(stats)
        if wrong:
            raise ResumeError(f"{self.uri}/stats.json does not add up ({wrong}), so this job "
                              "cannot add to it: build the dataset again with --overwrite")
        self.base = base_report(self.spec, stats, self.base_uri, self.storage_options,
                                self.retry)

    # -- the parts both runners build from ------------------------------------------------------

    def job_plan(self, cpu_threads: int, validate_processes: int = 0,
                 workers: int = 1) -> JobPlan:
        return JobPlan(self.spec, self.uri, self.job_id, self.storage_options,
                       list_plans=self.list_plans, retry_plan=self.retry_plan,
                       cpu_threads=cpu_threads, validate_processes=validate_processes,
                       buffer_bytes=self.spec.resources.max_buffered_mb << 20,
                       workers=workers)

    def ledger(self) -> QuotaLedger:
        """The quota ledger the job starts from; a resumed job's from the unit reports
        ``prepare`` read (``ResumeState.reports``), not from a second read of the journal."""
        if self.state is None:
            return recover_ledger(**self.recovery(), reports=[], partial={})
        return recover_ledger(**self.recovery(), reports=self.state.reports,
                              partial=self.partial_units)

    @property
    def index_starts_empty(self) -> bool:
        """Nothing decided before this job: it resumes no journal and continues no dataset,
        so ``index_payloads`` yields nothing."""
        return self.state is None and not self.merge

    @property
    def index_signatures(self) -> int:
        """The stored signatures the job's index can expect to file: ``MAX_STORED`` for each
        image the targets ask for. Every candidate that reaches the index files its own, so a
        job that meets many duplicates or rejects files more (the tables then grow)."""
        return self.spec.total_target() * MAX_STORED

    def recovery(self) -> dict[str, Any]:
        """What a restarted ledger needs to rebuild from the journal."""
        return {"spec": self.spec, "uri": self.uri, "job_id": self.job_id,
                "storage_options": self.storage_options, "merge": self.merge}

    def counts(self) -> JobCounts:
        counts = JobCounts(self.spec)
        counts.add(self.base)
        for _, report in (self.state.reports if self.state else []):
            counts.add(report)
        return counts

    def planner(self) -> UnitPlanner:
        return UnitPlanner(self.spec, self.extra_queries, list_plans=self.list_plans,
                           unit_size=self.unit_size, resume=self.state,
                           retry_plan=self.retry_plan)

    def index_payloads(self, client: DedupClient) -> Iterator[list[dict[str, Any]]]:
        """What the dedup index must hold before the first unit: the journal's committed
        work (a resume) and the published dataset a merge continues. Streamed in chunks."""
        yield from index_payloads(client, self.spec, self.uri, self.job_id,
                                  self.storage_options, merge=self.merge, retry=self.retry,
                                  journal=self.state is not None)

    # -- 3. -----------------------------------------------------------------------------------

    async def run(self, executor: Executor, *, units_per_worker: int,
                  progress: Optional[ProgressFn] = None, install_signals: bool = False,
                  runner_hook: Optional[Callable[[JobRunner], None]] = None) -> RunOutcome:
        self.runner = runner = JobRunner(self.spec, executor, self.planner(), self.counts(),
                                         units_per_worker=units_per_worker, progress=progress,
                                         partial_units=self.partial_units)
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, _cancel_once(loop, sig, runner, self.job_id))
        try:
            if runner_hook is not None:
                runner_hook(runner)
            outcome = await runner.run()
            done = self._retry_done()
            if done is not None and self.retry_plan is not None and \
                    not all(map(done, range(self.retry_plan.count))):
                # The slices it never got to (cancelled, or no class needed more images) keep
                # their rejects as they were: count them back.
                runner.counts.add(redecided_counts(
                    rejects_path(self.base_uri), self.storage_options, self.spec, True,
                    self.retry_plan, lambda i: not done(i)))
                outcome = dataclasses.replace(outcome, stats=runner.stats())
            undecided = await asyncio.to_thread(self._undecided)
            if undecided:
                # Cancelled candidates the crawl never found again keep their rejects too.
                runner.counts.add(await asyncio.to_thread(
                    redecided_counts, rejects_path(self.base_uri), self.storage_options,
                    self.spec, False, undecided=undecided))
                outcome = dataclasses.replace(outcome, stats=runner.stats())
            return outcome
        finally:
            if install_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

    # -- 4. -----------------------------------------------------------------------------------

    async def publish_async(self, outcome: RunOutcome, extra: dict[str, Any], *,
                            install_signals: bool = False) -> JobResult:
        """``publish`` in a thread. With ``install_signals``, SIGINT and SIGTERM wait for it:
        the thread finishes writing whatever the command does (the interpreter joins it), so
        stopping here would only report a failure over a dataset that was published."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM) if install_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, _publishing_notice, self.job_id, sig)
        try:
            return await asyncio.to_thread(self.publish, outcome, extra)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    def publish(self, outcome: RunOutcome, extra: dict[str, Any]) -> JobResult:
        """Write the dataset-level files and the marker; remove the journal. Blocking."""
        assert self.journal is not None and self.publisher is not None
        # Units with images in committed shards but no unit file (the interrupted run's, or
        # this run's taken back after a lost worker): asked of the journal only where the
        # runner met such units, as its shard files are then read whole.
        left = set(self.journal.partial_units(self.journal.unit_uids())) \
            if self.partial_units else set()
        if left and outcome.cancelled:
            raise CancelledUnpublished(
                f"[{self.job_id}] cancelled before it finished {len(left)} half-written units "
                "(their images are in shards no count holds yet): nothing is published at "
                f"{self.uri}; continue it with --resume")
        if left:
            raise JobInterrupted(
                f"[{self.job_id}] {len(left)} half-written units never finished (e.g. "
                f"{sorted(left)[0]}), and their images are in shards no count holds: nothing "
                f"is published at {self.uri}; continue it with --resume, or start over with "
                "--overwrite")
        spec = self.spec
        stats = dict(outcome.stats)
        stats.update(job_id=self.job_id, name=spec.name, output_uri=self.uri,
                     keyword_expansion=self.expansion, resumed=self.state is not None,
                     fetch=outcome.fetch, **extra)
        reason: Optional[str] = None
        if outcome.cancelled:
            reason = "cancelled"
        elif stats["accepted"] == 0:
            reason = "empty"
        elif self.kept_partial:
            reason = self.kept_partial
            stats["partial_kept"] = True  # this run was not cancelled: the dataset it retried was
        stats["partial"] = reason is not None
        stats["partial_reason"] = reason or ""
        stats["crawl_partial"] = (self.kept_partial if self.retry
                                  else "cancelled" if outcome.cancelled else "")
        self.publisher.remove_files(self.journal.orphan_files())
        spec_yaml = yaml.safe_dump(spec.public_dump(), sort_keys=False, allow_unicode=True)
        uri = self.publisher.publish(
            manifest_rows=self._manifest_rows(), reject_tables=self._reject_tables(),
            stats=stats, spec_name=spec.name, description=spec.description,
            spec_yaml=spec_yaml, partial_reason=reason)
        self.journal.remove()
        state = "cancelled" if outcome.cancelled else ("empty" if reason else "succeeded")
        log.info("[%s] %s: %d accepted, %d rejected of %d candidates -> %s", self.job_id,
                 state, stats["accepted"], stats["rejected"], stats["candidates"], uri)
        return JobResult(self.job_id, uri, stats, partial=reason is not None)

    def _manifest_rows(self) -> Iterator[dict[str, Any]]:
        assert self.journal is not None
        if self.merge:
            # the dataset's shards, less this job's: those come from the journal below
            yield from published_manifest(self.uri, self.storage_options, self.spec,
                                          skip=self.journal.shard_names())
        for table in self.journal.iter_tables("shards", list(MANIFEST_COLUMNS)):
            yield from table.to_pylist()

    def _retry_done(self) -> Optional[Callable[[int], bool]]:
        """For a retry: whether the unit of retry slice ``i`` committed."""
        if not self.retry or self.journal is None:
            return None
        committed = self.journal.unit_uids()
        return lambda i: retry_uid(i) in committed

    def _undecided(self) -> Optional[dict[str, int]]:
        """For a run continuing a partial dataset: per key, how many of its cancelled
        rejects no unit of this run decided (``retry.undecided_keys``), worked out once the
        run is over. None for any other run."""
        if not self.merge or self.retry or self.journal is None:
            return None
        if self._undecided_keys is None:
            self._undecided_keys = undecided_keys(
                rejects_path(self.base_uri), self.storage_options, self.spec,
                self.journal.iter_tables("units", ["key"]))
        return self._undecided_keys

    def _reject_tables(self) -> Iterator[pa.Table]:
        """The rejects: the published dataset's a merge continues (less those it decides
        again), then the journal's units', in batches of many units."""
        assert self.journal is not None
        if self.merge:
            yield from kept_rows(rejects_path(self.base_uri), self.storage_options,
                                 self.spec, self.retry, self.retry_plan,
                                 self._retry_done(), undecided=self._undecided())
        columns = [*REJECT_SCHEMA.names, "accepted"]
        for table in self.journal.iter_tables("units", columns):
            yield table.filter(pc.invert(table["accepted"])).select(REJECT_SCHEMA.names)


def published_report(spec: DatasetSpec, uri: str,
                     storage_options: Optional[dict]) -> UnitReport:
    """The counts of a published dataset (of the spec's classes), read from its stats.json."""
    return stats_report(spec, published_stats(uri, storage_options))


def stats_report(spec: DatasetSpec, stats: dict[str, Any]) -> UnitReport:
    """The counts a published dataset's stats.json holds, of the spec's classes."""
    base = UnitReport("base")
    for label, c in (stats.get("classes") or {}).items():
        if label not in spec.classes:
            continue
        base.classes[label] = ClassTally(int(c.get("candidates", 0)), int(c.get("accepted", 0)),
                                         Counter(c.get("rejected_by_reason") or {}))
    for stage, n in (stats.get("rejected_by_stage") or {}).items():
        base.by_stage[stage] += n
    base.bytes = int(stats.get("bytes_downloaded") or 0)
    if isinstance(stats.get("rights"), dict):
        base.rights = RightsTally.from_summary(stats["rights"])
    return base


def base_report(spec: DatasetSpec, stats: dict[str, Any], uri: str,
                storage_options: Optional[dict], retry: bool) -> UnitReport:
    """The counts of the published dataset a merge continues (``stats``: its stats.json, at
    ``uri``), less the rejects it decides again (counted from rejects.parquet's rows)."""
    base = stats_report(spec, stats)
    again = redecided_counts(rejects_path(uri), storage_options, spec, retry)
    for label, tally in again.classes.items():
        base.classes.setdefault(label, ClassTally()).add(tally, -1)
    for stage, n in again.by_stage.items():
        base.by_stage[stage] -= n
    if base.rights is not None:
        base.rights.merge(again.rights, -1)
    return base


def rejects_path(uri: str) -> str:
    return f"{uri.rstrip('/')}/rejects.parquet"


def recover_ledger(spec: DatasetSpec, uri: str, job_id: str, storage_options: Optional[dict],
                   merge: bool, reports: Optional[Iterable[tuple[WorkUnit, UnitReport]]] = None,
                   unjournaled: int = 0, partial: Optional[dict[str, dict[str, int]]] = None
                   ) -> QuotaLedger:
    """The quota ledger as the journal (and the dataset a merge continues) says it stands:
    the committed units and their accepted counts, and shard numbers after every shard
    begun. A continuation decides again only rejects, so the published accepted counts hold
    as they are (rejects.parquet is not read). ``reports``: the journal's unit reports where
    the caller has read them already (each is a file read from the output's store).

    ``unjournaled``: for a ledger that replaces a lost one mid-job, how far past the
    journal's numbers the lost one may have numbered shards. A worker journals a shard's
    intent only as its upload begins, after it got the number; a ledger rebuilt in between
    would hand that number out again, and two shards would write one file. Each split's
    numbers go on that far past the journal's (numbers left unused are gaps, as an abandoned
    shard leaves), and the rebuilt ledger records each block of numbers in the journal before
    it hands them out (an intent of no files: ``QuotaLedger.reserve``), so a ledger rebuilt
    after it goes on past them exactly.

    Each unit with images in committed shards but no unit file is granted them
    (``partial``: ``Journal.partial_units``, where the caller has read it): it runs again and
    keeps them, and no other unit may take their room meanwhile."""
    accepted: Counter = Counter()
    journal = Journal(uri, job_id, storage_options)
    if merge:
        base = journal.base_uri() or uri
        for label, t in published_report(spec, base, storage_options).classes.items():
            accepted[label] += t.accepted
    committed = []
    for unit, report in journal.iter_unit_reports() if reports is None else reports:
        committed.append(unit.uid)
        for label, t in report.classes.items():
            accepted[label] += t.accepted
    numbers = DatasetPublisher.next_numbers(*open_fs(uri, storage_options))
    for split, n in journal.next_shard_numbers().items():
        numbers[split] = max(numbers.get(split, 0), n)
    if unjournaled:
        numbers = {split: numbers.get(split, 0) + unjournaled
                   for split in {*numbers, *spec.output.splits}}
    targets = {label: spec.target_of(label) for label in spec.labels}
    ledger = QuotaLedger(targets, dict(accepted), numbers, committed)
    if partial is None:
        partial = journal.partial_units(set(committed))
    for uid, written in partial.items():
        # Room held for the images a half-written unit wrote: it keeps them when it runs
        # again (its grant's floor), and no other unit takes their place meanwhile.
        ledger.grant(uid, written, written)
    if unjournaled:
        def reserve(split: str, number: int) -> None:
            with storage_errors(uri, "record shard numbers in the journal of"):
                journal.write_shard_intent(shard_name(split, number), [])

        ledger.reserve = reserve
    return ledger


def published_manifest(uri: str, storage_options: Optional[dict], spec: DatasetSpec,
                       skip: frozenset[str] | set[str] = frozenset()
                       ) -> Iterator[dict[str, Any]]:
    """The manifest entries of a published dataset's images, read from its Parquet shards
    but those named in ``skip``."""
    fs, root = open_fs(uri, storage_options)
    formats = set(spec.output.formats)
    paths = parquet_shards(fs, root)
    if not paths and "parquet" not in formats:
        raise ResumeError(f"{uri} was written without the parquet format, which continuing "
                          "a dataset and retry-failed read their state from")
    cols = ["id", "label_name", "split", "format", "width", "height", "bytes", "sha256", "url",
            "license", "author"]
    nested = spec.output.imagefolder_labels == "nested"
    for path in paths:
        name = parquet_stem(path)
        if name in skip:
            continue
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=cols)
        for row in table.rename_columns(["id", "label", *cols[2:]]).to_pylist():
            yield manifest_entry(row, name, formats, nested)


def _url_claims(table: pa.Table) -> np.ndarray:
    """A journal's unit rows as URL claims, ``(hash, claim)`` in two columns; rows without a
    URL hash (never claimed) left out."""
    hashes = table["url_hash"].fill_null(0).to_numpy()
    claims = table["claim"].fill_null(0).to_numpy()
    keep = hashes != 0
    return np.stack([hashes[keep], claims[keep]], axis=1)


def _written_images(table: pa.Table, journal: str) -> WrittenImages:
    """A journal's shard rows as written images, their stored signatures flattened; refuses
    rows whose ``sig_a`` and ``sig_b`` lists differ in length (pairs that cannot be made)."""
    sig_a = table["sig_a"].combine_chunks()
    lengths = pc.list_value_length(sig_a).fill_null(0)
    same = pc.equal(lengths, pc.list_value_length(table["sig_b"]).fill_null(0))
    if not pc.all(same, min_count=0).as_py():
        raise ResumeError(f"the journal at {journal} is damaged: a shard row's sig_a and "
                          "sig_b differ in length. Run the job again without --resume, into "
                          "a new output")
    return WrittenImages(
        ids=np.fromiter(map(id_number, table["id"].to_pylist()), U64, table.num_rows),
        claims=table["claim"].fill_null(0).to_numpy(),
        sig_pos=pc.list_parent_indices(sig_a).to_numpy(),
        sig_a=pc.list_flatten(sig_a).to_numpy(),
        sig_b=pc.list_flatten(table["sig_b"].combine_chunks()).to_numpy())


def index_payloads(client: DedupClient, spec: DatasetSpec, uri: str, job_id: str,
                   storage_options: Optional[dict], *, merge: bool, retry: bool,
                   journal: bool, only: Optional[int] = None) -> Iterator[list[dict[str, Any]]]:
    """Per-partition ``load`` payloads, in chunks: the journal's committed units (URL claims)
    and shards (written images), and, for a merge, the published dataset's images and rejects
    (decided by an earlier run; those it decides again left out: ``retry.kept_rows``). The
    shards this job wrote before it was killed are in the dataset's folder too, but they are
    its own (their images' candidates are decided by its units, some not committed yet), not
    an earlier run's.
    ``only``: the payloads of that partition alone, the others empty (``load_payloads``)."""
    from builder.urls import normalise_url

    j = Journal(uri, job_id, storage_options)
    own: set[str] = set()
    if journal:
        own = j.shard_names()
        for table in j.iter_tables("units", ["url_hash", "claim"]):
            pairs = _url_claims(table)
            for start in range(0, len(pairs), INDEX_CHUNK):
                yield client.load_payloads(pairs[start:start + INDEX_CHUNK], [], only=only)
        for table in j.iter_tables("shards", ["id", "claim", "sig_a", "sig_b"]):
            for start in range(0, table.num_rows, INDEX_CHUNK):
                yield client.load_payloads(
                    [], _written_images(table.slice(start, INDEX_CHUNK), j.root), only=only)
    if not merge:
        return
    from builder.records import Candidate

    fs, root = open_fs(uri, storage_options)
    root = root.rstrip("/")
    for path in parquet_shards(fs, root):
        if parquet_stem(path) in own:
            continue
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["id", "url", "label_name", "phash", "dhash"])
        urls, written = [], []
        for row in table.to_pylist():
            claim = claim_of(Candidate(url=row["url"], label=row["label_name"]).key)
            norm = normalise_url(row["url"] or "")
            if norm:
                urls.append((url_hash(norm), claim))
            written.append((id_number(row["id"]), claim,
                            [(int(row["phash"] or "0", 16), int(row["dhash"] or "0", 16))]))
        yield client.load_payloads(urls, [], done=True, only=only)
        yield client.load_payloads([], written, only=only)
    for table in kept_rows(rejects_path(j.base_uri() or uri), storage_options, spec, retry,
                           columns=["key", "url", "label", "reason"]):
        urls = []
        for key, url in zip(table["key"].to_pylist(), table["url"].to_pylist()):
            norm = normalise_url(url or "")
            if norm:
                urls.append((url_hash(norm), claim_of(key)))
        for start in range(0, len(urls), INDEX_CHUNK):
            yield client.load_payloads(urls[start:start + INDEX_CHUNK], [], done=True, only=only)


def _publishing_notice(job_id: str, sig: int) -> None:
    log.warning("[%s] %s: the dataset is being published; the command ends by itself once "
                "its files are written", job_id, signal.Signals(sig).name)


def _cancel_once(loop: asyncio.AbstractEventLoop, sig: int, runner: JobRunner,
                 job_id: str) -> Callable[[], None]:
    def handler() -> None:
        log.warning("[%s] %s: stopping; what is accepted so far is written as a partial result",
                    job_id, signal.Signals(sig).name)
        runner.cancel(signal.Signals(sig).name)
        loop.remove_signal_handler(sig)
    return handler


WORKER_PROCESS_THREADS = 2
"""Threads validating and writing in each worker process (decoding releases the GIL)."""


def units_per_worker(spec: DatasetSpec) -> int:
    """Units a worker runs at once (``resources.max_in_flight_batches``), else enough
    candidates in flight to fill its fetcher."""
    if spec.resources.max_in_flight_batches:
        return spec.resources.max_in_flight_batches
    return max(2, -(-spec.download.concurrency // spec.batch_size()) + 1)


async def run_local_async(spec: DatasetSpec, *, job_id: Optional[str] = None,
                          uri: Optional[str] = None, progress: Optional[ProgressFn] = None,
                          storage_options: Optional[dict] = None, resume: bool = False,
                          continuation: Optional[Continuation] = None,
                          runner_hook: Optional[Callable[[JobRunner], None]] = None,
                          install_signals: bool = False,
                          started: Optional[StartedWorkers] = None) -> JobResult:
    """Run a job in this process. ``runner_hook(runner)`` sees the runner (tests cancel with it).

    ``resume`` continues an interrupted job at the output URI; ``continuation`` gives one
    ready-made (``plan_retry``). ``started``: the job's worker processes, started early
    (``local_workers``); the job closes them."""
    v = spec.validation
    workers = local_workers(spec)
    if started is not None and started.workers != workers:
        started.close()
        raise ValueError(f"started {started.workers} worker processes for a job that runs "
                         f"{workers}: start them with local_workers(spec)")
    life = JobLifecycle(spec, uri=uri, job_id=job_id, storage_options=storage_options,
                        resume=resume, continuation=continuation)
    # Shard workers in processes (none at the slow level: its scorers run here, in one worker
    # that validates in processes). The processes start while the job is planned.
    processes = await WorkerProcesses.launch(workers, started) if workers else None
    if processes is not None:
        fix_mmap_threshold()  # this process then holds the index and the ledger, not images
    executor: Optional[Executor] = None
    try:
        await asyncio.to_thread(life.prepare)
        parts = LocalPartitions(v.near_duplicate_threshold, near=v.level != "fast", k=1,
                                signatures=life.index_signatures)
        client = parts.client()
        for payloads in life.index_payloads(client):
            parts.partitions[0].load(payloads[0])
        slow = None
        if v.level == "slow":
            from builder.slow import check_slow_requirements, local_device, make_slow_validator

            check_slow_requirements(spec)
            slow = make_slow_validator(spec, local_device(spec))
        services = LocalServices(spec, client, life.ledger(), slow)
        executor = (LocalExecutor(life.job_plan(LOCAL_CPU_THREADS, LOCAL_CPU_THREADS), services)
                    if processes is None else
                    ProcessExecutor(life.job_plan(WORKER_PROCESS_THREADS,
                                                  workers=processes.workers),
                                    services, processes))
        await executor.start()
        try:
            outcome = await life.run(executor, units_per_worker=units_per_worker(spec),
                                     progress=progress, install_signals=install_signals,
                                     runner_hook=runner_hook)
        except BaseException:
            log.error("[%s] failed; what was committed is journaled at %s: continue it with "
                      "--resume", life.job_id, life.uri)
            raise
    except BaseException:
        await _close_workers(executor, processes)
        raise
    # Every unit is written and committed: the workers close and exit while the job publishes.
    closing = asyncio.ensure_future(_close_workers(executor, processes))
    try:
        extra = {"runner": "local", "engines": services.engine_stats(),
                 "dedup": parts.partitions[0].stats()}
        return await life.publish_async(outcome, extra, install_signals=install_signals)
    finally:
        await closing


async def _close_workers(executor: Optional[Executor],
                         processes: Optional[WorkerProcesses]) -> None:
    if executor is not None:
        await executor.close()
    elif processes is not None:
        await processes.close()


def run_local(spec: DatasetSpec, **kwargs: Any) -> JobResult:
    """Synchronous wrapper of ``run_local_async``."""
    return asyncio.run(run_local_async(spec, **kwargs))

