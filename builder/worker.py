"""The shard pipeline: what a worker does with one unit of work, the same in-process and on Ray.

``WorkerRuntime`` holds a worker's state (an aiohttp fetcher, a thread pool for CPU work, two
threads for storage reads and writes, list readers, the shard assembler) and runs units,
several at a time. One unit goes, in order:

1. **candidates**: the worker runs the unit's search (through the job's rate limiter) or reads
   its slice of a URL list; hits of classes already full are *unused*, not candidates;
2. **URL checks**: unparsable or non-http(s) URLs are rejected; each URL is claimed in the
   partitioned index, so the same URL twice in a job is a ``duplicate_url``;
3. **fetch** (politely, ``builder.fetch``), then **validate and hash** on the thread pool;
4. **dedup**: one round trip to the index partitions decides exact and near duplicates
   (``builder.dedup``); an image an earlier attempt of this unit already wrote is kept as is
   (a resent unit takes those in its journaled shards back before step 2, unfetched);
5. **slow level** (NSFW / CLIP) where the spec asks for it; its scores go into the record;
6. **grant**: the quota ledger grants up to each class's room; valid images past it are
   ``over_target``;
7. the index learns the outcome (*settle*). An image that step 4 found a duplicate of an
   image not yet settled (another unit's between its steps 4 and 7, or one this unit kept
   there, which steps 5-6 may still refuse) was held out of steps 5-6: it goes through 4-7
   again once that image is settled, so that a copy is kept wherever the first is refused;
8. accepted images are resized / re-encoded if asked, get their split, and go to the
   worker's shard assembler; the unit's report (counts only) goes back.

A unit *commits* once every image it accepted is in a committed shard: its candidates'
decisions are then journaled (``builder.journal``) and the ledger counts its images for good.
Until then a lost worker means the unit is resent; nothing it did can be counted twice, because
the index and the ledger key everything by candidate and by unit.

``WorkerServices`` is what a worker reaches outside itself: the dedup index, the quota ledger,
the search rate limiter and the slow-level scorers. ``LocalServices`` holds them in this
process; ``actors.worker`` provides them as Ray actors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import importlib.abc
import logging
import math
import random
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, TypeVar, Union

import pyarrow as pa
import pyarrow.compute as pc

from builder.dedup import DedupClient, DedupDecision, DedupItem, claim_of, id_number, url_hash
from builder.engines import SearchEngine, SearchPage, make_engine
from builder.errors import EngineError, SourceError, printable
from builder.fetch import Fetcher
from builder.held import HeldBudget
from builder.job import IndexLost
from builder.journal import Journal
from builder.listsource import ListReader, SlicePlan
from builder.ratelimit import (CircuitOpen, DayFile, EngineGovernor, QuotaExceeded, budget_key,
                               limits_for)
from builder.reasons import Reason
from builder.records import Candidate, Record, accepted_row, candidate_key, reject_row
from builder.retry import retry_candidates
from builder.rights import RightsTally, Signal
from builder.similarity import copy_of, quality_key
from builder.spec import DatasetSpec
from builder.splits import assign_split
from builder.storage import ensure_writable
from builder.transform import ImageTransformer
from builder.units import (INLINE, LIST, RETRY, SEARCH, WRITTEN, SearchOutcome, UnitReport,
                           WorkerEvents, WorkUnit)
from builder.validate import ImageValidator
from builder.validate_pool import ProcessValidator
from builder.writers import ShardWriter, shard_name, shard_order

log = logging.getLogger("pixcrawler.worker")

T = TypeVar("T")


HOLD_FIRST_S, HOLD_MAX_S, HOLD_WAIT_S, HOLD_WAIT_SLOW_S = 0.02, 0.5, 30.0, 300.0
"""A duplicate of another unit's undecided image is decided again after these waits,
doubling from the first to the most; past the last in all (the one after it where the job
has a slow level, whose scorers may queue units for minutes), it is the duplicate it would
be (``UnitRun._end_holds``). An image is undecided from its unit's index check until the
unit's settle: its slow-level scores and its grant, well under a second as a rule."""
VALIDATE_BATCH = 8
"""Fetched images handed to the CPU pool together while the rest of a unit downloads."""

WORKER_GC_YOUNG = 10_000
"""The garbage collector's first threshold in a settled worker (``settle_process``; CPython
3.10-3.12's default is 700): a fetch's and a record's objects are freed by their counts, and
collecting every 700 of them cost each of two workers 0.19-0.23 s of a 20,000-photo job here,
against 0.04-0.07 s at this threshold (timed with ``gc.callbacks``)."""


class UnitCancelled(Exception):
    """Raised inside a unit when the job was asked to stop."""


class WorkerServices:
    """What a worker reaches outside itself. Every method is a coroutine."""

    dedup: DedupClient

    async def grant(self, uid: str, wants: dict[str, int], floor: dict[str, int]
                    ) -> dict[str, int]:
        raise NotImplementedError

    async def rooms(self) -> dict[str, int]:
        """Per class, the images it still has room for."""
        raise NotImplementedError

    async def commit(self, uid: str, accepted: dict[str, int]) -> None:
        raise NotImplementedError

    async def next_shard(self, split: str) -> int:
        raise NotImplementedError

    async def search(self, unit: WorkUnit, engine: SearchEngine) -> SearchPage:
        """One engine request for ``unit``, paced by the job's limiter for its source."""
        raise NotImplementedError

    async def score(self, records: list[Record], pool: ThreadPoolExecutor) -> list[Record]:
        """The slow level on ``records`` (returns them); only called when the job has one."""
        raise NotImplementedError

    async def settle_scores(self, records: list[Record]) -> None:
        """The unit's final decisions, for the slow level's embedding store
        (``SlowValidator.settle``); only called when the job dedups by embedding."""
        raise NotImplementedError

    @property
    def slow(self) -> bool:
        return False


class LedgerCalls(WorkerServices):
    """Services whose quota ledger lives elsewhere (an actor, the runner's process): grant,
    rooms, commit and next_shard are the ledger's methods of those names, reached through
    ``_ledger``."""

    async def _ledger(self, method: str, *args: Any) -> Any:
        raise NotImplementedError

    async def grant(self, uid: str, wants: dict[str, int], floor: dict[str, int]
                    ) -> dict[str, int]:
        return await self._ledger("grant", uid, wants, floor)

    async def rooms(self) -> dict[str, int]:
        return await self._ledger("rooms")

    async def commit(self, uid: str, accepted: dict[str, int]) -> None:
        await self._ledger("commit", uid, accepted)

    async def next_shard(self, split: str) -> int:
        return await self._ledger("next_shard", split)


@dataclass
class JobPlan:
    """What every worker of a job needs to know besides the spec (it pickles)."""

    spec: DatasetSpec
    uri: str
    job_id: str
    storage_options: Optional[dict[str, Any]] = None
    list_plans: dict[int, SlicePlan] = field(default_factory=dict)
    retry_plan: Optional[SlicePlan] = None
    cpu_threads: int = 1
    validate_processes: int = 0
    """Above 1, images are validated in that many processes (``builder.validate_pool``)."""
    buffer_bytes: int = 512 << 20
    workers: int = 1
    """The job's workers: each keeps its share of every host's politeness limits."""


MIX_SHARDS = 4
"""A worker holds up to this many shards' worth of a split's rows before it writes one, so a
shard draws on several units (a unit holds one class's images). A job of one class writes each
shard as soon as it is full."""


def mixed_take(labels: list[str], n: int) -> list[int]:
    """Which ``n`` of the buffered rows (their labels, oldest first) make the next shard: the
    classes in turn, in label order, each class's oldest rows first. Every class present
    gives rows to every shard, and no row waits behind later rows of its own class."""
    queues: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        queues.setdefault(label, []).append(i)
    order = [queues[label] for label in sorted(queues)]
    picked: list[int] = []
    depth = 0
    while len(picked) < n:
        for queue in order:
            if depth < len(queue):
                picked.append(queue[depth])
                if len(picked) == n:
                    break
        depth += 1
    return sorted(picked)


def cut_shard(parts: list[pa.Table], n: int) -> tuple[pa.Table, Optional[pa.Table]]:
    """The next shard's ``n`` rows out of a split's buffered ``parts`` (``mixed_take``), in
    the shard's row order (``writers.shard_order``), and the rows left (None if none). One
    copy of the image bytes: the parts are joined into one chunk first (a take across many
    small chunks is several times slower), and the rows left are a slice where they can be."""
    held = pa.concat_tables(parts).combine_chunks()
    picked = mixed_take(held["label"].to_pylist(), n)
    ids = held["id"].to_pylist()
    table = held.take([picked[i] for i in shard_order([ids[p] for p in picked])])
    if held.num_rows == n:
        return table, None
    if picked[-1] == n - 1:  # the oldest n rows
        return table, held.slice(n)
    keep = [True] * held.num_rows
    for i in picked:
        keep[i] = False
    return table, held.filter(pa.array(keep))


class ShardAssembler:
    """Collects a worker's accepted rows per split and writes shards of exactly ``shard_size``
    rows: one once the split holds ``MIX_SHARDS`` shards' worth (classes taken in turn,
    ``mixed_take``), and early, still ``shard_size`` rows where the split has them, when
    ``buffer_bytes`` is reached; ``flush`` writes the rest, its last shard per split short.
    Commits units whose images are all written. The budget counts the rows and the decisions
    of the units waiting for them (journaled at commit, about 165 bytes a candidate): where a
    unit yields one image, a split holds up to ``shard_size * MIX_SHARDS`` units' decisions
    before it writes, 20 MB for 1,000 units of 125 candidates, beside far fewer image bytes.
    Cutting a shard runs on ``run_cpu`` (the worker's CPU pool); writing shards and journal
    files runs on ``run_store`` (the worker's storage threads). A shard uploads in the
    background, one at a time: ``add`` returns once the shard is cut and its images marked
    as being written, and the next shard due waits for the one before, so units go on being
    fetched and validated while an object store takes a shard. The rows of the shard being
    written count against ``buffer_bytes`` until it is written."""

    def __init__(self, plan: JobPlan, writer: ShardWriter, journal: Journal,
                 services: WorkerServices, run_cpu: Callable[..., Awaitable[Any]],
                 run_store: Callable[..., Awaitable[Any]]):
        self.plan = plan
        self.shard_size = plan.spec.output.shard_size
        self.writer = writer
        self.journal = journal
        self.services = services
        self.run_cpu = run_cpu
        self.run_store = run_store
        self.buffers: dict[str, list[pa.Table]] = {}
        self.buffered_bytes = 0
        """Bytes of the rows buffered and of the pending units' decisions."""
        self.pending: dict[str, dict[str, Any]] = {}
        self.committed: list[str] = []
        self.generation = 0
        """Bumped by ``discard``: a write begun before it keeps none of its rows (``_write``)."""
        self._idle = asyncio.Event()
        """Clear while a shard is being written and marked written; ``discard`` waits for it."""
        self._idle.set()
        self._committing = 0
        self._commits_done = asyncio.Event()
        """Clear while a unit's commit is under way (``_commit``); ``discard`` waits for it."""
        self._commits_done.set()
        self._upload: Optional[asyncio.Task] = None
        """The task writing a shard and committing its units (``_upload_shard``); None once
        settled."""
        self._upload_generation = 0
        """The generation ``_upload`` began in."""
        self.uploading_bytes = 0
        """Bytes of the shard being written."""
        self._lock = asyncio.Lock()
        self.splits = list(plan.spec.output.splits)
        self.mix = MIX_SHARDS if len(plan.spec.labels) > 1 else 1

    def _rows(self, split: str) -> int:
        return sum(t.num_rows for t in self.buffers.get(split, ()))

    async def add(self, unit: WorkUnit, report: UnitReport, rows: pa.Table,
                  decisions: pa.Table, generation: int) -> None:
        """Take a decided unit's accepted rows (with its decisions, journaled at commit).
        ``generation``: the one the unit began in. A ``discard`` since, even one that came
        while the unit waited here for the lock (behind a unit waiting for an upload), makes
        it stale: it raises ``IndexLost`` and hands nothing over, and the driver resends it."""
        async with self._lock:
            if generation != self.generation:
                raise IndexLost("the worker dropped its buffers while this unit ran")
            held = decisions.nbytes if rows.num_rows else 0  # else it commits at once
            self.pending[unit.uid] = {"unit": unit, "report": report, "decisions": decisions,
                                      "remaining": rows.num_rows, "held": held}
            self.buffered_bytes += held
            if rows.num_rows:
                splits = sorted(pc.unique(rows["split"]).to_pylist())
                for split in splits:  # one split (the usual case): no copy of the images
                    part = rows if len(splits) == 1 else rows.filter(
                        pc.equal(rows["split"], split))
                    self.buffers.setdefault(split, []).append(part)
                    self.buffered_bytes += part.nbytes
            else:
                await self._commit(unit.uid)
            for split in list(self.buffers):
                while self._rows(split) >= self.shard_size * self.mix:
                    await self._write(split, self.shard_size)
            while (self.buffered_bytes + self.uploading_bytes > self.plan.buffer_bytes
                   and (self.buffers or self._upload is not None)):
                if self._upload is not None:  # its units' decisions go once they commit
                    await self._settle()
                    continue
                largest = max(self.buffers, key=self._rows)
                await self._write(largest, min(self.shard_size, self._rows(largest)))

    async def flush(self) -> None:
        """Write what is buffered (the last, short shards) and commit the units."""
        async with self._lock:
            for split in list(self.buffers):
                while self._rows(split):
                    await self._write(split, min(self.shard_size, self._rows(split)))
            await self._settle()

    async def close(self) -> None:
        """Stop waiting for a shard upload still under way (a job that stops on an error):
        its units never commit, as after a crash mid-write (the storage thread may still
        finish the shard; without their journal files, a resumed job runs them again)."""
        if self._upload is not None:
            self._upload.cancel()
            await asyncio.gather(self._upload, return_exceptions=True)
            self._upload = None
            self.uploading_bytes = 0  # a task cancelled before it began ran no finally
            self._idle.set()

    async def _settle(self) -> None:
        """Wait until the shard being written is written and its units committed; raises
        what its write raised, once, unless a ``discard`` came since it began: its units are
        resent then, and what it failed with (its commits may still have been running when
        the ``discard`` returned) is not the new generation's. Called under the lock only."""
        task = self._upload
        if task is None:
            return
        await asyncio.wait({task})  # a cancelled waiter leaves the upload to settle or close
        if self._upload is task:
            self._upload = None
        if self._upload_generation == self.generation:
            task.result()
        elif not task.cancelled() and task.exception() is not None:
            log.debug("a shard upload of a dropped generation failed (its units are resent): "
                      "%r", task.exception())

    async def discard(self) -> list[str]:
        """Drop everything not yet written (the units will be resent); returns their uids once
        a shard already being written is written and marked so, so that a resent unit finds
        its images written instead of writing them again, and once a commit under way is
        journaled, so that the unit, resent, finds its journal file (``WorkerRuntime.run``)
        instead of running again beside a commit still to land."""
        dropped = list(self.pending)
        self.generation += 1
        self.buffers.clear()
        self.pending.clear()
        self.committed.clear()  # the driver resends every unit it has not seen commit
        self.buffered_bytes = 0
        await self._idle.wait()  # an upload's error now belongs to the dropped generation
        await self._commits_done.wait()
        return dropped

    def take_committed(self) -> list[str]:
        out, self.committed = self.committed, []
        return out

    async def _write(self, split: str, n: int) -> None:
        """Start writing the next shard of ``split`` (``n`` rows), once the one before is
        written; ``_upload_shard`` writes it and commits the units it completes.

        ``discard`` (an index reset) drops the buffers at once and may come at any await
        here: the lock keeps ``add`` and ``flush`` out, not it. The units it drops are resent
        and write their images again, so a write that sees ``generation`` move keeps none of
        their rows: the rows left are not buffered again, and the shard is not written unless
        its upload has begun. A shard abandoned after ``mark_written(writing=...)`` never
        exists, so that mark reads as not written (``UnitRun._dedup``). One being written
        finishes and is marked written before ``discard`` returns (it waits for ``_idle``),
        so the resent units find those images written; its units, no longer pending, are not
        committed."""
        generation = self.generation
        await self._settle()
        if self.generation != generation:
            return
        parts = self.buffers.pop(split)
        self.buffered_bytes -= sum(t.nbytes for t in parts)
        table, rest = await self.run_cpu(cut_shard, parts, n)
        if self.generation != generation:
            return
        if rest is not None:
            self.buffers[split] = [rest]
            self.buffered_bytes += rest.nbytes
        number = await self.services.next_shard(split)
        ref = (self.splits.index(split) << 32) | number if split in self.splits else number
        ids = [id_number(i) for i in table["id"].to_pylist()]
        claims = table["_claim"].to_pylist()
        if self.generation != generation:
            return
        await self.services.dedup.mark_written(ids, claims, writing=ref)
        if self.generation != generation:
            return
        extra = {"uid": table["_uid"].to_pylist(), "claim": claims,
                 "sig_a": table["_sig_a"].to_pylist(), "sig_b": table["_sig_b"].to_pylist()}
        self._idle.clear()
        self.uploading_bytes = table.nbytes
        self._upload_generation = generation
        self._upload = asyncio.ensure_future(
            self._upload_shard(table, split, number, ids, extra, generation))

    async def _upload_shard(self, table: pa.Table, split: str, number: int, ids: list[int],
                            extra: dict[str, list], generation: int) -> None:
        """Write a cut shard, mark its images written, and commit the units it completes
        (none if ``discard`` came meanwhile: their uids may be pending again, resent)."""
        try:
            await self.run_store(self.writer.write, table, split, number, self.journal, extra)
            await self.services.dedup.mark_written(ids, extra["claim"])
        finally:
            self.uploading_bytes = 0
            self._idle.set()
        for uid, count in Counter(extra["uid"]).items():
            if self.generation != generation:
                return
            entry = self.pending.get(uid)
            if entry is not None:
                entry["remaining"] -= count
                if entry["remaining"] <= 0:
                    await self._commit(uid)

    async def _commit(self, uid: str) -> None:
        """Journal a unit whose images are all written and tell the ledger; the driver hears
        of it with the next events, unless a ``discard`` came meanwhile: it resends the unit
        then, and a commit of this attempt must not be taken for the resent one's."""
        generation = self.generation
        entry = self.pending.pop(uid)
        self.buffered_bytes -= entry["held"]
        report: UnitReport = entry["report"]
        self._committing += 1
        self._commits_done.clear()
        try:
            await self.run_store(self.journal.write_unit, entry["unit"], report,
                                 entry["decisions"])
            await self.services.commit(uid, report.accepted)
        finally:
            self._committing -= 1
            if not self._committing:
                self._commits_done.set()
        if self.generation == generation:
            self.committed.append(uid)


STORE_THREADS = 2
"""A worker's storage threads: while one takes a shard to the store, the other writes units'
journal files and reads the next list slices instead of waiting behind the upload."""


class WorkerRuntime:
    """One worker: runs units (see the module docstring). Call ``start`` first."""

    def __init__(self, plan: JobPlan, services: WorkerServices, worker_id: str = "local"):
        self.plan = plan
        self.spec = plan.spec
        self.services = services
        self.worker_id = worker_id
        self.validator: Union[ImageValidator, ProcessValidator] = ImageValidator(
            self.spec.validation)
        self.isolating: Optional[ProcessValidator] = None
        """Validates the images of units sent with ``isolate`` (their worker was lost while
        they ran) in a process of its own; started for the first such unit."""
        self.transformer = ImageTransformer(self.spec.output.resize, self.spec.output.encode)
        self.journal = Journal(plan.uri, plan.job_id, plan.storage_options)
        self.writer = ShardWriter(self.spec.output, plan.uri, self.spec.labels,
                                  plan.storage_options)
        self.fetcher: Optional[Fetcher] = None
        self.pool: Optional[ThreadPoolExecutor] = None
        self.store_pool: Optional[ThreadPoolExecutor] = None
        """``STORE_THREADS`` threads for storage: list and retry reads, shard and journal
        writes. Apart from ``pool`` because on a worker of one CPU thread (a Ray shard worker)
        an upload there would stop validation for as long as it lasts."""
        self.assembler: Optional[ShardAssembler] = None
        self.engines: dict[int, SearchEngine] = {}
        self.readers: dict[int, ListReader] = {}
        self._cancel = asyncio.Event()
        self._fetch_stats_sent: Counter = Counter()
        self.incarnation = ""
        """Set by a host that restarts workers (the Ray actor's incarnation)."""
        self.on_stage: Optional[Callable[[str, float], None]] = None
        """Called with (stage, seconds) after each unit's fetch and validate stages."""
        self.fetched: dict[str, Counter] = {}
        """Per unit running now, per class: candidates fetched so far (``in_flight``)."""
        self.held = HeldBudget(self.spec.resources.max_held_mb << 20)
        """The images its units hold, from their download until each unit is decided
        (``builder.held``)."""
        self.batching: dict[int, Callable[[], None]] = {}
        """Per unit fetching now (by ``id``): hands the bodies it is collecting into a
        validation batch on to validation (``hand_on``)."""
        self.shard_units: dict[str, frozenset[str]] = {}
        """The units in each journaled shard file read so far (``Journal.unit_rows``)."""

    async def start(self) -> None:
        """Open the fetcher and pool; check this worker can write the output."""
        await asyncio.to_thread(ensure_writable, self.plan.uri, self.plan.storage_options)
        self.pool = ThreadPoolExecutor(max_workers=max(1, self.plan.cpu_threads),
                                       thread_name_prefix="pixcrawler-cpu")
        self.store_pool = ThreadPoolExecutor(max_workers=STORE_THREADS,
                                             thread_name_prefix="pixcrawler-store")
        if self.plan.validate_processes > 1:
            self.validator = ProcessValidator(self.spec.validation, self.plan.validate_processes)
        self.fetcher = Fetcher(self.spec.download, hold_bodies=True,
                               host_share=self.plan.workers)
        self.fetcher.budget.on_wait = self.hand_on
        await self.fetcher.__aenter__()
        self.assembler = ShardAssembler(self.plan, self.writer, self.journal, self.services,
                                        self._io, self._store)
        for i, src in enumerate(self.spec.sources):
            if src.engine == "urllist":
                if i not in self.plan.list_plans:
                    continue  # a retry's: it reads no list
                self.readers[i] = ListReader(
                    self.plan.list_plans[i], url_column=src.url_column,
                    label_column=src.label_column, caption_column=src.caption_column,
                    storage_options=self.plan.storage_options,
                    default_label=self.spec.labels[0] if len(self.spec.labels) == 1 else "")
            else:
                self.engines[i] = make_engine(src, self.spec)

    async def close(self) -> None:
        if self.assembler is not None:
            await self.assembler.close()
        if self.fetcher is not None:
            await self.fetcher.close()
            self.fetcher = None
        for engine in self.engines.values():
            engine.close()
        for reader in self.readers.values():
            reader.close()
        for pool in (self.pool, self.store_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self.store_pool = None
        if isinstance(self.validator, ProcessValidator):
            await asyncio.to_thread(self.validator.close)
            self.validator = ImageValidator(self.spec.validation)
        if self.isolating is not None:
            await asyncio.to_thread(self.isolating.close)
            self.isolating = None

    def validator_for(self, unit: WorkUnit) -> Union[ImageValidator, ProcessValidator]:
        """The unit's validator: this worker's own, or for an ``isolate`` unit one whose
        processes may die without taking the worker with them."""
        if not unit.isolate or isinstance(self.validator, ProcessValidator):
            return self.validator
        if self.isolating is None:
            self.isolating = ProcessValidator(self.spec.validation, 1)
        return self.isolating

    def transform_for(self, unit: WorkUnit) -> Callable[[list[Record]], list[Record]]:
        """How the unit's accepted images are resized and re-encoded: in this process, or for
        an ``isolate`` unit in its validator's processes, since the full-size decode a resize
        needs may kill a process that validation's 1/8 decode did not."""
        validator = self.validator_for(unit)
        if unit.isolate and isinstance(validator, ProcessValidator):
            return functools.partial(validator.transform, self.transformer)
        return self.transformer

    def hand_on(self) -> None:
        """Send every unit's bodies waiting for a full validation batch on to validation: a
        body read and kept holds its share of the fetcher's byte budget until it is
        validated, so a body that must wait for the budget might otherwise wait for them."""
        for send in list(self.batching.values()):
            send()

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the CPU pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, fn, *args)

    async def _store(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a storage thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.store_pool, fn, *args)

    def cancel(self) -> None:
        """Stop: units in flight end with their undecided candidates ``cancelled``."""
        self._cancel.set()

    def observe(self, stage: str, seconds: float) -> None:
        if self.on_stage is not None:
            self.on_stage(stage, seconds)

    def events(self) -> WorkerEvents:
        assert self.assembler is not None
        stats = self.fetcher.stats if self.fetcher is not None else {}
        now = Counter({k: v for k, v in stats.items() if isinstance(v, (int, float))})
        now.update(held_bytes_peak=self.held.peak, held_waits=self.held.waits)
        delta = now - self._fetch_stats_sent
        self._fetch_stats_sent = now
        return WorkerEvents(self.worker_id, self.assembler.take_committed(), dict(delta),
                            self.incarnation)

    async def run(self, unit: WorkUnit) -> tuple[UnitReport, WorkerEvents]:
        """Decide one unit's candidates; returns its report and the worker's events."""
        if unit.attempt > 0:
            journaled = await self._store(self.journal.read_unit, unit.uid)
            if journaled is not None:
                return await self._committed_before(unit, journaled), self.events()
        self.fetched[unit.uid] = Counter()
        ticket = self.held.open()
        try:
            report = await UnitRun(self, unit, ticket).run()
        finally:
            self.held.close(ticket)
            self.fetched.pop(unit.uid, None)
        return report, self.events()

    async def _committed_before(self, unit: WorkUnit, report: UnitReport) -> UnitReport:
        """A resent unit an earlier attempt committed: its journal file is written, but the
        driver did not hear of it (the worker was lost, or an index reset dropped the
        commits not yet sent). Its report stands; running it again would decide its
        candidates against a class its own images fill. The ledger counts it (a commit counts
        once) and the driver hears of the commit with these events."""
        assert self.assembler is not None
        log.info("unit %s was committed by an earlier attempt: its journaled report stands",
                 unit.uid)
        await self.services.commit(unit.uid, report.accepted)
        self.assembler.committed.append(unit.uid)
        return report

    def in_flight(self) -> dict[str, dict[str, int]]:
        """Per unit running now, per class, its candidates fetched so far: a unit's images
        are decided together at its end, so this is what moves while it runs."""
        return {uid: dict(per_class) for uid, per_class in self.fetched.items() if per_class}

    async def flush(self) -> WorkerEvents:
        assert self.assembler is not None
        await self.assembler.flush()
        return self.events()

    async def discard(self) -> list[str]:
        """Drop everything not written (the index lost what it decided); units running now
        are stale and will raise ``IndexLost`` instead of handing rows over. Returns the
        dropped units once a shard being written is done (``ShardAssembler.discard``)."""
        assert self.assembler is not None
        return await self.assembler.discard()

    async def stage(self, aw: Awaitable[T], cancellable: bool = True) -> T:
        """Await ``aw`` unless the job is cancelled first (then ``UnitCancelled``)."""
        if not cancellable:
            return await aw
        if self._cancel.is_set():
            if asyncio.iscoroutine(aw):
                aw.close()
            raise UnitCancelled()
        task = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self._cancel.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise UnitCancelled()
        return task.result()


class UnitRun:
    """One unit on one worker, from candidates to rows (see the module docstring)."""

    def __init__(self, worker: WorkerRuntime, unit: WorkUnit, ticket: int = -1):
        self.w = worker
        self.spec = worker.spec
        self.unit = unit
        self.ticket = ticket
        """The unit's place in the worker's ``HeldBudget`` (-1: not registered, as in tests
        that drive one stage)."""
        self.report = UnitReport(unit.uid, worker.worker_id)
        self.records: list[Record] = []
        self.items: list[tuple[Record, DedupItem]] = []
        """Every index item the unit decided (a held one once, decided again in later
        rounds)."""
        self.held: dict[int, DedupDecision] = {}
        """Per record (by ``id``), the decision of one held in the last index round."""
        self.granted: set[int] = set()
        """Records (by ``id``) the quota granted in an earlier round."""
        self.written: set[int] = set()
        self.bad_rows: dict[int, str] = {}
        self.url_hashes: dict[int, int] = {}
        """Per record (by ``id``), the hash of its normalised URL, as ``_check_urls`` found it."""
        self.restored: set[int] = set()
        """Records (by ``id``) whose image an earlier attempt wrote (``_restore_written``)."""
        self.generation = worker.assembler.generation if worker.assembler is not None else 0
        """The assembler's generation the unit began in: a ``discard`` since makes it stale."""

    def stage(self, aw: Awaitable[T]) -> Awaitable[T]:
        return self.w.stage(aw, cancellable=self.unit.attempt == 0)

    def claim(self, record: Record) -> int:
        """The candidate's claim in the index: its key within this unit (a resent unit meets
        its own entries; the same candidate in another unit is another claim). It is made
        from the key the candidate was found under, which a relabel does not change."""
        return self._claim_of(record.found_key)

    def _claim_of(self, found_key: str) -> int:
        return claim_of(f"{self.unit.uid}\n{found_key}")

    async def run(self) -> UnitReport:
        w, unit, report = self.w, self.unit, self.report
        try:
            candidates = await self.stage(self._candidates())
        except UnitCancelled:
            candidates = None
        if candidates is None:
            report.settled = False
            return report
        rooms = await w.services.rooms() if candidates else {}
        if unit.kind == SEARCH:
            # An engine has more pages: take up only what the class may still need.
            cap = math.ceil(rooms.get(unit.label, 0) * self.spec.search.candidates_factor)
        else:
            cap = len(candidates)
        # A resent unit (or one a killed run left half-written) may have written images of
        # any of its candidates: those in committed shards are taken back unfetched
        # (``_restore_written``), the others go on to the index, which knows of any shard
        # written since, and the grant keeps the written first (the rest are over_target),
        # whatever room the class has left now.
        again = unit.attempt > 0
        for cand in candidates:
            if cand.label not in rooms:
                report.skipped[cand.label] += 1
            elif again:
                self.records.append(Record(cand))
            elif unit.kind == RETRY and rooms[cand.label] <= 0:
                # A published reject decided again: a candidate already, which the class
                # no longer needs (not a hit left unused, which would drop its record).
                self.records.append(Record(cand).reject(
                    Reason.OVER_TARGET, f"class already has {self.spec.target_of(cand.label)}"))
            elif rooms[cand.label] <= 0 or cap <= 0:
                report.tally(cand.label).unused += 1
            else:
                self.records.append(Record(cand))
                cap -= 1
        if again:
            await self._restore_written()
            # What the earlier attempt filed and did not write is not the index's; what it
            # wrote keeps its signatures (a partition rebuilt from the journal after a lost
            # node knows those images by the journal, not by this unit).
            await self.stage(self.w.services.dedup.drop_unit(unit.seq, self.written))
        try:
            await self._decide()
        except UnitCancelled:
            for record in self.records:
                if not record.rejected and record.sha256 and self._is_written(record):
                    continue
                if not record.rejected:
                    record.reject(Reason.CANCELLED, "job cancelled")
            await self._finish_cancelled()
            return report
        return report

    # -- candidates --------------------------------------------------------------------------

    async def _candidates(self) -> Optional[list[Candidate]]:
        unit, spec, w = self.unit, self.spec, self.w
        if unit.kind == SEARCH:
            engine = w.engines[unit.source]
            try:
                page = await w.services.search(unit, engine)
            except SourceError as exc:  # EngineUnavailable, or a source that cannot be read
                self.report.search = SearchOutcome(error=_short(exc), final=True)
                return None
            except EngineError as exc:
                error = _search_error(exc, unit.engine, spec.download.allow_private_networks)
                refused = exc if isinstance(exc, CircuitOpen) else None
                self.report.search = SearchOutcome(
                    error=error, status=exc.status, retryable=exc.retryable,
                    retry_after=exc.retry_after, final=not exc.retryable,
                    refused=refused is not None,
                    probes_failed=refused.probes_failed if refused is not None else 0)
                return None
            self.report.search = SearchOutcome(hits=len(page.hits), has_more=page.has_more)
            return [hit.to_candidate(unit.label, unit.query, unit.engine) for hit in page.hits]
        if unit.kind == INLINE:
            urls = spec.classes[unit.label].urls[unit.start:unit.stop]
            return [Candidate(url=u, label=unit.label, engine="inline", rank=unit.start + i)
                    for i, u in enumerate(urls)]
        if unit.kind == LIST:
            rows = await w._store(w.readers[unit.source].read, unit.slice)
            if not rows:
                self.report.exhausted = unit.slice >= w.plan.list_plans[unit.source].count
            out = []
            for i, r in enumerate(rows):
                cand = Candidate(url=r.url, label=r.label, engine="urllist", rank=i,
                                 caption=r.caption)
                if not r.url:
                    self.bad_rows[id(cand)] = r.where
                out.append(cand)
            return out
        if unit.kind == WRITTEN:
            return []  # its images come back from the journal (``_restore_written``)
        if unit.kind == RETRY:
            assert w.plan.retry_plan is not None
            return await w._store(retry_candidates, w.plan.retry_plan, w.plan.storage_options,
                                  spec, unit.slice)
        raise ValueError(f"unknown unit kind {unit.kind!r}")

    # -- deciding ----------------------------------------------------------------------------

    async def _restore_written(self) -> None:
        """Take back, as they were written, the images an earlier attempt of this unit wrote
        into committed shards (its journal's shard rows): they are in the dataset whatever
        happens now, so they are accepted without being fetched again. Fetched again, one
        that failed this time (a server down, a changed file) ended a reject while its shard
        kept it, and one whose candidate a search no longer returned was never decided:
        either way the manifest held an image no count had, and publishing failed on every
        ``--resume``. A candidate found again is matched by its claim; one not found again
        comes back from its row (its URL and class). Each keeps its row's rights ledger (none
        from a journal written before shard rows kept it: a job killed under an older
        version then publishes a rights summary without those images' ledgers), and its
        stored size stands for the bytes it downloaded."""
        unit = self.unit
        rows = await self.w._store(self.w.journal.unit_rows, unit.uid, self.w.shard_units)
        if not rows:
            return
        by_claim: dict[int, list[Record]] = {}
        for r in reversed(self.records):  # popped in the order they were found
            by_claim.setdefault(self.claim(r), []).append(r)
        for row in rows:
            found = by_claim.get(row["claim"])
            if found:
                record = found.pop()
            else:  # not found again, or (before the unit check) the same URL written twice
                record = Record(self._lost_candidate(row))
                self.records.append(record)
            if record.label != row["label"]:  # relabelled when it was written
                record.relabelled_from = record.label
                record.candidate = dataclasses.replace(record.candidate, label=row["label"])
            record.sha256 = row["sha256"]
            record.format = row["format"] or ""
            record.width, record.height = row["width"] or 0, row["height"] or 0
            record.downloaded_bytes = row["bytes"] or 0
            record.rights = tuple(Signal(s["signal"], s["value"], s["source"], s["verdict"])
                                  for s in row["rights"] or ())
            self.restored.add(id(record))
            self.written.add(id_number(record.id))
        log.info("unit %s: %d images an earlier attempt wrote are taken back as written",
                 unit.uid, len(rows))

    def _lost_candidate(self, row: dict[str, Any]) -> Candidate:
        """The candidate of a written image that this attempt did not find again (a search
        whose results changed): its URL, under the class whose key gives the row's claim,
        which is the class it was found under (a relabelled image's row has its new class)."""
        unit, url = self.unit, row["url"] or ""
        found = next((label for label in [row["label"], *self.spec.labels]
                      if self._claim_of(candidate_key(label, url)) == row["claim"]),
                     row["label"])
        return Candidate(url=url, label=found, query=unit.query, engine=unit.engine)

    async def _decide(self) -> None:
        w = self.w
        await self._check_urls()
        live = [r for r in self.records if not r.rejected and id(r) not in self.restored]
        if live:
            try:
                await self._fetch_and_validate(live)
            finally:
                assert w.fetcher is not None
                for r in live:
                    w.fetcher.release(r)
        # A duplicate of an image not yet decided (another unit's, between its index check
        # and its settle; or one this unit keeps, which a later stage may still refuse) is
        # decided again once that image is: were it rejected, neither copy would be kept.
        items = self._dedup_items()
        deadline, delay = time.monotonic() + self._hold_wait_s(), HOLD_FIRST_S
        while True:
            await self._dedup(items)
            if w.services.slow:
                kept = [r for r, _ in items if not r.rejected and id(r) not in self.held]
                if kept:
                    await self.stage(w.services.score(kept, w.pool))
                    self._hold_near_copies(kept)
            await self._grant()
            await self._settle(items)
            await self._settle_scores([r for r, _ in items if id(r) not in self.held])
            others = self._follow_siblings(items)
            items = [(r, it) for r, it in items if id(r) in self.held]
            if not items:
                break
            if self.generation != (w.assembler.generation if w.assembler else 0):
                raise IndexLost("the worker dropped its buffers while this unit waited")
            if w._cancel.is_set() and self.unit.attempt:
                self._end_holds(Reason.CANCELLED)  # (a first attempt's ends in UnitCancelled)
                break
            if time.monotonic() >= deadline:
                self._end_holds()
                break
            if others:
                # another unit settles its images once it has scored and been granted them
                # (jittered, so that units holding each other part)
                await self.stage(asyncio.sleep(delay * (0.5 + random.random())))
                delay = min(delay * 2, HOLD_MAX_S)
        await self._emit()

    async def _fetch_and_validate(self, live: list[Record]) -> None:
        """Fetch the unit's images and validate them as they arrive, a few at a time on the
        worker's pool; each body's share of the fetcher's byte budget is given back once it is
        validated, so bytes read and not yet validated stay under the budget."""
        w = self.w
        assert w.fetcher is not None
        fetcher = w.fetcher
        waiting: list[Record] = []
        batches: list[asyncio.Future] = []
        loop = asyncio.get_running_loop()
        spent = [0.0]
        validator = w.validator_for(self.unit)

        def validate(batch: list[Record]) -> None:
            t0 = time.perf_counter()
            validator(batch)
            spent[0] += time.perf_counter() - t0

        def validated(batch: list[Record]) -> None:
            for r in batch:
                fetcher.release(r)
                if r.rejected:  # its bytes are dropped
                    w.held.add(self.ticket, -r.downloaded_bytes)

        def submit() -> None:
            batch = list(waiting)
            future = loop.run_in_executor(w.pool, validate, batch)
            waiting.clear()
            future.add_done_callback(lambda _: validated(batch))
            batches.append(future)

        def hand_on() -> None:
            if waiting:
                submit()

        fetched = w.fetched.get(self.unit.uid, Counter())

        def arrived(record: Record) -> None:
            fetched[record.label] += 1
            if record.rejected or record.data is None:
                fetcher.release(record)
                return
            record.downloaded_bytes = len(record.data)
            w.held.add(self.ticket, record.downloaded_bytes)
            waiting.append(record)
            if len(waiting) >= VALIDATE_BATCH or fetcher.budget.has_waiters:
                submit()  # a body waiting for the budget may be waiting for this one

        t0 = time.perf_counter()
        w.batching[id(self)] = hand_on
        try:
            await self.stage(fetcher.fetch_many(
                live, on_result=arrived, before=functools.partial(w.held.turn, self.ticket)))
            w.observe("fetch", time.perf_counter() - t0)
            hand_on()
        finally:
            w.batching.pop(id(self), None)
            if batches:
                await asyncio.gather(*batches, return_exceptions=True)
        for future in batches:
            future.result()
        w.observe("validate", spent[0])

    async def _check_urls(self) -> None:
        """Reject bad URLs; claim the others. A candidate an earlier run decided (this run
        continues its dataset) is dropped: it is not a new candidate."""
        from builder.urls import check_url

        claims, kclaims, hashes, which = [], [], [], []
        for record in self.records:
            if record.rejected:  # decided before its URL mattered (``run``)
                continue
            norm, reason, detail = check_url(record.candidate.url)
            if reason is not None or norm is None:
                if id(record) in self.restored:
                    continue  # written whatever its URL says now
                where = self.bad_rows.get(id(record.candidate))
                record.reject(reason or Reason.INVALID_URL,
                              f"{detail} ({where})" if where else detail)
                continue
            claims.append(self.claim(record))
            kclaims.append(claim_of(record.candidate.key))
            hashes.append(url_hash(norm))
            self.url_hashes[id(record)] = hashes[-1]
            which.append(record)
        if not which:
            return
        answers = await self.stage(self.w.services.dedup.check_urls(claims, hashes, kclaims))
        before = set()
        # The index answers a candidate's own claim as its own: a second candidate of the
        # same class and URL in this unit (a list naming a line twice, a search repeating a
        # hit) has that claim too, so the unit finds it here. Written ones come first.
        here = {self.url_hashes[id(r)] for r in which if id(r) in self.restored}
        for record, (other, done) in zip(which, answers):
            if id(record) in self.restored:  # written: its URL is claimed, whoever else has it
                continue
            # A published reject decided again (RETRY) is ``done`` and goes on: the entry of
            # its key is another kept row of that key (its URL's later sightings), not it.
            h = self.url_hashes[id(record)]
            if done and self.unit.kind != RETRY:
                before.add(id(record))
            elif (other and not done) or h in here:
                record.reject(Reason.DUPLICATE_URL, "the same URL was already a candidate in "
                                                    "this job")
            else:
                here.add(h)
        if before:
            self.report.decided_before += len(before)
            self.records = [r for r in self.records if id(r) not in before]
            for gone in before:  # its id may be another record's once it is freed
                del self.url_hashes[gone]

    def url_hash(self, record: Record) -> int:
        """The hash of ``record``'s normalised URL (0 for a URL that does not normalise): the
        one ``_check_urls`` claimed, else worked out now (a record rejected before the check
        or by it)."""
        known = self.url_hashes.get(id(record))
        if known is not None:
            return known
        from builder.urls import normalise_url

        norm = normalise_url(record.candidate.url)
        return url_hash(norm) if norm else 0

    def _is_written(self, record: Record) -> bool:
        return id_number(record.id) in self.written

    def _dedup_items(self) -> list[tuple[Record, DedupItem]]:
        """The unit's valid images as index items, in the order they are decided."""
        unit = self.unit
        # Best copy first: of the copies of one picture in this unit, the index keeps the first
        # it decides, so the largest / colour / least compressed one (``quality_key``).
        valid = sorted((r for r in self.records
                        if not r.rejected and r.sha256 and id(r) not in self.restored),
                       key=lambda r: quality_key(copy_of(r)))
        items = [(record, DedupItem(self.claim(record), unit.token(pos), id_number(record.id),
                                    *record.dedup_signatures()))
                 for pos, record in enumerate(valid)]
        self.items.extend(items)
        return items

    async def _dedup(self, items: list[tuple[Record, DedupItem]]) -> None:
        """Decide ``items`` in the index: a duplicate of a decided image is rejected, one of
        an undecided image is held (``self.held``), and a kept image an earlier attempt wrote
        is noted as written."""
        w = self.w
        self.held.clear()
        if not items:
            return
        decisions = await self.stage(w.services.dedup.decide([it for _, it in items]))
        names: dict[int, bool] = {}
        for (record, item), decision in zip(items, decisions):
            record.held_on = record.held_detail = ""
            if decision.held:
                self.held[id(record)] = decision
                continue
            if decision.duplicate:
                record.reject(decision.reason, _duplicate_detail(decision),
                              duplicate_of=decision.kept_id)
                continue
            written = decision.written
            if decision.writing >= 0:
                if decision.writing not in names:
                    names[decision.writing] = await w._store(
                        w.journal.shard_exists, self._shard_of(decision.writing))
                written = names[decision.writing]
            if written:
                self.written.add(item.image_id)

    def _hold_near_copies(self, scored: list[Record]) -> None:
        """Hold the images the slow level's embedding store found near copies of images still
        undecided (``Record.held_on``), as the index holds copies of its undecided images."""
        for record in scored:
            if record.held_on and not record.rejected:
                self.held[id(record)] = DedupDecision(Reason.NEAR_DUPLICATE, record.held_on,
                                                      held=True)

    def _follow_siblings(self, items: list[tuple[Record, DedupItem]]) -> bool:
        """Decide here what holds on an image of this unit's round just settled would be
        decided again: a copy of an accepted image is its duplicate; one of a refused image,
        of the same bytes and class, gets its verdict (the slow level and the quota judge
        bytes and class). Others (a near copy, another class) stay held. Returns whether any
        held image waits on another unit's."""
        if not self.held:
            return False
        decided: dict[str, Record] = {}
        others = False
        for r, _ in items:  # of copies decided alike, an accepted one
            if id(r) not in self.held and (r.id not in decided or not r.rejected):
                decided[r.id] = r
        for record, _ in items:
            decision = self.held.get(id(record))
            holder = decided.get(decision.kept_id) if decision is not None else None
            if holder is None:
                others = others or decision is not None
                continue
            if not holder.rejected:
                del self.held[id(record)]
                record.reject(decision.reason, _held_detail(record, decision),
                              duplicate_of=decision.kept_id)
            elif holder.id == record.id and holder.label == record.label:
                del self.held[id(record)]
                record.reject(Reason(holder.reason), f"as its copy {holder.id}: {holder.detail}",
                              duplicate_of=holder.duplicate_of)
        return others

    def _end_holds(self, reason: Optional[Reason] = None) -> None:
        """Stop waiting: each held image is the duplicate it would be (held past the wait, its
        image's unit may hang or be lost, and its resend wait for this unit's place), or,
        with ``reason``, rejected for it (a resent unit's wait in a cancelled job)."""
        for record in self.records:
            decision = self.held.get(id(record))
            if decision is None:
                continue
            if reason is not None:
                record.reject(reason, "job cancelled")
            else:
                record.reject(decision.reason, f"{_held_detail(record, decision)}, still "
                              "undecided when this unit stopped waiting",
                              duplicate_of=decision.kept_id)
        if self.held and reason is None:
            log.warning("unit %s: %d images were copies of images still undecided after "
                        "%.0f s: rejected as their duplicates", self.unit.uid, len(self.held),
                        self._hold_wait_s())
        self.held.clear()

    def _hold_wait_s(self) -> float:
        """How long held images wait in all (``HOLD_WAIT_S``)."""
        return HOLD_WAIT_SLOW_S if self.w.services.slow else HOLD_WAIT_S

    def _shard_of(self, ref: int) -> str:
        splits = list(self.spec.output.splits)
        index, number = ref >> 32, ref & 0xFFFFFFFF
        return shard_name(splits[index] if index < len(splits) else "", number)

    async def _grant(self) -> None:
        """Ask the quota for the unit's accepted images (the held left out); those granted in
        an earlier round, and those an earlier attempt wrote, are granted again whatever the
        room (a grant replaces the unit's last), the rest as far as there is room."""
        w = self.w
        valid = [r for r in self.records if not r.rejected and id(r) not in self.held]
        wants: Counter = Counter(r.label for r in valid)
        floor: Counter = Counter(r.label for r in valid
                                 if self._is_written(r) or id(r) in self.granted)
        if self.granted and wants == floor:
            return  # no image new since the last grant, which stands
        granted = await w.services.grant(self.unit.uid, dict(wants), dict(floor)) \
            if wants else {}
        left = Counter(granted)
        for record in sorted(valid, key=lambda r: (not self._is_written(r),
                                                   id(r) not in self.granted)):
            if left[record.label] > 0:
                left[record.label] -= 1
                self.granted.add(id(record))
            else:
                target = self.spec.target_of(record.label)
                record.reject(Reason.OVER_TARGET, f"class already has {target}")

    async def _settle(self, items: list[tuple[Record, DedupItem]]) -> None:
        """Tell the index what became of ``items``: the accepted are kept; the rejected, and
        the held (decided again later, filed again then), are dropped."""
        if not items:
            return
        keep = [not r.rejected and id(r) not in self.held for r, _ in items]
        await self.w.services.dedup.settle([it for _, it in items], keep,
                                           [not k for k in keep])

    async def _settle_scores(self, records: Optional[list[Record]] = None) -> None:
        """The final decisions on ``records`` (default: the unit's) for the slow level's
        embedding store: a refused image leaves it, so that no copy is refused against it."""
        records = self.records if records is None else records
        if records and self.w.services.slow and \
                self.spec.validation.embedding_dedup_threshold is not None:
            await self.w.services.settle_scores(records)

    async def _emit(self) -> None:
        """Count, build the rows and hand them to the assembler (the index is settled)."""
        w = self.w
        accepted = [r for r in self.records if not r.rejected]
        new = [r for r in accepted if not self._is_written(r)]
        for r in new:
            r.split = assign_split(r.id, self.spec.output.splits)
        if w.transformer.active and new:
            await w._io(w.transform_for(self.unit), new)
        self._count()
        rows = await w._io(self._rows, new)
        decisions = await w._io(_decision_rows, self.records, self.claim, self.url_hash)
        assert w.assembler is not None
        await w.assembler.add(self.unit, self.report, rows, decisions, self.generation)

    async def _finish_cancelled(self) -> None:
        w = self.w
        self.held.clear()
        await self._settle(self.items)
        await self._settle_scores()
        kept = [r for r in self.records if not r.rejected]
        if kept:  # images an earlier attempt wrote: accepted, whatever happened since
            await w.services.grant(self.unit.uid, dict(Counter(r.label for r in kept)),
                                   dict(Counter(r.label for r in kept)))
        self._count()
        decisions = await w._io(_decision_rows, self.records, self.claim, self.url_hash)
        assert w.assembler is not None
        await w.assembler.add(self.unit, self.report, _empty_rows(), decisions, self.generation)

    def _count(self) -> None:
        """Count the unit's candidates once, at its end, under their final labels: a unit
        cancelled at any stage still reports each candidate it kept, decided or cancelled."""
        report = self.report
        report.rights = RightsTally()
        for record in self.records:
            report.rights.add(record.rights)
            tally = report.tally(record.label)
            tally.candidates += 1
            if record.relabelled_from:
                report.relabelled[(record.relabelled_from, record.label)] += 1
            if record.rejected:
                tally.rejected[record.reason] += 1
                report.by_stage[record.stage] += 1
            else:
                tally.accepted += 1
                report.bytes += record.downloaded_bytes

    def _rows(self, records: list[Record]) -> pa.Table:
        rows = []
        for r in records:
            row = accepted_row(r)
            stored, _ = r.dedup_signatures()
            row.update(_uid=self.unit.uid, _claim=self.claim(r),
                       _sig_a=[a for a, _ in stored], _sig_b=[b for _, b in stored])
            rows.append(row)
            r.data = None
        return pa.Table.from_pylist(rows, schema=_BUFFER_SCHEMA) if rows else _empty_rows()


class _HidePandas(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> None:
        if name.partition(".")[0] == "pandas":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def settle_process() -> None:
    """Make a worker process's steady state cheaper once its imports are done (the
    in-process runner's worker processes and the Ray runner's ``ShardWorker`` actors).

    pyarrow imports pandas, where it is installed, the first time it builds an array, to ask
    whether it was given a pandas object (0.3-0.7 s of CPU here, in the middle of the crawl).
    A worker never gives it one, so its check runs here once with pandas hidden and records
    "no pandas"; pyarrow's own pandas conversions would still import it if called. Then the
    imports' objects are frozen out of the garbage collector's full scans (0.2 s per worker
    and job here), and its young generation is collected less often (``WORKER_GC_YOUNG``)."""
    import pyarrow as pa

    hide = _HidePandas()
    sys.meta_path.insert(0, hide)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(hide)
    gc.freeze()
    gc.set_threshold(WORKER_GC_YOUNG, *gc.get_threshold()[1:])


def _search_error(exc: EngineError, engine: str, private: bool) -> str:
    """The text a failed search reports: its error, or where private addresses are allowed
    only the engine and the HTTP status. The report reaches the job's stats, which an API user
    reads, and an engine's error may quote its server (an error body, a redirect's target, a
    field of the answer, a banner), which could then be an internal service's. The whole error
    goes to the worker's debug log. The rate limiter's own refusals quote no server."""
    if not private or isinstance(exc, (CircuitOpen, QuotaExceeded)):
        return _short(exc)
    log.debug("search error (not reported: private addresses are allowed): %s", exc)
    status = f" (HTTP {exc.status})" if exc.status else ""
    return (f"{engine}: the search failed{status}; what it said is not shown, as private "
            "addresses are allowed (its server may be an internal service)")


def _duplicate_detail(decision: DedupDecision) -> str:
    return (f"same bytes as {decision.kept_id}" if decision.reason == Reason.EXACT_DUPLICATE
            else f"near-duplicate signatures ({decision.distance} bits) of {decision.kept_id}")


def _held_detail(record: Record, decision: DedupDecision) -> str:
    """The detail of a held image rejected as the duplicate of the image it waited for: the
    slow level's words where its embedding store held it, else the index's."""
    return record.held_detail or _duplicate_detail(decision)


def _short(exc: Exception, limit: int = 300) -> str:
    text = printable(str(exc))
    return text if len(text) <= limit else text[:limit] + "..."


def _buffer_schema() -> pa.Schema:
    from builder.records import ROW_SCHEMA

    return pa.schema(list(ROW_SCHEMA) + [
        pa.field("_uid", pa.string()), pa.field("_claim", pa.uint64()),
        pa.field("_sig_a", pa.list_(pa.uint64())), pa.field("_sig_b", pa.list_(pa.uint64()))])


_BUFFER_SCHEMA = _buffer_schema()
"""The accepted rows a worker buffers: the row schema plus what the journal needs."""


def _empty_rows() -> pa.Table:
    return _BUFFER_SCHEMA.empty_table()


def _decision_rows(records: list[Record], claim: Callable[[Record], int],
                   url_key: Callable[[Record], int]) -> pa.Table:
    """The journal's rows of a unit's decisions (``journal.UNIT_SCHEMA``): ``claim`` and
    ``url_key`` give a record's claim and URL hash (``UnitRun.claim`` and ``url_hash``). An
    accepted record's rights ledger is in its shard's row; the journal keeps only a reject's."""
    from builder.journal import UNIT_SCHEMA

    rows = []
    for r in records:
        row = reject_row(r, rejected=r.rejected)
        row.update(accepted=not r.rejected, image_id=r.id if r.sha256 else "",
                   url_hash=url_key(r), claim=claim(r))
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=UNIT_SCHEMA)


class LocalServices(WorkerServices):
    """The services in this process: the in-process runner's index, ledger, governors and
    slow validator."""

    def __init__(self, spec: DatasetSpec, dedup: DedupClient, ledger: Any,
                 slow: Optional[Any] = None):
        self.spec = spec
        self.dedup = dedup
        self.ledger = ledger
        self._slow = slow
        self.governors: dict[int, EngineGovernor] = {}

    async def grant(self, uid: str, wants: dict[str, int], floor: dict[str, int]
                    ) -> dict[str, int]:
        return self.ledger.grant(uid, wants, floor)

    async def rooms(self) -> dict[str, int]:
        return self.ledger.rooms()

    async def commit(self, uid: str, accepted: dict[str, int]) -> None:
        self.ledger.commit(uid, accepted)

    async def next_shard(self, split: str) -> int:
        return self.ledger.next_shard(split)

    def _governor(self, unit: WorkUnit) -> EngineGovernor:
        gov = self.governors.get(unit.source)
        if gov is None:
            src = self.spec.sources[unit.source]
            gov = EngineGovernor(unit.engine, limits_for(unit.engine, src.options),
                                 day_file=DayFile(budget_key(unit.engine, src)))
            self.governors[unit.source] = gov
        return gov

    def acquire(self, unit: WorkUnit) -> float:
        """Seconds to wait before ``unit``'s engine request (its source's governor)."""
        return self._governor(unit).acquire()

    def record(self, unit: WorkUnit, ok: bool, status: int,
               retry_after: Optional[float] = None, requests: int = 1) -> None:
        """How ``unit``'s engine search went, for its source's governor, and the requests it
        took (``SearchPage.requests``): those past the one ``acquire`` counted are charged."""
        governor = self._governor(unit)
        governor.charge(requests - 1)
        governor.record(ok, status, retry_after)

    async def search(self, unit: WorkUnit, engine: SearchEngine) -> SearchPage:
        await asyncio.sleep(self.acquire(unit))
        try:
            page = await asyncio.to_thread(engine.search, unit.query, label=unit.label,
                                           page=unit.page, per_page=unit.per_page)
        except EngineError as exc:
            self.record(unit, False, exc.status, exc.retry_after, exc.requests)
            raise
        self.record(unit, True, 200, None, page.requests)
        return page

    async def dedup_call(self, partition: int, method: str, payload: dict[str, Any]) -> Any:
        """One index partition call, for a worker in another process."""
        return await self.dedup.call(partition, method, payload)

    @property
    def slow(self) -> bool:
        return self._slow is not None

    async def score(self, records: list[Record], pool: ThreadPoolExecutor) -> list[Record]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, self._slow, records)

    async def settle_scores(self, records: list[Record]) -> None:
        assert self._slow is not None
        self._slow.settle(records)

    def engine_stats(self) -> dict[str, Any]:
        return {g.engine: g.snapshot() for g in self.governors.values()}


__all__ = ["JobPlan", "LedgerCalls", "LocalServices", "ShardAssembler", "UnitCancelled", "UnitRun",
           "WorkerRuntime", "WorkerServices"]
