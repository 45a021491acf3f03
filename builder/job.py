"""The driver's side of a job, shared by both runners: plan units, count, resend, stop.

``JobRunner`` keeps asking the sources for more through ``UnitPlanner`` until every class
reaches its target of *accepted* images or its sources are exhausted. It hands units to an
``Executor`` (workers in this process, or on Ray) and reads back counts only (``UnitReport``):
the driver holds per-class counters and the units in flight, never a candidate or an image, so
its memory and CPU per candidate stay flat however large the job.

Accounting: a candidate is a URL a unit took up. Every candidate ends accepted or rejected with
a reason, per class, so ``accepted + rejected == candidates``. Search hits of a class that was
already full when their unit started are counted as ``unused_hits``, not candidates.

Failures: a unit's counts stay provisional until its worker says it *committed* (its images are
in committed shards and its decisions are journaled). When a worker is lost, every unit it had
not committed is taken off the counts and resent; the workers, the dedup index and the quota
ledger key everything by unit and candidate, so a resent unit never doubles an image.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Union

from builder.errors import JobInterrupted
from builder.journal import ResumeState
from builder.listsource import SlicePlan
from builder.ratelimit import budget_key, jobs_own
from builder.reasons import Reason
from builder.rights import RightsTally, honoured_signals
from builder.spec import DatasetSpec
from builder.units import (INLINE, LIST, RETRY, SEARCH, WRITTEN, ClassTally, SearchOutcome,
                           UnitReport, WorkerEvents, WorkUnit, inline_uid, list_uid, retry_index,
                           retry_uid, search_uid)

log = logging.getLogger("pixcrawler.job")

MAX_SEARCH_ERRORS = 50
"""stats.json keeps the last this many failed searches (``search_errors``)."""
GIVE_UP_PROBES = 2
"""A class waiting for its last source's engine (its breaker open) gives up once this many of
the breaker's probes failed in a row, a cooldown apart: the engine is down. A 429 storm,
which the first probe usually outlasts, is waited out."""
PRIOR_YIELD = 0.7
"""The share of a class's candidates expected to be accepted before any is decided."""
LATE_CHECK_S = 2.0
"""How often the runner asks whether a late worker (``Executor.late``) has started."""
MAX_SENDS = 6
"""Times one unit is sent before the job stops (``JobRunner._again``)."""
REVIVE_S = 120.0
"""How long the runner waits for a lost worker to come back when none is left."""


class WorkerLost(Exception):
    """A worker died or became unreachable; its uncommitted units must be resent."""

    def __init__(self, worker: int, cause: str):
        super().__init__(f"worker {worker} lost: {cause}")
        self.worker = worker
        self.cause = cause


class IndexLost(Exception):
    """A dedup partition or the quota ledger restarted and lost what was in flight: every
    uncommitted unit must be resent."""


class Executor(Protocol):
    """Where units run: workers in this process, or on Ray."""

    workers: int
    late: set[int]
    """Workers that have not started: sent nothing until ``revive`` says they have. Those
    that had not when the job began, and lost ones the executor is starting again (it adds
    them before it raises their ``WorkerLost``)."""

    async def run(self, worker: int, unit: WorkUnit) -> tuple[UnitReport, WorkerEvents]:
        """Run a unit on a worker; raises ``WorkerLost`` or ``IndexLost``."""
        ...

    async def flush(self) -> list[Union[WorkerEvents, WorkerLost]]:
        """Every worker writes what it buffers and commits its units; per worker, its events,
        or ``WorkerLost`` where it could not."""
        ...

    async def revive(self, worker: int) -> bool:
        """Whether a lost worker is usable again (restarted)."""
        ...

    async def reset(self) -> None:
        """After ``IndexLost``: every worker drops what it has not written."""
        ...

    def cancel(self) -> None:
        """Ask every worker to stop: units in flight end ``cancelled``."""
        ...

    async def in_flight(self) -> dict[str, dict[str, int]]:
        """Per unit running now, per class, how many of its candidates have been fetched
        (downloaded or failed) so far: progress within a unit, before its report."""
        ...


# -- planning ---------------------------------------------------------------------------------


@dataclass
class _Cursor:
    """A class's query on one per-class source (an engine's pages, or its inline urls)."""

    source: int
    engine: str
    kind: str
    query: str
    max_pages: int
    per_page: int
    total: int = 0
    page: int = 0
    exhausted: bool = False
    busy: bool = False
    errors: int = 0
    not_before: float = 0.0


@dataclass
class _ListState:
    """A URL list source: slices issued in order; exhausted once all are reported."""

    source: int
    plan: SlicePlan
    next: int = 0
    in_flight: int = 0
    rows_in_flight: int = 0
    """The rows the slices in flight were cut for (slices grow along a list)."""

    @property
    def exhausted(self) -> bool:
        return self.next >= self.plan.count and self.in_flight == 0


class UnitPlanner:
    """Which unit to issue next.

    Sources are used in the spec's order (the classes' inline ``urls`` last): a class draws
    from its first source (round-robin over its queries, page after page) until that source is
    exhausted or keeps failing (``max_errors`` errors in a row of a query), then falls back
    to the next one; each fallback is recorded (``fallbacks``). A class's last source, once
    its engine has answered (with results, a block, a 429 or a 5xx), is let fail longer
    (``max_errors_alone``), and while its engine's breaker is open the class waits for the
    engine (``_wait_for_engine``) instead of ending short; an engine that never answered (a
    wrong address, a server that is down) is given up as fast as any other. A URL list
    serves every class at once, slice after slice. A resumed job skips the units its journal
    says are done, and learns from them where each source stands.
    """

    def __init__(self, spec: DatasetSpec, extra_queries: Optional[dict[str, list[str]]] = None,
                 *, list_plans: Optional[dict[int, SlicePlan]] = None, unit_size: int = 64,
                 resume: Optional[ResumeState] = None, retry_plan: Optional[SlicePlan] = None,
                 max_errors: int = 3, max_errors_alone: int = 10):
        self.spec = spec
        self.unit_size = unit_size
        self.max_errors = max_errors
        self.fallbacks: list[dict[str, Any]] = []
        self.max_errors_alone = max_errors_alone
        self._budgets = {i: budget_key(src.engine, src) for i, src in enumerate(spec.sources)}
        """Each source's engine budget (``budget_key``): sources of one engine and server
        share its limiter and breaker."""
        self._answered: set[str] = {
            self._budgets[u.source] for u, r in (resume.reports if resume else [])
            if u.kind == SEARCH and r.search is not None and not r.search.error}
        """Budgets whose engine has answered (results, or its state: a block, a 429, a 5xx),
        in this job or the run it resumes."""
        self._waiting: dict[tuple[str, int], int] = {}
        """(class, source) waiting for its engine (its breaker open): the breaker's failed
        probes when the wait began."""
        self._announced: set[tuple[str, int]] = set()
        """The waits logged and recorded (one entry each, not one a refusal)."""
        self._seq = 0
        self._done = set(resume.done) if resume is not None else set()
        """Units not to issue: the journal's (a copy: ``written_unit`` adds to it)."""
        self._done_search: dict[str, Any] = {
            u.uid: r.search for u, r in (resume.reports if resume else []) if u.kind == SEARCH}
        self._done_written = {u.uid for u, _ in (resume.reports if resume else [])
                              if u.kind == WRITTEN}
        """Pages finished from what they wrote (``WRITTEN``): no search outcome, and the
        pages after them are still there."""
        self.lists = {i: _ListState(i, p) for i, p in (list_plans or {}).items()}
        self.retry = _ListState(-1, retry_plan) if retry_plan is not None else None
        self._cursors: dict[str, list[Any]] = {}
        self._current: dict[str, int] = {}
        extra_queries = extra_queries or {}
        if self.retry is not None:
            for label in spec.labels:
                self._cursors[label] = []
                self._current[label] = 0
            return
        for label in spec.labels:
            per_source: list[Any] = []
            queries = spec.queries_of(label) + extra_queries.get(label, [])
            for i, src in enumerate(spec.sources):
                if src.engine == "urllist":
                    per_source.append(self.lists[i])
                else:
                    per_source.append(deque(_Cursor(i, src.engine, SEARCH, q, src.max_pages,
                                                    src.per_page) for q in queries))
            urls = spec.classes[label].urls
            if urls:
                per_source.append(deque([_Cursor(len(spec.sources), "inline", INLINE, "",
                                                 math.ceil(len(urls) / unit_size), unit_size,
                                                 total=len(urls))]))
            self._cursors[label] = per_source
            self._current[label] = 0

    def _issue(self, **fields: Any) -> Optional[WorkUnit]:
        unit = WorkUnit(seq=self._seq, **fields)
        self._seq += 1
        return unit

    @staticmethod
    def _source_done(source: Any) -> bool:
        if isinstance(source, _ListState):
            return source.exhausted
        return all(c.exhausted for c in source)

    def _advance(self, label: str) -> Optional[Any]:
        """The class's current source, moving on past exhausted ones."""
        sources = self._cursors[label]
        i = self._current[label]
        while i < len(sources) and self._source_done(sources[i]):
            nxt = i + 1
            if nxt < len(sources):
                src = sources[i]
                failed = not isinstance(src, _ListState) and any(
                    c.errors >= self.max_errors for c in src)
                self.fallbacks.append({"label": label, "from": _engine(sources[i], self.spec),
                                       "to": _engine(sources[nxt], self.spec),
                                       "reason": "failing" if failed else "exhausted"})
            i = nxt
        self._current[label] = i
        return sources[i] if i < len(sources) else None

    def exhausted(self, label: str) -> bool:
        if self.retry is not None:
            return self.retry.exhausted
        return self._advance(label) is None

    def waiting_on_list(self, label: str) -> Optional[_ListState]:
        src = self._advance(label) if self.retry is None else None
        return src if isinstance(src, _ListState) else None

    def next_class_unit(self, label: str, now: float) -> Optional[WorkUnit]:
        """The next search page or inline slice for ``label`` (None: none available now)."""
        src = self._advance(label)
        if src is None or isinstance(src, _ListState):
            return None
        for _ in range(len(src)):
            c = src[0]
            src.rotate(-1)
            while not c.exhausted and not c.busy and c.not_before <= now:
                if c.kind == INLINE:
                    start = c.page * c.per_page
                    uid = inline_uid(c.source, label, start)
                    if uid in self._done:
                        c.page += 1
                        c.exhausted = c.page * c.per_page >= c.total
                        continue
                    c.busy = True
                    return self._issue(uid=uid, kind=INLINE, source=c.source, engine="inline",
                                       label=label, start=start,
                                       stop=min(c.total, start + c.per_page))
                uid = search_uid(c.source, label, c.query, c.page)
                if uid in self._done:
                    outcome = self._done_search.get(uid)
                    c.page += 1
                    if c.page >= c.max_pages or uid not in self._done_written and (
                            outcome is None or not outcome.has_more or not outcome.hits):
                        c.exhausted = True
                    continue
                c.busy = True
                return self._issue(uid=uid, kind=SEARCH, source=c.source, engine=c.engine,
                                   label=label, query=c.query, page=c.page,
                                   per_page=c.per_page)
        return None

    def next_list_unit(self, state: _ListState) -> Optional[WorkUnit]:
        while state.next < state.plan.count:
            index = state.next
            state.next += 1
            uid = list_uid(state.source, index) if state is not self.retry else retry_uid(index)
            if uid in self._done:
                continue
            state.in_flight += 1
            state.rows_in_flight += self._rows(state, index)
            engine = "retry" if state is self.retry else "urllist"
            return self._issue(uid=uid, kind=RETRY if state is self.retry else LIST,
                               source=state.source, engine=engine, slice=index)
        return None

    def written_unit(self, uid: str) -> WorkUnit:
        """The unit that finishes ``uid``, a unit an interrupted run (or a lost worker) half
        wrote. The planner never issues ``uid`` itself from now on: a cursor that waits to
        retry it (its search failed) goes on past it, as past a page done.

        A retry slice is sent again as itself: its candidates are the published rejects
        (the journal's copy), there to be read, and every one must be decided again (the
        job's counts took them all back). Any other unit is ``WRITTEN``: its source may be
        gone, so it takes back only what its shards hold."""
        self._done.add(uid)
        self._done_written.add(uid)
        index = retry_index(uid)
        if index is not None and self.retry is not None:
            return self._issue(uid=uid, kind=RETRY, source=self.retry.source, engine="retry",
                               slice=index, attempt=1)
        return self._issue(uid=uid, kind=WRITTEN, source=-1, attempt=1)

    def _rows(self, state: _ListState, index: int) -> int:
        return state.plan.rows(index) or self.unit_size

    def _cursor(self, unit: WorkUnit) -> _Cursor:
        for src in self._cursors[unit.label]:
            if isinstance(src, _ListState):
                continue
            for c in src:
                if c.source == unit.source and (c.query == unit.query or c.kind == INLINE):
                    return c
        raise KeyError(unit.uid)

    def reported(self, unit: WorkUnit, report: UnitReport, now: float) -> Optional[dict]:
        """Learn from a unit's report; returns a search error to record, if any."""
        if unit.kind in (LIST, RETRY):
            state = self.retry if unit.kind == RETRY else self.lists[unit.source]
            assert state is not None
            state.in_flight -= 1
            state.rows_in_flight -= self._rows(state, unit.slice)
            return None
        c = self._cursor(unit)
        c.busy = False
        if unit.kind == INLINE:
            c.page += 1
            c.exhausted = c.page * c.per_page >= c.total
            return None
        outcome = report.search
        if outcome is None or not outcome.error or outcome.status and \
                not jobs_own(outcome.status):
            # (blocking, busy or failing, but there; a refusal's status is that of the
            # failure the breaker counted last; a 401 or 404 is a wrong key or address,
            # which waits for nothing)
            self._answered.add(self._budgets[c.source])
        if outcome is None or not outcome.error:
            c.errors = 0
            self._waiting.pop((unit.label, c.source), None)
            self._announced.discard((unit.label, c.source))
            c.page += 1
            if outcome is None or not outcome.has_more or not outcome.hits \
                    or c.page >= c.max_pages:
                c.exhausted = True
            return None
        alone = self._budgets[c.source] in self._answered and \
            not self._falls_back(unit.label, c)
        error = outcome.error
        if outcome.refused and alone:
            if not self._given_up(unit.label, c, outcome):
                return self._wait_for_engine(unit, c, outcome, now)
            error = (f"{error}; given up waiting for the engine: {GIVE_UP_PROBES} of its "
                     "probes failed in a row while the class waited")
        limit = self.max_errors_alone if alone else self.max_errors
        c.errors = max(c.errors + 1, limit if outcome.final or outcome.refused and alone else 0)
        if c.errors >= limit:
            c.exhausted = True
        elif outcome.retryable:
            c.not_before = now + min(5.0, outcome.retry_after or 0.5)
        log.warning("search %s %r page %d for %s failed: %s", unit.engine, unit.query,
                    unit.page, unit.label, error)
        return {"engine": unit.engine, "query": unit.query, "page": unit.page,
                "label": unit.label, "error": error}

    def _falls_back(self, label: str, c: _Cursor) -> bool:
        """Whether ``label`` has a source after ``c``'s that is not done."""
        sources = self._cursors[label]
        at = next(i for i, src in enumerate(sources)
                  if not isinstance(src, _ListState) and any(x is c for x in src))
        return not all(self._source_done(src) for src in sources[at + 1:])

    def _given_up(self, label: str, c: _Cursor, outcome: SearchOutcome) -> bool:
        """Whether ``label``'s wait for ``c``'s engine is over: ``GIVE_UP_PROBES`` of the
        breaker's probes failed since the class began waiting (counted from what the
        breaker had when it did: on Ray the breaker is every job's)."""
        key = (label, c.source)
        began = min(self._waiting.get(key, outcome.probes_failed), outcome.probes_failed)
        self._waiting[key] = began
        return outcome.probes_failed - began >= GIVE_UP_PROBES

    def _wait_for_engine(self, unit: WorkUnit, c: _Cursor, outcome: SearchOutcome,
                         now: float) -> Optional[dict]:
        """The engine's breaker refused ``unit`` (no request went out) and its class has no
        other source: the cursor asks again when the breaker says, and counts no error.
        The wait ends when the engine answers, or when its probes keep failing
        (``_given_up``). The first refusal of each class's wait is logged and recorded,
        not every one."""
        c.not_before = now + (outcome.retry_after if outcome.retry_after is not None else 1.0)
        key = (unit.label, c.source)
        if key in self._announced:
            return None
        self._announced.add(key)
        log.warning("search %s %r page %d for %s refused: %s; waiting for the engine (the "
                    "class has no other source)", unit.engine, unit.query, unit.page,
                    unit.label, outcome.error)
        return {"engine": unit.engine, "query": unit.query, "page": unit.page,
                "label": unit.label, "error": outcome.error}

    def next_wake(self, wanted: Callable[[str], bool]) -> Optional[float]:
        """When a cursor held back by a retryable error may run again, among the classes
        ``wanted`` (a full class never waits on its cursors)."""
        times = [c.not_before for label, srcs in self._cursors.items() if wanted(label)
                 for src in srcs if not isinstance(src, _ListState) for c in src
                 if not c.exhausted and not c.busy and c.not_before > 0]
        return min(times) if times else None


def _engine(source: Any, spec: DatasetSpec) -> str:
    if isinstance(source, _ListState):
        return spec.sources[source.source].engine
    return source[0].engine if source else ""


# -- counting ---------------------------------------------------------------------------------


class JobCounts:
    """The job's figures: per-class tallies from unit reports (added, or taken back)."""

    def __init__(self, spec: DatasetSpec):
        self.targets = {label: spec.target_of(label) for label in spec.labels}
        self.classes = {label: ClassTally() for label in spec.labels}
        self.by_stage: Counter = Counter()
        self.bytes_downloaded = 0
        self.skipped: Counter = Counter()
        self.relabelled: Counter = Counter()
        self.decided_before = 0
        self.rights = RightsTally(honoured_signals(spec.download))
        self.started = time.time()

    def add(self, report: UnitReport, sign: int = 1) -> None:
        for label, tally in report.classes.items():
            self.classes[label].add(tally, sign)
        for stage, n in report.by_stage.items():
            self.by_stage[stage] += sign * n
        self.bytes_downloaded += sign * report.bytes
        for label, n in report.skipped.items():
            self.skipped[label] += sign * n
        for pair, n in report.relabelled.items():
            self.relabelled[pair] += sign * n
        self.decided_before += sign * report.decided_before
        if report.rights is not None:
            self.rights.merge(report.rights, sign)

    def need(self, label: str) -> int:
        return max(0, self.targets[label] - self.classes[label].accepted)

    def yield_of(self, label: str) -> float:
        """Share of decided candidates accepted (over_target aside), from a prior of 0.7."""
        c = self.classes[label]
        decided = c.accepted + c.rejected_total - c.rejected[Reason.OVER_TARGET.value]
        return max(0.02, (c.accepted + PRIOR_YIELD * 5) / (decided + 5))

    def overall_yield(self) -> float:
        accepted = self.accepted
        decided = accepted + self.rejected - self.by_reason()[Reason.OVER_TARGET.value]
        return max(0.02, (accepted + PRIOR_YIELD * 5) / (decided + 5))

    @property
    def candidates(self) -> int:
        return sum(c.candidates for c in self.classes.values())

    @property
    def accepted(self) -> int:
        return sum(c.accepted for c in self.classes.values())

    @property
    def rejected(self) -> int:
        return sum(c.rejected_total for c in self.classes.values())

    def by_reason(self) -> Counter:
        out: Counter = Counter()
        for c in self.classes.values():
            out.update(c.rejected)
        return +out

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
            "rejected_by_reason": dict(self.by_reason()),
            "classes": {
                label: {"target": self.targets[label], "accepted": c.accepted,
                        "candidates": c.candidates, "rejected": c.rejected_total,
                        "rejected_by_reason": dict(+c.rejected)}
                for label, c in self.classes.items()
            },
        }

    def stats(self, **extra: Any) -> dict[str, Any]:
        """The stats.json content."""
        classes = {}
        for label, c in self.classes.items():
            classes[label] = {
                "target": self.targets[label], "candidates": c.candidates,
                "accepted": c.accepted, "rejected": c.rejected_total,
                "rejected_by_reason": dict(+c.rejected),
                "shortfall": max(0, self.targets[label] - c.accepted), "unused_hits": c.unused,
            }
        finished = time.time()
        out = {
            "candidates": self.candidates, "accepted": self.accepted, "rejected": self.rejected,
            "classes": classes, "rejected_by_reason": dict(self.by_reason()),
            "rejected_by_stage": dict(+self.by_stage),
            "shortfall": {k: v["shortfall"] for k, v in classes.items() if v["shortfall"]},
            "started": self.started, "finished": finished,
            "duration_s": round(finished - self.started, 3),
            "bytes_downloaded": self.bytes_downloaded,
            "rights": self.rights.summary(),
        }
        if +self.skipped:
            out["skipped_rows"] = {"label_not_in_spec": dict(+self.skipped)}
        if +self.relabelled:
            out["relabelled"] = [{"from": a, "to": b, "images": n}
                                 for (a, b), n in sorted((+self.relabelled).items())]
        if self.decided_before:
            out["decided_before"] = self.decided_before
        out.update(extra)
        return out


ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class _Flight:
    unit: WorkUnit
    worker: int
    report: Optional[UnitReport] = None
    incarnation: str = ""
    epoch: int = 0
    """The reset count when the unit was sent: a result from before a reset is stale."""
    orphaned: bool = False
    """Its worker was lost while it ran: a result it still brings is not trusted (the worker,
    should it come back, drops what it held), and the unit is sent again."""
    sent: float = field(default_factory=time.monotonic)
    committed_early: bool = False
    """Its worker said it committed before its own result was taken (both came back in one
    wait, the other result first): it is done once that result is."""


@dataclass
class RunOutcome:
    stats: dict[str, Any]
    cancelled: bool
    fetch: dict[str, Any] = field(default_factory=dict)


class JobRunner:
    """Drives one job's units through an executor (see the module docstring)."""

    def __init__(self, spec: DatasetSpec, executor: Executor, planner: UnitPlanner,
                 counts: JobCounts, *, units_per_worker: int = 2,
                 progress: Optional[ProgressFn] = None, progress_every_s: float = 0.5,
                 partial_units: Optional[dict[str, dict[str, int]]] = None):
        self.spec = spec
        self.executor = executor
        self.planner = planner
        self.counts = counts
        self.units_per_worker = units_per_worker
        self.progress = progress
        self.progress_every_s = progress_every_s
        self.search_errors: deque[dict[str, Any]] = deque(maxlen=MAX_SEARCH_ERRORS)
        self.engine_requests: Counter = Counter()
        self.fetch: Counter = Counter()
        self.cancelled = False
        self.cancel_cause = ""
        self.resent = 0
        self.isolated = 0
        self._cancel = asyncio.Event()
        self._last_progress = 0.0
        self._flights: dict[str, _Flight] = {}
        self._load = [0] * executor.workers
        self._late = set(executor.late)
        self._down: set[int] = set(self._late)
        self._late_check = 0.0
        self._incarnations: dict[int, str] = {}
        self._epoch = 0
        self._resend: deque[WorkUnit] = deque()
        self._planned: set[str] = set()
        """Units resent after they had reported: their next report must not move the planner
        (a search cursor would skip a page, a list's in-flight count would drift)."""
        self._partial = partial_units if partial_units is not None else {}
        """Units half written: by the interrupted run (per class, the images their shards
        hold, for which the ledger holds room), or in this run by an attempt taken back after
        it reported (``_resend_uncommitted``: the images it accepted). The caller's dict:
        publishing refuses while one of them has no unit file."""
        self._seqs: dict[str, int] = {}
        """Each unit's order as this run sent it (a unit finished last keeps it)."""
        self._unfinished = set(self._partial)
        """Those not decided in this run (yet): their held room is not needed from others."""
        self._written_sent: set[str] = set()
        """Those sent as ``WRITTEN`` units (each once: ``_finish_written``)."""
        self._class_in_flight: Counter = Counter()

    def cancel(self, cause: str = "request") -> None:
        """Ask the job to stop: in-flight candidates end as ``cancelled``. ``cause`` (the
        first one counts) is recorded as ``cancelled_by`` in the stats: ``request`` (the API,
        the progress actor), or the signal's name."""
        self.cancel_cause = self.cancel_cause or cause
        self._cancel.set()

    # -- issuing ------------------------------------------------------------------------------

    def _capacity(self) -> int:
        live = self.executor.workers - len(self._down)
        return max(0, live * self.units_per_worker - sum(self._load))

    def _need(self, label: str) -> int:
        """Images ``label`` still needs from new work: the room the ledger holds for the
        half-written units not decided yet (``_partial``) is theirs (they finish last, from
        what they wrote, if nothing reaches them first)."""
        held = sum(self._partial[uid].get(label, 0) for uid in self._unfinished)
        return max(0, self.counts.need(label) - held)

    def _expected(self, label: str) -> float:
        """Accepted images expected from this class's units in flight (not yet reported)."""
        return self._class_in_flight[label] * self.counts.yield_of(label)

    def _next_units(self) -> list[WorkUnit]:
        out: list[WorkUnit] = []
        room = self._capacity()
        while self._resend and room > 0:
            out.append(self._resend.popleft())
            room -= 1
        now = time.monotonic()
        progressed = True
        while room > 0 and progressed:
            progressed = False
            lists_wanted: dict[int, Any] = {}
            list_need: Counter = Counter()
            for label in self.spec.labels:
                if room <= 0:
                    break
                need = self._need(label)
                state = self.planner.waiting_on_list(label) if need > 0 else None
                if state is not None:
                    lists_wanted[id(state)] = state
                    list_need[id(state)] += need
                    continue
                if need <= 0 or self._expected(label) >= need:
                    continue
                unit = self.planner.next_class_unit(label, now)
                if unit is not None:
                    out.append(unit)
                    room -= 1
                    progressed = True
            for key, state in lists_wanted.items():
                expected = state.rows_in_flight * self.counts.overall_yield()
                if room <= 0 or expected >= list_need[key]:
                    continue
                unit = self.planner.next_list_unit(state)
                if unit is not None:
                    out.append(unit)
                    room -= 1
                    progressed = True
            if self.planner.retry is not None and room > 0 and \
                    any(self._need(lb) > 0 for lb in self.spec.labels):
                unit = self.planner.next_list_unit(self.planner.retry)
                if unit is not None:
                    out.append(unit)
                    room -= 1
                    progressed = True
        return out

    def _wanted(self, label: str) -> bool:
        return self._need(label) > 0

    def _pick_worker(self) -> int:
        live = [w for w in range(self.executor.workers) if w not in self._down]
        return min(live, key=self._load.__getitem__)

    def _expected_hits(self, unit: WorkUnit) -> int:
        return unit.per_page if unit.kind == SEARCH else max(0, unit.stop - unit.start)

    def _start(self, unit: WorkUnit, tasks: dict[asyncio.Task, _Flight]) -> None:
        worker = self._pick_worker()
        if unit.uid in self._partial and unit.attempt == 0:
            unit = dataclasses.replace(unit, attempt=1)
        flight = _Flight(unit, worker, epoch=self._epoch)
        self._flights[unit.uid] = flight
        self._seqs[unit.uid] = unit.seq
        self._load[worker] += 1
        if unit.kind in (SEARCH, INLINE):
            self._class_in_flight[unit.label] += self._expected_hits(unit)
        if unit.kind == SEARCH:
            self.engine_requests[unit.engine] += 1
        tasks[asyncio.ensure_future(self.executor.run(worker, unit))] = flight

    # -- results ------------------------------------------------------------------------------

    def _done_running(self, flight: _Flight) -> None:
        self._load[flight.worker] -= 1
        unit = flight.unit
        if unit.kind in (SEARCH, INLINE):
            self._class_in_flight[unit.label] -= self._expected_hits(unit)

    def _take_events(self, worker: int, events: WorkerEvents, epoch: Optional[int] = None
                     ) -> None:
        """``events`` of ``worker``, sent with a result of a unit sent at ``epoch`` (default:
        now). Its commits apply to units sent by then: a unit resent after a reset is a new
        attempt, which an earlier attempt's commit does not commit."""
        epoch = self._epoch if epoch is None else epoch
        known = self._incarnations.get(worker)
        if known is not None and events.incarnation != known:
            log.warning("worker %d restarted; resending the units it had not committed", worker)
            self._resend_uncommitted(worker, keep=events.incarnation)
        self._incarnations[worker] = events.incarnation
        for uid in events.committed:
            flight = self._flights.get(uid)
            if flight is None or flight.epoch > epoch:
                continue
            if flight.report is not None:
                del self._flights[uid]
            elif flight.worker == worker:
                flight.committed_early = True
        self.fetch.update(events.fetch)

    def _again(self, unit: WorkUnit, isolate: bool = False) -> None:
        """Queue ``unit`` to be sent again (``isolate``: with its images validated in a
        process of their own), unless it has been sent ``MAX_SENDS`` times: a unit whose
        worker is lost every time (a service the worker needs that keeps dying, an image that
        kills it after validation) would go round for ever."""
        if unit.attempt + 1 >= MAX_SENDS:
            raise JobInterrupted(
                f"unit {unit.uid} was sent {unit.attempt + 1} times and failed each time (its "
                "worker was lost, or a service it needs kept failing: the log above says "
                "which); what was committed is journaled: continue the job with --resume once "
                "the cause is fixed")
        if unit.uid in self._partial:  # its held room is its own again until it reports
            self._unfinished.add(unit.uid)
        if isolate and not unit.isolate:
            log.info("unit %s was running when its worker was lost: it runs again with its "
                     "images validated in a process of their own", unit.uid)
            self.isolated += 1
        self._resend.append(dataclasses.replace(unit, attempt=unit.attempt + 1,
                                                isolate=unit.isolate or isolate))

    def _lose(self, worker: int) -> None:
        """The worker is unreachable: resend every unit it had not committed. If the
        executor starts a replacement (it is ``late`` again), it is taken in once started."""
        self._down.add(worker)
        if worker in self.executor.late:
            self._late.add(worker)
        self._incarnations.pop(worker, None)
        for flight in self._flights.values():
            if flight.worker == worker and flight.report is None:
                flight.orphaned = True
        self._resend_uncommitted(worker)

    def _resend_uncommitted(self, worker: int, keep: Optional[str] = None) -> None:
        """Take back and resend the reported, uncommitted units of ``worker`` (but those its
        incarnation ``keep`` reported: they are in its buffers)."""
        for uid, flight in list(self._flights.items()):
            if flight.worker != worker or flight.report is None or \
                    (keep is not None and flight.incarnation == keep):
                continue
            self.counts.add(flight.report, -1)
            del self._flights[uid]
            # Its shards may hold some of what it accepted, and the ledger holds their room:
            # the resend takes them back, so they are not sought from other units meanwhile.
            self._partial[uid] = {label: tally.accepted for label, tally
                                  in flight.report.classes.items() if tally.accepted}
            self._again(flight.unit)
            self._planned.add(uid)
            self.resent += 1

    async def _reset_all(self) -> None:
        """The index or ledger lost its in-flight state: resend everything uncommitted. Units
        still running are stale: the workers drop their rows, and they are resent when their
        results come back."""
        self._epoch += 1
        await self.executor.reset()
        for w in range(self.executor.workers):
            if w not in self._down:
                self._lose(w)
                self._down.discard(w)

    async def _maybe_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.progress and (force or now - self._last_progress >= self.progress_every_s):
            self._last_progress = now
            snap = self.counts.snapshot()
            snap["units_in_flight"] = sum(self._load)
            fetched = await self._fetched_in_flight() if not force else Counter()
            snap["in_flight"] = sum(fetched.values())
            for label, c in snap["classes"].items():
                c["in_flight"] = fetched.get(label, 0)
            self.progress(snap)

    async def _fetched_in_flight(self) -> Counter:
        """Per class, candidates fetched in units still running (not in the counts yet). A
        unit whose report has come back is counted there, not here.

        Only units that have run for a progress interval are asked about: one that ends
        sooner shows in the counts by the next snapshot anyway, and asking costs a call to
        every worker (on Ray, about as much driver CPU as a unit's own call)."""
        old = time.monotonic() - self.progress_every_s
        running = {uid for uid, f in self._flights.items() if f.report is None and f.sent <= old}
        if not running:
            return Counter()
        total: Counter = Counter()
        for uid, per_class in (await self.executor.in_flight()).items():
            if uid in running:
                total.update(per_class)
        return total

    async def run(self) -> RunOutcome:
        """Run until every class is full or out of sources (or cancelled)."""
        tasks: dict[asyncio.Task, _Flight] = {}
        cancel_wait = asyncio.ensure_future(self._cancel.wait())
        try:
            while True:
                if self._cancel.is_set() and not self.cancelled:
                    self.cancelled = True
                    self.executor.cancel()
                if not self.cancelled:
                    await self._join_late()
                    for unit in self._next_units():
                        self._start(unit, tasks)
                await self._maybe_progress()
                if not tasks:
                    if self._resend and not self.cancelled:
                        await self._revive()
                        continue
                    wake = self.planner.next_wake(self._wanted)
                    if wake is None and not self.cancelled and self._finish_written():
                        continue
                    if wake is None or self.cancelled:
                        break
                    await asyncio.wait({cancel_wait},
                                       timeout=max(0.01, wake - time.monotonic()))
                    continue
                wake = self.planner.next_wake(self._wanted)
                if self.progress is not None:
                    # Progress goes out while units run, not only when one ends.
                    tick = self._last_progress + self.progress_every_s
                    wake = tick if wake is None else min(wake, tick)
                if self._late:  # a late or lost worker may have started meanwhile
                    wake = self._late_check if wake is None else min(wake, self._late_check)
                done, _ = await asyncio.wait(
                    set(tasks) | {cancel_wait}, return_when=asyncio.FIRST_COMPLETED,
                    timeout=None if wake is None else max(0.01, wake - time.monotonic()))
                for fut in done:
                    if fut is cancel_wait:
                        continue
                    flight = tasks.pop(fut)
                    self._done_running(flight)
                    await self._result(fut, flight)
        finally:
            cancel_wait.cancel()
            for task in tasks:  # the run stops early (an error): its units go with it
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._flush()
        await self._maybe_progress(force=True)
        return RunOutcome(self.stats(), self.cancelled, dict(self.fetch))

    def _finish_written(self) -> bool:
        """Queue the half-written units that this run never decided (of the interrupted run,
        or resent after a lost worker and not decided again), once there is nothing else to
        do (``UnitPlanner.written_unit``): each takes back the images its shards hold, which
        no count would hold otherwise, so the job can publish. The planner learns nothing
        from them. True if any was queued."""
        queued = {unit.uid for unit in self._resend}
        left = sorted(self._unfinished - self._written_sent - set(self._flights) - queued)
        for uid in left:
            self._planned.add(uid)
            self._written_sent.add(uid)
            unit = self.planner.written_unit(uid)
            if uid in self._seqs:  # its order, by which the index knows what it filed
                unit = dataclasses.replace(unit, seq=self._seqs[uid])
            self._resend.append(unit)
        return bool(left)

    def _stale(self, flight: _Flight) -> None:
        """A result (or failure) of a unit sent before the last reset: send it again."""
        unit = flight.unit
        if self._flights.get(unit.uid) is flight:
            del self._flights[unit.uid]
        self._again(unit)
        self.resent += 1

    async def _result(self, fut: asyncio.Task, flight: _Flight) -> None:
        unit = flight.unit
        if flight.epoch != self._epoch and not fut.cancelled():
            if fut.exception() is None:
                self._take_events(flight.worker, fut.result()[1], flight.epoch)
            self._stale(flight)
            return
        try:
            report, events = fut.result()
        except WorkerLost as exc:
            if exc.worker not in self._down:
                log.warning("%s; resending its uncommitted units (those that were running "
                            "validate and resize their images in a process of their own, in "
                            "case one of them killed it)", exc)
            del self._flights[unit.uid]
            self._again(unit, isolate=True)
            self.resent += 1
            self._lose(exc.worker)
            return
        except IndexLost as exc:
            log.warning("%s; resending every uncommitted unit", exc)
            del self._flights[unit.uid]
            self._again(unit)
            await self._reset_all()
            return
        if flight.orphaned:  # decided on a worker lost meanwhile: its rows may be gone
            del self._flights[unit.uid]
            self._again(unit)
            self.resent += 1
            return
        flight.report = report
        flight.incarnation = events.incarnation
        self.counts.add(report)
        if report.settled:
            self._unfinished.discard(unit.uid)
        elif unit.uid in self._partial or unit.attempt > 0:
            # Decided before, and lost: undecided again. Its shards may hold images of an
            # earlier attempt (and the ledger their grant), so a resend that decides nothing
            # leaves it half-written: it finishes last unless decided again first.
            self._partial.setdefault(unit.uid, {})  # (an attempt lost before it reported)
            self._unfinished.add(unit.uid)
        if unit.uid in self._planned:  # the planner learnt from its first report
            self._planned.discard(unit.uid)
        else:
            error = self.planner.reported(unit, report, time.monotonic())
            if error is not None:
                self.search_errors.append(error)
        if not report.settled:  # it decided nothing: no commit will come
            del self._flights[unit.uid]
        self._take_events(flight.worker, events)
        if flight.committed_early and self._flights.get(unit.uid) is flight:
            del self._flights[unit.uid]

    async def _join_late(self) -> None:
        """Take in the late workers that have started since the last look."""
        now = time.monotonic()
        if not self._late or now < self._late_check:
            return
        self._late_check = now + LATE_CHECK_S
        for w in sorted(self._late):
            if await self.executor.revive(w):
                self._late.discard(w)
                self._down.discard(w)

    async def _revive(self) -> None:
        """Units wait to be resent and no worker is free: wait for a lost one to come back,
        asking them all at once each second, for ``REVIVE_S`` at most (by the clock: one
        unanswered ask may take seconds, and 120 rounds of them took over an hour)."""
        deadline = time.monotonic() + REVIVE_S
        while True:
            down = sorted(self._down)
            for w, back in zip(down, await asyncio.gather(*map(self.executor.revive, down))):
                if back:
                    self._down.discard(w)
                    self._late.discard(w)
            if len(self._down) < self.executor.workers:
                return
            if time.monotonic() >= deadline:
                raise JobInterrupted(f"every worker was lost and none came back within "
                                     f"{REVIVE_S:g} s; continue the job with --resume")
            await asyncio.sleep(1.0)

    async def _flush(self) -> None:
        """Workers write their last shards; every unit reported so far must commit."""
        for _ in range(3):
            try:
                for w, events in enumerate(await self.executor.flush()):
                    if isinstance(events, WorkerLost):
                        if w not in self._down:
                            log.warning("%s while writing the last shards; resending", events)
                            self._lose(w)
                    else:
                        self._take_events(w, events)
            except IndexLost:
                await self._reset_all()
            if not self.cancelled:
                self._finish_written()
            if not self._resend:
                break
            # Work was lost while finishing: run it again, then flush again.
            tasks: dict[asyncio.Task, _Flight] = {}
            while self._resend or tasks:
                room = self._capacity()
                while self._resend and room > 0:
                    self._start(self._resend.popleft(), tasks)
                    room -= 1
                if not tasks:
                    await self._revive()
                    continue
                done, _ = await asyncio.wait(set(tasks), return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    flight = tasks.pop(fut)
                    self._done_running(flight)
                    await self._result(fut, flight)
        pending = [uid for uid, f in self._flights.items() if f.report is not None]
        if pending:
            raise JobInterrupted(f"{len(pending)} units were decided but never committed "
                                 f"(e.g. {pending[0]}); continue the job with --resume")

    def stats(self) -> dict[str, Any]:
        """The job's stats.json content as its counts stand."""
        return self.counts.stats(
            partial=self.cancelled,
            **({"cancelled_by": self.cancel_cause} if self.cancelled else {}),
            search_errors=list(self.search_errors),
            engine_requests=dict(self.engine_requests),
            fallbacks=self.planner.fallbacks,
            resent_units=self.resent, isolated_units=self.isolated,
        )

