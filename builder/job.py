"""The job loop, shared by the in-process pipeline and the Ray coordinator.

``JobRunner`` plans search requests per class, admits candidates, hands batches to a ``Backend``
(fetch -> validate -> dedup; in-process or on Ray actors), selects accepted images up to each
class's target, and feeds a ``Sink`` (the writers). It keeps asking the sources for more until every
class reaches its target of *accepted* images or its sources are exhausted.

Accounting: a candidate is a URL the job took up (admitted). Every admitted candidate ends in the
ledger exactly once, accepted or rejected with a reason, so ``accepted + rejected == candidates``.
Search hits never admitted (their class was already full) are counted as ``unused_hits``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

from builder.engines.base import SearchPage
from builder.errors import EngineError, SourceError
from builder.reasons import Reason
from builder.records import Candidate, Record
from builder.rights import RightsTally, honoured_signals
from builder.spec import DatasetSpec
from builder.urls import UrlDedup, check_url, normalise_url

if TYPE_CHECKING:
    from builder.journal import ResumeState

log = logging.getLogger("pixcrawler.job")

MAX_SEARCH_ERRORS = 50
"""stats.json keeps the last this many failed searches (``search_errors``)."""


@dataclass
class SearchTask:
    label: str
    source: int
    engine: str
    query: str
    page: int
    per_page: int


@dataclass
class _Cursor:
    source: int
    engine: str
    query: str
    max_pages: int
    per_page: int
    page: int = 0
    exhausted: bool = False
    busy: bool = False
    errors: int = 0


class SearchPlanner:
    """Which search request to make next for each class.

    Sources are used in the spec's order: a class draws from its first source (round-robin over
    its queries, page after page) until that source is exhausted or keeps failing, then falls
    back to the next one. Each fallback is recorded (``fallbacks``) for the job's stats.
    """

    def __init__(self, spec: DatasetSpec, engines: list[tuple[str, bool]],
                 extra_queries: Optional[dict[str, list[str]]] = None, max_errors: int = 3):
        self.max_errors = max_errors
        self._cursors: dict[str, list[deque[_Cursor]]] = {}
        self._current: dict[str, int] = {}
        self.fallbacks: list[dict[str, Any]] = []
        extra_queries = extra_queries or {}
        for label in spec.labels:
            per_source: list[deque[_Cursor]] = []
            queries = spec.queries_of(label) + extra_queries.get(label, [])
            for i, (name, query_based) in enumerate(engines):
                src = spec.sources[i] if i < len(spec.sources) else None
                # A list source pages through its whole list; max_pages bounds engines only.
                max_pages = src.max_pages if src and query_based else 1_000_000
                per_page = src.per_page if src else 100
                per_source.append(deque(_Cursor(i, name, q, max_pages, per_page)
                                        for q in (queries if query_based else [""])))
            self._cursors[label] = per_source
            self._current[label] = 0

    def _all(self, label: str):
        return (c for cursors in self._cursors[label] for c in cursors)

    def exhausted(self, label: str) -> bool:
        return all(c.exhausted for c in self._all(label))

    def idle(self, label: str) -> bool:
        """No search for this class is in flight."""
        return not any(c.busy for c in self._all(label))

    def _advance(self, label: str) -> Optional[deque[_Cursor]]:
        """The cursors of the class's current source, moving on past exhausted sources."""
        sources = self._cursors[label]
        i = self._current[label]
        while i < len(sources) and all(c.exhausted for c in sources[i]):
            nxt = i + 1
            while nxt < len(sources) and not sources[nxt]:
                nxt += 1
            if nxt < len(sources) and sources[i]:
                failed = any(c.errors >= self.max_errors for c in sources[i])
                self.fallbacks.append({"label": label, "from": sources[i][0].engine,
                                       "to": sources[nxt][0].engine,
                                       "reason": "failing" if failed else "exhausted"})
            i = nxt
        self._current[label] = i
        return sources[i] if i < len(sources) else None

    def next_task(self, label: str) -> Optional[SearchTask]:
        cursors = self._advance(label)
        if cursors is None:
            return None
        for _ in range(len(cursors)):
            c = cursors[0]
            cursors.rotate(-1)
            if not c.exhausted and not c.busy:
                c.busy = True
                return SearchTask(label, c.source, c.engine, c.query, c.page, c.per_page)
        return None

    def _find(self, task: SearchTask) -> _Cursor:
        for c in self._cursors[task.label][task.source]:
            if c.query == task.query:
                return c
        raise KeyError(task)

    def done(self, task: SearchTask, page: SearchPage) -> None:
        c = self._find(task)
        c.busy = False
        c.errors = 0
        c.page += 1
        if not page.has_more or not page.hits or c.page >= c.max_pages:
            c.exhausted = True

    def failed(self, task: SearchTask, final: bool = False) -> None:
        c = self._find(task)
        c.busy = False
        c.errors += 1
        if final:
            c.errors = max(c.errors, self.max_errors)
        if c.errors >= self.max_errors:
            c.exhausted = True


@dataclass
class ClassCounts:
    target: int
    candidates: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)
    unused_hits: int = 0

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


class JobLedger:
    """Per-class accounting, and the over-target selection."""

    def __init__(self, spec: DatasetSpec):
        self.classes = {label: ClassCounts(spec.target_of(label)) for label in spec.labels}
        self.rights = RightsTally(honoured_signals(spec.download))
        self.by_stage: Counter = Counter()
        self.bytes_downloaded = 0
        self.started = time.time()

    def needed(self, label: str) -> int:
        c = self.classes[label]
        return max(0, c.target - c.accepted)

    def admit(self, label: str, n: int = 1) -> None:
        self.classes[label].candidates += n

    def reject(self, record: Record) -> None:
        self.classes[record.label].rejected[record.reason] += 1
        self.by_stage[record.stage] += 1

    def settle(self, records: list[Record]) -> list[Record]:
        """Count a decided batch; rejects valid images past their class's target.

        Returns the records accepted by this call, in order.
        """
        accepted = []
        for record in records:
            self.rights.add(record.rights)
            if not record.rejected:
                c = self.classes[record.label]
                if c.accepted >= c.target:
                    record.reject(Reason.OVER_TARGET, f"class already has {c.target}")
                else:
                    c.accepted += 1
                    accepted.append(record)
                    self.bytes_downloaded += len(record.data or b"") or record.extra.get(
                        "bytes", 0)
                    continue
            self.reject(record)
        return accepted

    @property
    def candidates(self) -> int:
        return sum(c.candidates for c in self.classes.values())

    @property
    def accepted(self) -> int:
        return sum(c.accepted for c in self.classes.values())

    @property
    def rejected(self) -> int:
        return sum(c.rejected_total for c in self.classes.values())

    def snapshot(self) -> dict[str, Any]:
        """Progress for displays and the HTTP API (cheap, JSON-able)."""
        elapsed = max(1e-6, time.time() - self.started)
        return {
            "elapsed_s": round(elapsed, 2),
            "candidates": self.candidates,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "images_per_s": round(self.accepted / elapsed, 2),
            "candidates_per_s": round(self.candidates / elapsed, 2),
            "rejected_by_reason": dict(sum((c.rejected for c in self.classes.values()),
                                           Counter())),
            "classes": {
                label: {"target": c.target, "accepted": c.accepted, "candidates": c.candidates,
                        "rejected": c.rejected_total, "rejected_by_reason": dict(c.rejected)}
                for label, c in self.classes.items()
            },
        }

    def stats(self, **extra: Any) -> dict[str, Any]:
        """The stats.json content."""
        by_reason: Counter = Counter()
        classes = {}
        for label, c in self.classes.items():
            by_reason.update(c.rejected)
            classes[label] = {
                "target": c.target, "candidates": c.candidates, "accepted": c.accepted,
                "rejected": c.rejected_total, "rejected_by_reason": dict(c.rejected),
                "shortfall": max(0, c.target - c.accepted), "unused_hits": c.unused_hits,
            }
        finished = time.time()
        out = {
            "candidates": self.candidates, "accepted": self.accepted, "rejected": self.rejected,
            "classes": classes, "rejected_by_reason": dict(by_reason),
            "rejected_by_stage": dict(self.by_stage),
            "shortfall": {k: v["shortfall"] for k, v in classes.items() if v["shortfall"]},
            "started": self.started, "finished": finished,
            "duration_s": round(finished - self.started, 3),
            "bytes_downloaded": self.bytes_downloaded,
            "rights": self.rights.summary(),
        }
        out.update(extra)
        return out


class Backend(Protocol):
    """Where the work runs: in-process, or on Ray actors."""

    async def search(self, task: SearchTask) -> SearchPage: ...

    async def process(self, records: list[Record]) -> list[Record]:
        """fetch -> validate -> dedup; every record comes back decided or still valid."""
        ...

    async def forget(self, image_ids: list[str]) -> None:
        """Drop images from the dedup index (they were not accepted after all)."""
        ...


class Sink(Protocol):
    """Where accepted records go (the writers)."""

    async def add(self, records: list[Record]) -> None: ...

    def add_rejected(self, records: list[Record]) -> None: ...


ProgressFn = Callable[[dict[str, Any]], None]


class JobCancelled(Exception):
    """Raised inside the runner when a cancel was requested."""


class JobRunner:
    """Drives one job through a backend into a sink."""

    def __init__(self, spec: DatasetSpec, backend: Backend, sink: Sink,
                 engines: list[tuple[str, bool]], *, batch_size: int = 64,
                 max_in_flight: int = 4, search_concurrency: int = 4,
                 extra_queries: Optional[dict[str, list[str]]] = None,
                 progress: Optional[ProgressFn] = None, progress_every_s: float = 0.5,
                 resume: Optional["ResumeState"] = None,
                 seed_candidates: Optional[list[Candidate]] = None):
        self.spec = spec
        self.backend = backend
        self.sink = sink
        self.planner = SearchPlanner(spec, engines, extra_queries)
        self.ledger = JobLedger(spec)
        self.urls = UrlDedup()
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.search_concurrency = search_concurrency
        self.progress = progress
        self.progress_every_s = progress_every_s
        self.search_errors: list[dict[str, Any]] = []
        self.engine_requests: Counter = Counter()
        self._buffer: dict[str, deque[Candidate]] = {label: deque() for label in spec.labels}
        self._in_flight: dict[str, int] = Counter()
        self._cancel = asyncio.Event()
        self._last_progress = 0.0
        self.cancelled = False
        self._decided: Counter = Counter()
        if resume is not None:
            self._seed(resume)
        for cand in seed_candidates or []:
            self._buffer[cand.label].append(cand)

    def _seed(self, resume: "ResumeState") -> None:
        """Start from a journal: decided candidates count as before and are not fetched again."""
        for url, key in resume.decided_urls():
            self._decided[key] += 1
            norm = normalise_url(url)
            if norm is not None:
                self.urls.first_seen(norm, key)
        for label, c in resume.counts().items():
            cls = self.ledger.classes.get(label)
            if cls is None:
                raise KeyError(f"the journal has images of class {label!r}, not in the spec")
            cls.accepted += c["accepted"]
            cls.rejected.update(c["rejected"])
            cls.candidates += c["accepted"] + sum(c["rejected"].values())
        for r in resume.rejects:
            self.ledger.by_stage[r["stage"]] += 1

    def cancel(self) -> None:
        """Ask the job to stop: in-flight candidates end as ``cancelled``."""
        self._cancel.set()

    def _want(self, label: str) -> int:
        """How many more candidates to line up for a class."""
        need = self.ledger.needed(label)
        if need <= 0:
            return 0
        goal = math.ceil(need * self.spec.search.candidates_factor)
        return goal - self._in_flight[label] - len(self._buffer[label])

    async def _search(self, task: SearchTask) -> None:
        self.engine_requests[task.engine] += 1
        try:
            page = await self.backend.search(task)
        except SourceError as exc:  # EngineUnavailable, or a source that cannot be read
            self.planner.failed(task, final=True)
            self._search_error(task, exc)
            return
        except EngineError as exc:
            self.planner.failed(task, final=not exc.retryable)
            self._search_error(task, exc)
            if exc.retryable:
                await asyncio.sleep(min(5.0, exc.retry_after or 0.5))
            return
        self.planner.done(task, page)
        buf = self._buffer[task.label]
        for hit in page.hits:
            buf.append(hit.to_candidate(task.label, task.query, task.engine))

    def _search_error(self, task: SearchTask, exc: Exception) -> None:
        log.warning("search %s %r page %d for %s failed: %s", task.engine, task.query, task.page,
                    task.label, exc)
        self.search_errors.append({"engine": task.engine, "query": task.query,
                                   "page": task.page, "label": task.label, "error": str(exc)})

    def _admit(self, label: str, n: int) -> list[Record]:
        """Take up to ``n`` candidates of a class into the pipeline (URL checks happen here)."""
        batch = []
        buf = self._buffer[label]
        while buf and len(batch) < n:
            cand = buf.popleft()
            if self._decided[cand.key] > 0:
                self._decided[cand.key] -= 1  # decided before the resume: not a new candidate
                continue
            self.ledger.admit(label)
            record = Record(cand)
            norm, reason, detail = check_url(cand.url)
            if reason is None and norm is not None:
                prev = self.urls.first_seen(norm, cand.key)
                if prev is not None:
                    reason, detail = Reason.DUPLICATE_URL, f"same URL as candidate {prev}"
            if reason is not None:
                record.reject(reason, detail)
                self.ledger.reject(record)
                self.sink.add_rejected([record])
                continue
            batch.append(record)
        return batch

    def _room(self, label: str) -> int:
        """How many more candidates of a class may be in flight: its need over its yield.

        The yield (share of decided candidates accepted, over_target aside) starts from a prior
        of 0.7 and follows what the class actually gets, so a class with many bad URLs gets
        more in flight and a clean one does not overshoot its target.
        """
        need = self.ledger.needed(label)
        if need <= 0:
            return 0
        c = self.ledger.classes[label]
        decided = c.accepted + c.rejected_total - c.rejected[Reason.OVER_TARGET.value]
        yield_ = max(0.02, (c.accepted + 0.7 * 5) / (decided + 5))
        return math.ceil(need / yield_) - self._in_flight[label]

    def _next_batch(self) -> list[Record]:
        """A batch of admitted candidates, shared across the classes that have room."""
        rooms = {lb: self._room(lb) for lb in self.spec.labels if self._buffer[lb]}
        rooms = {lb: r for lb, r in rooms.items() if r > 0}
        if not rooms:
            return []
        share = max(1, self.batch_size // len(rooms))
        batch: list[Record] = []
        for label, room in rooms.items():
            admitted = self._admit(label, min(share, room))
            self._in_flight[label] += len(admitted)
            batch.extend(admitted)
        return batch

    async def _process(self, batch: list[Record]) -> list[Record]:
        return await self.backend.process(batch)

    def _maybe_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.progress and (force or now - self._last_progress >= self.progress_every_s):
            self._last_progress = now
            self.progress(self.ledger.snapshot())

    async def _settle(self, batch: list[Record], decided: list[Record]) -> None:
        for record in batch:
            self._in_flight[record.label] -= 1
        accepted = self.ledger.settle(decided)
        over = [r for r in decided if r.reason == Reason.OVER_TARGET.value]
        if over:
            await self.backend.forget([r.id for r in over if r.sha256])
        self.sink.add_rejected([r for r in decided if r.rejected])
        if accepted:
            await self.sink.add(accepted)

    async def run(self) -> dict[str, Any]:
        """Run to completion (or cancel); returns the stats dict."""
        searches: set[asyncio.Task] = set()
        batches: dict[asyncio.Task, list[Record]] = {}
        cancel_wait = asyncio.ensure_future(self._cancel.wait())
        try:
            while True:
                if self._cancel.is_set():
                    raise JobCancelled()
                for label in self.spec.labels:
                    while (len(searches) < self.search_concurrency and self._want(label) > 0
                           and not self.planner.exhausted(label)):
                        task = self.planner.next_task(label)
                        if task is None:
                            break
                        searches.add(asyncio.ensure_future(self._search(task)))
                while len(batches) < self.max_in_flight:
                    batch = self._next_batch()
                    if not batch:
                        break
                    batches[asyncio.ensure_future(self._process(batch))] = batch
                self._maybe_progress()
                if not searches and not batches:
                    break  # nothing could be started: every class is full or out of sources
                done, _ = await asyncio.wait(set(searches) | set(batches) | {cancel_wait},
                                             return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    if fut in searches:
                        searches.discard(fut)
                        fut.result()
                    elif fut in batches:
                        batch = batches.pop(fut)
                        await self._settle(batch, fut.result())
        except (JobCancelled, asyncio.CancelledError):
            self.cancelled = True
            for fut in list(searches) + list(batches):
                fut.cancel()
            for fut, batch in batches.items():
                for record in batch:
                    self._in_flight[record.label] -= 1
                    if not record.rejected:
                        record.reject(Reason.CANCELLED, "job cancelled")
                    self.ledger.reject(record)
                self.sink.add_rejected(batch)
            await asyncio.gather(*searches, *batches, return_exceptions=True)
        finally:
            cancel_wait.cancel()
        for label, buf in self._buffer.items():
            self.ledger.classes[label].unused_hits += len(buf)
        self._maybe_progress(force=True)
        return self.ledger.stats(
            partial=self.cancelled,
            search_errors=self.search_errors[-MAX_SEARCH_ERRORS:],
            engine_requests=dict(self.engine_requests),
            fallbacks=self.planner.fallbacks,
            urls_seen=len(self.urls),
        )
