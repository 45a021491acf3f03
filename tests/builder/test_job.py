"""The driver's loop without Ray or network: planner, counts, resends, resume, cancel.

The executor here is an in-memory stand-in for the workers: a search unit's page comes from a
table, a URL ending in '.ok' is a valid image and the rest are rejected as http_client_error,
and grants come from a real quota ledger. So what is tested is the driver's own logic.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import Counter
from typing import Optional

import pytest

from builder.job import IndexLost, JobCounts, JobRunner, UnitPlanner, WorkerLost
from builder.journal import ResumeState
from builder.listsource import SlicePlan
from builder.quota import QuotaLedger
from builder.reasons import Reason
from builder.spec import parse_spec
from builder.units import SEARCH, SearchOutcome, UnitReport, WorkerEvents, WorkUnit


def spec(**extra):
    data = {"name": "t", "target": 3, "classes": {"cat": ["q1", "q2"]},
            "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:1", "per_page": 2,
                         "max_pages": 3},
                        {"engine": "sandbox", "url": "http://127.0.0.1:2", "per_page": 2}]}
    data.update(extra)
    return parse_spec(data)


class FakeExecutor:
    """Workers that decide units from ``pages`` and commit them at once (or, with
    ``defer``, only at flush: the units a lost worker had reported are then resent)."""

    def __init__(self, s, pages: dict[tuple[int, str], list[str]], workers: int = 1,
                 defer: bool = False):
        self.spec = s
        self.pages = pages
        self.workers = workers
        self.late: set[int] = set()
        self.defer = defer
        self.ledger = QuotaLedger({label: s.target_of(label) for label in s.labels})
        self.runs: list[WorkUnit] = []
        self.pending: dict[int, list[str]] = {w: [] for w in range(workers)}
        self.fail_next: Optional[BaseException] = None
        self.cancelled = False
        self.resets = 0
        self.epoch = 0

    async def run(self, worker: int, unit: WorkUnit) -> tuple[UnitReport, WorkerEvents]:
        epoch = self.epoch
        await asyncio.sleep(0)
        if epoch != self.epoch:  # as a real worker: a unit running through a reset is stale
            raise IndexLost("reset while it ran")
        self.runs.append(unit)
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        report = UnitReport(unit.uid)
        urls = self.pages.get((unit.source, unit.query), [])
        chunk = urls[unit.page * unit.per_page:(unit.page + 1) * unit.per_page]
        report.search = SearchOutcome(hits=len(chunk),
                                      has_more=(unit.page + 1) * unit.per_page < len(urls))
        tally = report.tally(unit.label)
        valid = 0
        for url in chunk:
            tally.candidates += 1
            if self.cancelled:
                tally.rejected[Reason.CANCELLED.value] += 1
            elif url.endswith(".ok"):
                valid += 1
            else:
                tally.rejected[Reason.HTTP_CLIENT_ERROR.value] += 1
        granted = self.ledger.grant(unit.uid, {unit.label: valid}, {}).get(unit.label, 0)
        tally.accepted += granted
        if valid - granted:
            tally.rejected[Reason.OVER_TARGET.value] += valid - granted
        self.pending[worker].append(unit.uid)
        committed = [] if self.defer else self._commit(worker)
        return report, WorkerEvents(f"w{worker}", committed)

    def _commit(self, worker: int) -> list[str]:
        out, self.pending[worker] = self.pending[worker], []
        for uid in out:
            self.ledger.commit(uid, dict(self.ledger.grants.get(uid, {})))
        return out

    async def flush(self) -> list[WorkerEvents]:
        return [WorkerEvents(f"w{w}", self._commit(w)) for w in range(self.workers)]

    async def revive(self, worker: int) -> bool:
        return True

    async def reset(self) -> None:
        self.resets += 1
        self.epoch += 1
        for w in self.pending:
            for uid in self.pending[w]:
                self.ledger.release(uid)
            self.pending[w] = []

    def cancel(self) -> None:
        self.cancelled = True

    async def in_flight(self) -> dict[str, dict[str, int]]:
        return {}


def run(s, executor, resume: Optional[ResumeState] = None, **kw):
    planner = UnitPlanner(s, resume=resume)
    counts = JobCounts(s)
    for _, report in (resume.reports if resume else []):
        counts.add(report)
    runner = JobRunner(s, executor, planner, counts, **kw)
    outcome = asyncio.run(runner.run())
    return runner, outcome.stats


def check_exact(stats):
    assert stats["accepted"] + stats["rejected"] == stats["candidates"]
    for c in stats["classes"].values():
        assert c["accepted"] + c["rejected"] == c["candidates"]


def test_planner_uses_sources_in_order_and_records_fallback():
    s = spec()
    planner = UnitPlanner(s)
    first = planner.next_class_unit("cat", 0.0)
    assert first.source == 0 and first.query == "q1" and first.kind == SEARCH
    planner.reported(first, UnitReport(first.uid, search=SearchOutcome(hits=2, has_more=False)),
                     0.0)
    second = planner.next_class_unit("cat", 0.0)
    assert second.source == 0 and second.query == "q2"
    planner.reported(second, UnitReport(second.uid, search=SearchOutcome(hits=0)), 0.0)
    third = planner.next_class_unit("cat", 0.0)
    assert third.source == 1 and planner.fallbacks[0]["reason"] == "exhausted"


def test_runner_reaches_target_with_exact_accounting():
    pages = {(0, "q1"): ["a.ok", "b.bad", "c.ok", "d.ok", "e.ok"], (0, "q2"): ["f.ok"]}
    runner, stats = run(spec(), FakeExecutor(spec(), pages))
    check_exact(stats)
    assert stats["classes"]["cat"]["accepted"] == 3 and not stats["shortfall"]


def test_sources_dry_gives_shortfall_and_snapshot_counts_reasons():
    pages = {(0, "q1"): ["a.bad", "b.ok"], (1, "q1"): ["c.bad"]}
    runner, stats = run(spec(), FakeExecutor(spec(), pages))
    check_exact(stats)
    assert stats["shortfall"] == {"cat": 2}
    assert runner.counts.snapshot()["rejected_by_reason"] == {"http_client_error": 2}


def test_a_lost_worker_s_uncommitted_units_are_resent_and_counted_once():
    s = spec(target=6)
    pages = {(0, "q1"): [f"{i}.ok" for i in range(4)], (0, "q2"): [f"x{i}.ok" for i in range(4)]}
    executor = FakeExecutor(s, pages, defer=True)
    ran = []

    async def failing_run(worker, unit, original=executor.run):
        ran.append(unit)
        if len(ran) == 3:  # the worker dies after it reported two units it never committed
            await executor.reset()
            raise WorkerLost(worker, "node removed")
        return await original(worker, unit)

    executor.run = failing_run
    runner, stats = run(s, executor)
    check_exact(stats)
    assert stats["accepted"] == 6 and stats["resent_units"] >= 3
    resent = [u for u in ran if u.attempt > 0]
    assert {u.uid for u in resent} >= {u.uid for u in ran[:3]}
    assert executor.ledger.accepted["cat"] == 6


def test_only_a_unit_running_when_its_worker_was_lost_is_resent_isolated():
    """An image that kills its worker's process kills it each time the unit runs: the unit
    that was running is resent with its images validated in a process of their own. Units
    the worker had already reported (their images were validated) are resent as they were."""
    s = spec(target=6)
    pages = {(0, "q1"): [f"{i}.ok" for i in range(4)], (0, "q2"): [f"x{i}.ok" for i in range(4)]}
    executor = FakeExecutor(s, pages, defer=True)
    ran = []

    async def failing_run(worker, unit, original=executor.run):
        ran.append(unit)
        if len(ran) == 3:
            await executor.reset()
            raise WorkerLost(worker, "process killed")
        return await original(worker, unit)

    executor.run = failing_run
    _, stats = run(s, executor)
    check_exact(stats)
    assert not any(u.isolate for u in ran[:3])
    again = {u.uid: u for u in ran[3:] if u.attempt > 0}
    assert again[ran[2].uid].isolate and again[ran[2].uid].attempt == 1
    assert not again[ran[0].uid].isolate and not again[ran[1].uid].isolate
    assert stats["isolated_units"] == 1 and stats["accepted"] == 6


def test_a_worker_that_comes_back_while_its_units_still_run_is_not_trusted_with_them(
        monkeypatch):
    """On Ray a lost worker rejoins once its actor is back, dropping what it held. A unit it
    was still running when it was lost may report after that: its rows are gone, so it is
    sent again rather than counted; and taking the worker back left its load at -1 when that
    unit ended."""
    from builder import job

    monkeypatch.setattr(job, "LATE_CHECK_S", 0.05)
    queries = ["q1", "q2", "q3", "q4"]
    s = spec(target=12, classes={"cat": queries})
    pages = {(0, q): [f"{q}-{i}.ok" for i in range(4)] for q in queries}
    executor = FakeExecutor(s, pages, workers=2)
    calls, back = [], []

    async def run_(worker, unit, original=executor.run):
        calls.append((worker, unit.uid, unit.attempt))
        on_1 = [c for c in calls if c[0] == 1]
        if worker == 1 and not back and len(on_1) == 1:
            while len([c for c in calls if c[0] == 1]) < 2:
                await asyncio.sleep(0.01)
            executor.late.add(1)  # as RayExecutor: on its way back
            raise WorkerLost(1, "actor unreachable")
        if worker == 1 and not back:
            while not back:  # still running on the lost worker when it comes back
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1 if worker == 0 else 0)
        return await original(worker, unit)

    async def revive(worker):
        executor.late.discard(worker)
        back.append(worker)
        return True

    executor.run, executor.revive = run_, revive
    runner = JobRunner(s, executor, UnitPlanner(s), JobCounts(s), units_per_worker=2)
    stats = asyncio.run(asyncio.wait_for(runner.run(), 30)).stats
    check_exact(stats)
    assert stats["accepted"] == 12 and back == [1]
    orphan = [uid for w, uid, attempt in calls if w == 1 and attempt == 0][1]
    assert [a for _, uid, a in calls if uid == orphan] == [0, 1]
    assert runner._load == [0, 0]


def test_a_unit_lost_in_flight_is_run_again_once_not_twice():
    """A unit whose worker was lost before it reported goes back through the resend queue
    only: the planner must not issue the same page again beside it (both copies would be
    counted, and the journal holds one)."""
    s = spec(target=6)
    pages = {(0, "q1"): [f"{i}.ok" for i in range(6)], (0, "q2"): [f"x{i}.ok" for i in range(4)]}
    executor = FakeExecutor(s, pages, workers=2)
    done: Counter = Counter()
    calls = []

    async def run_(worker, unit, original=executor.run):
        calls.append(unit)
        if len(calls) == 1:
            await asyncio.sleep(0.01)  # lost while the other worker's units run
            raise WorkerLost(worker, "process killed")
        report, events = await original(worker, unit)
        done[unit.uid] += 1
        return report, events

    executor.run = run_
    runner, stats = run(s, executor)
    check_exact(stats)
    assert calls[0].uid in done and max(done.values()) == 1, done
    assert stats["accepted"] == 6 and stats["candidates"] == 2 * len(done)


def test_a_resent_unit_that_had_reported_does_not_move_its_cursor_twice():
    """A unit reported and then resent (its worker lost before it committed) reports again:
    the planner learns from its first report only, so no page of results is skipped."""
    s = spec(target=100, classes={"cat": ["q1"]})
    pages = {(0, "q1"): [f"{i}.ok" for i in range(8)]}  # pages of 2; source 0 reads 3
    executor = FakeExecutor(s, pages, defer=True)
    calls = []

    async def run_(worker, unit, original=executor.run):
        calls.append(unit)
        if len(calls) == 2:  # the worker dies after reporting page 0, uncommitted
            await executor.reset()
            raise WorkerLost(worker, "process killed")
        return await original(worker, unit)

    executor.run = run_
    _, stats = run(s, executor, units_per_worker=1)
    check_exact(stats)
    assert sorted({u.page for u in calls if u.source == 0}) == [0, 1, 2]  # max_pages 3
    assert stats["accepted"] == 6


def test_a_lost_index_resends_everything_uncommitted():
    s = spec(target=4)
    pages = {(0, "q1"): [f"{i}.ok" for i in range(4)], (0, "q2"): [f"x{i}.ok" for i in range(4)]}
    executor = FakeExecutor(s, pages, defer=True)
    calls = []

    async def run_(worker, unit, original=executor.run):
        calls.append(unit)
        if len(calls) == 2:
            raise IndexLost("index partition 0 restarted")
        return await original(worker, unit)

    executor.run = run_
    _, stats = run(s, executor)
    check_exact(stats)
    assert stats["accepted"] == 4 and executor.resets == 1


def test_resume_skips_committed_units_and_keeps_their_counts():
    s = spec()
    pages = {(0, "q1"): ["a.ok", "b.ok", "c.ok", "d.ok"], (0, "q2"): []}
    planner = UnitPlanner(s)
    done = planner.next_class_unit("cat", 0.0)
    report = UnitReport(done.uid, search=SearchOutcome(hits=2, has_more=True))
    report.tally("cat").candidates = 2
    report.tally("cat").accepted = 2
    state = ResumeState("j", {done.uid}, [(done, report)])
    executor = FakeExecutor(s, pages)
    executor.ledger.accepted["cat"] = 2
    _, stats = run(s, executor, resume=state)
    check_exact(stats)
    assert done.uid not in {u.uid for u in executor.runs}
    assert stats["classes"]["cat"]["accepted"] == 3 and stats["candidates"] == 4


def test_search_errors_fall_back_to_the_next_source():
    s = spec()
    executor = FakeExecutor(s, {(1, "q1"): ["a.ok", "b.ok"], (1, "q2"): ["c.ok"]})
    original = executor.run

    async def run_(worker, unit):
        if unit.source == 0:
            report = UnitReport(unit.uid, search=SearchOutcome(error="503", final=True))
            return report, WorkerEvents("w0", [unit.uid])
        return await original(worker, unit)

    executor.run = run_
    runner, stats = run(s, executor)
    check_exact(stats)
    assert stats["accepted"] == 3 and runner.planner.fallbacks[0]["reason"] == "failing"
    assert len(stats["search_errors"]) == 2


def test_a_full_class_does_not_wait_on_a_cursor_held_back_by_an_error():
    """A query that failed retryably waits before its next try; once its class is full the
    job ends at once instead of waiting on (or spinning over) that cursor."""
    s = spec(sources=[{"engine": "sandbox", "url": "http://127.0.0.1:1", "per_page": 3}])
    executor = FakeExecutor(s, {(0, "q1"): ["a.ok", "b.ok", "c.ok"]})
    original, held = executor.run, []

    async def run_(worker, unit):
        if unit.query == "q2":
            held.append(unit)
            report = UnitReport(unit.uid, search=SearchOutcome(error="circuit open",
                                                               retryable=True, retry_after=30))
            return report, WorkerEvents("w0", [unit.uid])
        return await original(worker, unit)

    executor.run = run_

    async def bounded():
        runner = JobRunner(s, executor, UnitPlanner(s), JobCounts(s))
        return (await asyncio.wait_for(runner.run(), timeout=3.0)).stats

    stats = asyncio.run(bounded())
    check_exact(stats)
    assert stats["accepted"] == 3 and len(held) == 1


def refusal(probes_failed: int = 0, status: int = 0) -> SearchOutcome:
    """An open breaker's refusal (no request sent; the last failure it counted answered
    ``status``): ask again in 0.01 s."""
    return SearchOutcome(error="sandbox: circuit open after 5 failures", status=status,
                         retryable=True, retry_after=0.01, refused=True,
                         probes_failed=probes_failed)


def answered(status: int) -> SearchOutcome:
    """A search the engine answered with an error (``status`` 0: no answer at all)."""
    return SearchOutcome(error=f"sandbox: HTTP {status}", status=status, retryable=True,
                         retry_after=0.01)


def failing(executor, outcomes, source: int = 0):
    """``executor`` with source ``source``'s searches failing while ``outcomes(n)`` gives the
    ``n``-th's outcome (None: from then on they succeed). Returns the failed units."""
    original, failed = executor.run, []

    async def run_(worker, unit):
        outcome = outcomes(len(failed)) if unit.source == source else None
        if outcome is not None:
            failed.append(unit)
            return UnitReport(unit.uid, search=outcome), WorkerEvents(f"w{worker}", [unit.uid])
        return await original(worker, unit)

    executor.run = run_
    return failed


def one_query(**extra):
    return spec(sources=[{"engine": "sandbox", "url": "http://127.0.0.1:1", "per_page": 3}],
                **extra)


def test_a_class_with_no_other_source_waits_for_its_engines_breaker():
    """An engine's open breaker refused a search (nothing was sent): the class had no other
    source, and three refusals a few seconds apart ended every query, so the job fell short
    while the breaker's cooldown, which a 429 storm usually outlasts, ran on. Once the engine
    has answered (a 429 is an answer: busy, but there) the cursor waits as long as the
    breaker says, without counting an error, and one warning and one search error say so,
    not one for each refusal."""
    s = one_query(classes={"cat": ["q1"]})  # one cursor: its reports come back in order
    executor = FakeExecutor(s, {(0, "q1"): ["a.ok", "b.ok", "c.ok"]})
    failed = failing(executor, lambda n: None if n == 12 else
                     answered(429) if n == 0 else refusal(1))
    runner, stats = run(s, executor)
    check_exact(stats)
    assert stats["accepted"] == 3 and len(failed) == 12
    assert not runner.planner.fallbacks
    assert [e["error"] for e in stats["search_errors"]] == \
        ["sandbox: HTTP 429", "sandbox: circuit open after 5 failures"]


def test_a_waiting_class_gives_up_once_two_more_probes_failed():
    """The wait ends when two of the breaker's probes failed since the class began waiting
    (the breaker may have failed some before: on Ray it is every job's): the engine is down
    and the class ends short, saying why."""
    s = one_query(classes={"cat": ["q1"]})
    executor = FakeExecutor(s, {(0, "q1"): ["a.ok", "b.ok", "c.ok"]})
    failed = failing(executor, lambda n: answered(429) if n == 0 else refusal(5 + n // 4))
    runner, stats = run(s, executor)
    check_exact(stats)
    # the 429, then refusals 1-7 wait (5 or 6 probes failed); the 8th (7) ends the query
    assert stats["accepted"] == 0 and len(failed) == 9
    assert [e["error"] for e in stats["search_errors"]] == \
        ["sandbox: HTTP 429", "sandbox: circuit open after 5 failures",
         "sandbox: circuit open after 5 failures; given up waiting for the engine: 2 of its "
         "probes failed in a row while the class waited"]


def test_a_last_source_that_answered_retries_longer_and_one_that_never_did_ends_fast():
    """A class's last source, once its engine has answered (an HTTP error is an answer: the
    server is there, busy or failing), may fail ten times in a row, so that its breaker, not
    the query, decides; an engine that never answered (no server there, or a breaker that
    opened on no answers) ends a query after three errors, as one with a later source to
    fall back to does."""
    for outcome in (answered(429), answered(503), answered(403)):
        s = one_query(classes={"cat": ["q1"]})
        executor = FakeExecutor(s, {(0, "q1"): ["a.ok", "b.ok", "c.ok"]})
        failed = failing(executor, lambda n: outcome if n < 9 else None)
        runner, stats = run(s, executor)
        check_exact(stats)
        assert stats["accepted"] == 3 and len(failed) == 9

    for outcome in (answered(0), answered(401), answered(404), refusal()):
        s = one_query()
        executor = FakeExecutor(s, {(0, "q1"): ["a.ok", "b.ok", "c.ok"]})
        failed = failing(executor, lambda n: outcome)
        runner, stats = run(s, executor)
        check_exact(stats)
        assert stats["accepted"] == 0 and len(failed) == 2 * runner.planner.max_errors

    for outcome in (answered(429), refusal(status=429)):
        s = spec()
        executor = FakeExecutor(s, {(1, "q1"): ["a.ok", "b.ok"], (1, "q2"): ["c.ok"]})
        failed = failing(executor, lambda n: outcome)
        runner, stats = run(s, executor)
        check_exact(stats)
        assert stats["accepted"] == 3 and len(failed) == 2 * runner.planner.max_errors
        assert runner.planner.fallbacks[0]["reason"] == "failing"


def test_a_job_that_meets_a_breaker_opened_on_answers_waits_for_it():
    """A job started (or resumed) while the engine's breaker is open, opened by another job
    or by the run it resumes, has had no answer of its own: it waits all the same where the
    breaker opened on the engine's answers (429s), and where the run it resumes had them.
    Sources of one engine and server share its breaker, and what one learnt holds for all."""
    s = one_query(classes={"cat": ["q1"]})
    executor = FakeExecutor(s, {(0, "q1"): ["a.ok", "b.ok", "c.ok"]})
    failed = failing(executor, lambda n: refusal(status=429) if n < 8 else None)
    runner, stats = run(s, executor)
    check_exact(stats)
    assert stats["accepted"] == 3 and len(failed) == 8

    done = UnitPlanner(s).next_class_unit("cat", 0.0)
    report = UnitReport(done.uid, search=SearchOutcome(hits=3, has_more=True))
    executor = FakeExecutor(s, {(0, "q1"): ["x.bad", "y.bad", "z.bad", "a.ok", "b.ok", "c.ok"]})
    failed = failing(executor, lambda n: refusal() if n < 8 else None)
    runner, stats = run(s, executor, resume=ResumeState("j", {done.uid}, [(done, report)]))
    check_exact(stats)
    assert stats["accepted"] == 3 and len(failed) == 8  # from the page after the one done

    s = spec(classes={"cat": ["q1"]}, sources=[
        {"engine": "sandbox", "url": "http://127.0.0.1:1", "per_page": 2, "max_pages": 1},
        {"engine": "sandbox", "url": "http://127.0.0.1:1", "per_page": 3}])
    executor = FakeExecutor(s, {(0, "q1"): ["a.ok", "b.ok"], (1, "q1"): ["c.ok", "d.ok"]})
    failed = failing(executor, lambda n: refusal() if n < 8 else None, source=1)
    runner, stats = run(s, executor)
    check_exact(stats)
    assert stats["accepted"] == 3 and len(failed) == 8


def test_list_sources_are_sliced_and_skip_done_slices():
    s = parse_spec({"name": "t", "target": 100, "classes": ["cat"],
                    "sources": [{"engine": "urllist", "path": "/nonexistent.txt"}]})
    plan = SlicePlan("/nonexistent.txt", "txt", count=5, size=500, slice_bytes=100)
    state = ResumeState("j", {"l00-00000001"}, [])
    planner = UnitPlanner(s, list_plans={0: plan}, resume=state)
    waiting = planner.waiting_on_list("cat")
    units = [planner.next_list_unit(waiting) for _ in range(5)]
    assert [u.slice for u in units if u] == [0, 2, 3, 4]
    assert not planner.exhausted("cat")
    for u in units:
        if u:
            planner.reported(u, UnitReport(u.uid), 0.0)
    assert planner.exhausted("cat")


def test_a_half_written_retry_slice_is_finished_as_itself_deciding_every_reject():
    """A killed retry-failed run half wrote a retry slice, which the resumed run finished as
    a WRITTEN unit: it took back its written images and no more, and publishing then dropped
    the slice's other published rejects as decided (its unit file existed). They vanished
    from the dataset's records while every figure still balanced. A retry slice is sent
    again as itself, so every reject it holds is decided; another unit stays WRITTEN."""
    from builder.units import RETRY, WRITTEN, retry_index, retry_uid, search_uid

    s = spec()
    plan = SlicePlan("/nonexistent/rejects.parquet", "parquet", count=4, size=400,
                     row_groups=(400,), slice_rows=100)
    planner = UnitPlanner(s, retry_plan=plan)
    unit = planner.written_unit(retry_uid(2))
    assert (unit.kind, unit.uid, unit.slice, unit.attempt) == (RETRY, "r-00000002", 2, 1)
    assert [planner.next_list_unit(planner.retry).slice for _ in range(3)] == [0, 1, 3]
    page = search_uid(0, "cat", "q1", 0)
    assert planner.written_unit(page).kind == WRITTEN
    assert retry_index("r-00000002") == 2 and retry_index(page) is None


def test_a_list_is_issued_by_the_rows_its_slices_hold():
    """Slices grow along a list: what the runner expects from the slices in flight counts
    their rows, so a grown slice stands for more candidates than a first one."""
    s = parse_spec({"name": "t", "target": 100, "classes": ["cat"],
                    "sources": [{"engine": "urllist", "path": "/nonexistent.txt"}]})
    plan = SlicePlan("/nonexistent.txt", "txt", count=10, size=64 * 10 + 2304 * 10,
                     slice_bytes=640, slice_rows=64, grow_after=64, grown_rows=256,
                     grown_bytes=2560)
    planner = UnitPlanner(s, list_plans={0: plan}, unit_size=64)
    runner = JobRunner(s, FakeExecutor(s, {}, workers=2), planner, JobCounts(s),
                       units_per_worker=4)
    units = runner._next_units()
    # 64 rows at the prior yield of 0.7 promise 45 images, 64 + 256 promise 224 >= 100.
    assert [u.slice for u in units] == [0, 1]
    state = planner.lists[0]
    assert state.rows_in_flight == 320
    for u in units:
        planner.reported(u, UnitReport(u.uid), 0.0)
    assert state.rows_in_flight == 0 and state.in_flight == 0


class PollCountingExecutor(FakeExecutor):
    """Units that take a millisecond; counts the runner's questions about units in flight
    that no stall explains. A unit is old enough to be asked about once it has been out a
    progress interval: a millisecond unit only is when the event loop stopped meanwhile (the
    process preempted under load), which ``watch_the_loop`` sees as a gap between its ticks.
    """

    TICK_S = 0.002
    STALL_S = 0.02

    def __init__(self, *args, interval_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.interval_s = interval_s
        self.polls = 0
        self.excused = 0
        self.ticks: list[float] = []

    async def watch_the_loop(self) -> None:
        while True:
            self.ticks.append(time.monotonic())
            await asyncio.sleep(self.TICK_S)

    def _stalled_before(self, now: float) -> bool:
        """Whether the loop stopped for STALL_S or more within the interval before ``now``
        (with a margin: a unit is sent a moment before its interval starts counting)."""
        first = bisect.bisect_left(self.ticks, now - 2 * self.interval_s)
        times = self.ticks[max(first - 1, 0):] + [now]  # from the tick before: a long stall
        return any(b - a >= self.STALL_S for a, b in zip(times, times[1:]))

    async def run(self, worker: int, unit: WorkUnit) -> tuple[UnitReport, WorkerEvents]:
        await asyncio.sleep(0.001)
        return await super().run(worker, unit)

    async def in_flight(self) -> dict[str, dict[str, int]]:
        if self._stalled_before(time.monotonic()):
            self.excused += 1
        else:
            self.polls += 1
        return {}


def test_units_that_end_within_a_progress_interval_cost_no_in_flight_poll():
    """Asking the workers what they fetched costs a call to each (on Ray, about what a unit's
    own call costs the driver): units that end within a progress interval are not asked about.
    Slower ones are (``test_progress_moves_while_a_unit_runs``)."""
    s = spec(target=300, classes={"cat": ["q1"]},
             sources=[{"engine": "sandbox", "url": "http://127.0.0.1:1", "per_page": 2,
                       "max_pages": 1000}])
    executor = PollCountingExecutor(s, {(0, "q1"): [f"{i}.ok" for i in range(600)]},
                                    interval_s=0.1)
    snaps: list[dict] = []
    runner = JobRunner(s, executor, UnitPlanner(s), JobCounts(s), progress=snaps.append,
                       progress_every_s=0.1)

    async def main():
        watch = asyncio.ensure_future(executor.watch_the_loop())
        try:
            return await runner.run()
        finally:
            watch.cancel()

    assert asyncio.run(main()).stats["accepted"] == 300
    assert len(snaps) >= 3 and any(0 < snap["accepted"] < 300 for snap in snaps)
    assert executor.polls == 0, f"{executor.polls} polls ({executor.excused} after a stall)"


def test_cancel_ends_in_flight_units_cancelled_and_stops_issuing():
    s = spec(target=50)
    pages = {(0, "q1"): [f"{i}.ok" for i in range(100)], (0, "q2"): []}
    executor = FakeExecutor(s, pages)
    holder = {}

    async def main():
        planner, counts = UnitPlanner(s), JobCounts(s)
        runner = JobRunner(s, executor, planner, counts)
        holder["runner"] = runner
        task = asyncio.ensure_future(runner.run())
        while runner.counts.accepted < 4:
            await asyncio.sleep(0)
        runner.cancel()
        runner.cancel("SIGTERM")  # the first cause counts
        return await task

    outcome = asyncio.run(main())
    check_exact(outcome.stats)
    assert outcome.cancelled and executor.cancelled
    assert outcome.stats["accepted"] < 50
    # Whether Ray must be asked to record the job stopped (cluster/rayjob.py) depends on it.
    assert outcome.stats["cancelled_by"] == "request"


@pytest.mark.parametrize("target", [1, 7])
def test_counts_take_back_a_report_exactly(target):
    s = spec(target=target)
    counts = JobCounts(s)
    report = UnitReport("u")
    report.tally("cat").candidates = 5
    report.tally("cat").accepted = 2
    report.tally("cat").rejected.update({"timeout": 3})
    report.by_stage["fetch"] += 3
    counts.add(report)
    counts.add(report, -1)
    assert counts.candidates == counts.accepted == counts.rejected == 0
    assert +counts.by_stage == Counter()


class SlowUnitExecutor(FakeExecutor):
    """A unit that takes a while, fetching one candidate after another, as a worker does."""

    def __init__(self, *args, steps: int = 4, step_s: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps, self.step_s = steps, step_s
        self.fetched: dict[str, Counter] = {}

    async def run(self, worker: int, unit: WorkUnit) -> tuple[UnitReport, WorkerEvents]:
        self.fetched[unit.uid] = Counter()
        for _ in range(self.steps):
            await asyncio.sleep(self.step_s)
            self.fetched[unit.uid][unit.label] += 1
        del self.fetched[unit.uid]
        return await super().run(worker, unit)

    async def in_flight(self) -> dict[str, dict[str, int]]:
        return {uid: dict(c) for uid, c in self.fetched.items()}


def test_progress_moves_while_a_unit_runs():
    """A unit's images are decided together at its end; until then the progress says how many
    of its candidates were fetched, a few times a second, not only when a unit ends."""
    s = spec(target=2, classes={"cat": ["q1"]})
    executor = SlowUnitExecutor(s, {(0, "q1"): ["a.ok", "b.ok", "c.ok", "d.ok"]})
    snaps: list[dict] = []
    run(s, executor, progress=snaps.append, progress_every_s=0.05)
    during = [snap["classes"]["cat"]["in_flight"] for snap in snaps
              if snap["accepted"] == 0]
    assert max(during) >= 2, during
    assert snaps[-1]["classes"]["cat"]["in_flight"] == 0 and snaps[-1]["in_flight"] == 0
    assert snaps[-1]["accepted"] == 2


def test_a_late_worker_is_sent_nothing_until_it_has_started(monkeypatch):
    """A worker Ray had not placed when the job began (``Executor.late``) starts as down; the
    runner asks about it as it goes and sends it units once it has started."""
    import builder.job

    monkeypatch.setattr(builder.job, "LATE_CHECK_S", 0.0)
    s = spec(target=12)
    pages = {(0, "q1"): [f"{i}.ok" for i in range(6)], (0, "q2"): [f"x{i}.ok" for i in range(6)]}
    executor = FakeExecutor(s, pages, workers=2)
    executor.late = {1}
    ran: list[tuple[int, int]] = []
    asked: list[int] = []

    async def run_on(worker, unit, original=executor.run):
        ran.append((worker, len(asked)))
        await asyncio.sleep(0.01)
        return await original(worker, unit)

    async def revive(worker):
        asked.append(worker)
        return len(ran) >= 2

    executor.run, executor.revive = run_on, revive
    runner, stats = run(s, executor, units_per_worker=1)
    check_exact(stats)
    assert stats["accepted"] == 12
    first = next(i for i, (w, _) in enumerate(ran) if w == 1)
    assert first >= 2 and set(asked) == {1}


def test_a_unit_whose_worker_is_lost_every_time_stops_the_job_naming_resume():
    """A unit that kills its worker each time (or needs a service that keeps dying, as a
    dead rate limiter on Ray) was resent for ever: the job never ended nor failed."""
    from builder.errors import JobInterrupted
    from builder.job import MAX_SENDS

    s = spec(target=6)
    pages = {(0, "q1"): [f"{i}.ok" for i in range(4)], (0, "q2"): [f"x{i}.ok" for i in range(4)]}
    executor = FakeExecutor(s, pages, workers=2)
    sent = Counter()

    async def run_(worker, unit, original=executor.run):
        sent[unit.uid] += 1
        if unit.query == "q2":
            raise WorkerLost(worker, "process killed")
        return await original(worker, unit)

    executor.run = run_
    runner = JobRunner(s, executor, UnitPlanner(s), JobCounts(s))
    with pytest.raises(JobInterrupted, match="sent 6 times.*--resume"):
        asyncio.run(asyncio.wait_for(runner.run(), 30))
    assert max(sent.values()) == MAX_SENDS


def test_waiting_for_lost_workers_ends_by_the_clock(monkeypatch):
    """Each ask of a lost worker may hang for seconds; 120 rounds of one ask per worker took
    far longer than the 2 minutes the message said. The asks go out together, by a deadline."""
    from builder import job
    from builder.errors import JobInterrupted

    monkeypatch.setattr(job, "REVIVE_S", 1.0)
    s = spec(target=6)
    pages = {(0, "q1"): [f"{i}.ok" for i in range(4)]}
    executor = FakeExecutor(s, pages, workers=3)
    asked = []

    async def run_(worker, unit):
        raise WorkerLost(worker, "node removed")

    async def revive(worker):
        asked.append(worker)
        await asyncio.sleep(0.4)  # an ask that takes its time, then no
        return False

    executor.run, executor.revive = run_, revive
    runner = JobRunner(s, executor, UnitPlanner(s), JobCounts(s))
    started = time.monotonic()
    with pytest.raises(JobInterrupted, match="within 1 s.*--resume"):
        asyncio.run(asyncio.wait_for(runner.run(), 30))
    assert time.monotonic() - started < 3.5 and len(asked) >= 3


def test_a_commit_taken_before_its_units_own_result_still_commits_it():
    """A worker commits a unit when the shard holding its images is written, in the
    background, and says so with whichever result it sends next. When that result and the
    unit's own come back in one wait and the other is taken first, the commit must not be
    lost: the unit would stay 'decided but never committed' and the job would fail."""
    from builder.units import WorkerEvents

    s = spec()
    runner = JobRunner(s, FakeExecutor(s, {}), UnitPlanner(s), JobCounts(s))
    units = [WorkUnit(uid, 0, SEARCH, 0, label="cat", query="q1") for uid in ("uA", "uB")]
    results = {"uA": (UnitReport("uA"), WorkerEvents("w0", [])),
               "uB": (UnitReport("uB"), WorkerEvents("w0", ["uA", "uB"]))}
    runner.executor.run = lambda worker, unit: asyncio.sleep(0, results[unit.uid])

    async def main() -> dict:
        tasks: dict = {}
        for unit in units:
            runner._start(unit, tasks)
            runner._planned.add(unit.uid)
        await asyncio.gather(*tasks)
        flights = {f.unit.uid: (t, f) for t, f in tasks.items()}
        for uid in ("uB", "uA"):  # both came back in one wait; uB's result is taken first
            task, flight = flights[uid]
            runner._done_running(flight)
            await runner._result(task, flight)
        return dict(runner._flights)

    assert asyncio.run(main()) == {}


def test_a_commit_from_before_a_reset_does_not_commit_the_resent_attempt():
    """After an index reset the runner resends every unit it has not seen commit. A result
    sent before the reset (stale) may still carry the earlier attempt's commit of such a
    unit; taken for the resent attempt's, it would drop that attempt once it reports, though
    its rows are only buffered, and a lost worker would then not resend it."""
    from builder.units import WorkerEvents

    s = spec()
    runner = JobRunner(s, FakeExecutor(s, {}), UnitPlanner(s), JobCounts(s))
    results: dict = {}

    async def run_(worker, unit):
        results[(unit.uid, unit.attempt)] = asyncio.get_running_loop().create_future()
        return await results[(unit.uid, unit.attempt)]

    runner.executor.run = run_

    async def main() -> list[str]:
        tasks: dict = {}

        async def take(uid: str, attempt: int, events: list[str]) -> None:
            results[(uid, attempt)].set_result((UnitReport(uid), WorkerEvents("w0", events)))
            await asyncio.sleep(0)
            task, flight = next((t, f) for t, f in tasks.items()
                                if (f.unit.uid, f.unit.attempt) == (uid, attempt))
            del tasks[task]
            runner._done_running(flight)
            await runner._result(task, flight)

        for uid in ("uU", "uX"):
            runner._start(WorkUnit(uid, 0, SEARCH, 0, label="cat", query="q1"), tasks)
            runner._planned.add(uid)
        await asyncio.sleep(0)
        await take("uU", 0, [])
        await runner._reset_all()  # uU resent as attempt 1
        runner._start(runner._resend.popleft(), tasks)
        await asyncio.sleep(0)
        await take("uX", 0, ["uU"])  # stale: sent before the reset
        runner._resend.clear()
        await take("uU", 1, [])
        runner._lose(0)
        return [unit.uid for unit in runner._resend]

    assert asyncio.run(main()) == ["uU"]


def test_half_written_units_this_run_never_decides_are_finished_last_from_what_they_wrote():
    """A killed run half wrote two units. This run decides the first again (the planner issues
    it), but never reaches the second: a search page after one that now answers "no more", a
    list slice that is gone, a source that kept failing. Its images stayed in shards no count
    held, and nothing could be published. Once nothing else is left, it runs as a WRITTEN unit
    (resent: it takes back what its shards hold), which the planner learns nothing from."""
    from builder.units import WRITTEN, search_uid

    s = spec(target=6)
    pages = {(0, "q1"): [f"{i}.ok" for i in range(4)]}
    executor = FakeExecutor(s, pages)
    reached = search_uid(0, "cat", "q1", 0)
    ran: list[WorkUnit] = []

    async def run_unit(worker, unit, original=executor.run):
        ran.append(unit)
        if unit.kind != WRITTEN:
            return await original(worker, unit)
        report = UnitReport(unit.uid)
        tally = report.tally("cat")
        tally.candidates = tally.accepted = 2
        executor.ledger.grant(unit.uid, {"cat": 2}, {"cat": 2})
        executor.pending[worker].append(unit.uid)
        return report, WorkerEvents(f"w{worker}", executor._commit(worker))

    executor.run = run_unit
    runner, stats = run(s, executor, partial_units={reached: {"cat": 2},
                                                     "s00-gone-p00002": {"cat": 2}})
    check_exact(stats)
    [written] = [u for u in ran if u.kind == WRITTEN]
    assert (written.uid, written.attempt, ran[-1]) == ("s00-gone-p00002", 1, written)
    assert [u.attempt for u in ran if u.uid == reached] == [1]
    assert stats["accepted"] == stats["candidates"] == executor.ledger.accepted["cat"] == 6


def _written_report(executor, worker, unit, n):
    """What a worker reports for a WRITTEN unit whose shards hold ``n`` images of "cat"."""
    report = UnitReport(unit.uid)
    tally = report.tally("cat")
    tally.candidates = tally.accepted = n
    executor.ledger.grant(unit.uid, {"cat": n}, {"cat": n})
    executor.pending[worker].append(unit.uid)
    return report, WorkerEvents(f"w{worker}", executor._commit(worker))


def _lost_then_failing(executor, page: str, ran: list, fails_from: int):
    """The executor's ``run`` for the tests below: the second unit run loses its worker after
    ``page`` reported, before it committed; ``page``'s sends from attempt ``fails_from`` on
    fail to search (deciding nothing); a WRITTEN unit takes back 2 images."""
    from builder.units import WRITTEN

    async def run_unit(worker, unit, original=executor.run):
        ran.append(unit)
        if unit.kind == WRITTEN:
            return _written_report(executor, worker, unit, 2)
        if len(ran) == 2:
            await executor.reset()
            raise WorkerLost(worker, "node removed")
        if unit.uid == page and unit.attempt >= fails_from:
            return UnitReport(unit.uid, search=SearchOutcome(error="429", final=True),
                              settled=False), WorkerEvents(f"w{worker}", [])
        return await original(worker, unit)

    return run_unit


def test_a_half_written_unit_decided_then_lost_and_not_decided_again_is_finished_last():
    """A half-written page ran and reported, its worker was lost before it committed, and
    its resend's search failed (the engine gone): it was decided in this run no more, and
    nothing finished it."""
    from builder.units import WRITTEN, search_uid

    s = spec(target=6)
    executor = FakeExecutor(s, {(0, "q1"): [f"{i}.ok" for i in range(4)]}, defer=True)
    page = search_uid(0, "cat", "q1", 0)
    ran: list[WorkUnit] = []

    executor.run = _lost_then_failing(executor, page, ran, fails_from=2)
    runner, stats = run(s, executor, partial_units={page: {"cat": 2}}, units_per_worker=1)
    check_exact(stats)
    assert [(u.kind, u.uid) for u in ran if u.kind == WRITTEN] == [(WRITTEN, page)]
    assert page in executor.ledger.committed


def test_a_page_of_this_run_resent_after_a_lost_worker_whose_search_fails_is_finished_last():
    """A page reported, its worker was lost before all its rows were committed (some were, in
    a shard), and its resend's search failed (a 429, an open breaker). The resend decided
    nothing and the page was never sent again: its committed images were in the manifest
    with no count holding them, so publishing failed, and its grant held the class's room
    for the rest of the job (a false shortfall). It now finishes last, as a WRITTEN unit."""
    from builder.units import WRITTEN, search_uid

    s = spec(target=6)
    executor = FakeExecutor(s, {(0, "q1"): [f"{i}.ok" for i in range(4)]}, defer=True)
    page = search_uid(0, "cat", "q1", 0)
    ran: list[WorkUnit] = []

    executor.run = _lost_then_failing(executor, page, ran, fails_from=1)
    held: dict[str, dict[str, int]] = {}  # the pipeline's: publishing checks it
    runner, stats = run(s, executor, units_per_worker=1, partial_units=held)
    check_exact(stats)
    assert [(u.kind, u.uid) for u in ran if u.kind == WRITTEN] == [(WRITTEN, page)]
    assert page in executor.ledger.committed
    # sent, resent after the loss (its search failed), finished from what it wrote
    assert [(u.kind, u.attempt) for u in ran if u.uid == page] == [
        (SEARCH, 0), (SEARCH, 1), (WRITTEN, 1)]
    assert held == {page: {"cat": 2}}  # what it had accepted (a page of 2), its held room
    # it finishes under the order it was sent with, by which the index knows what it filed
    assert len({u.seq for u in ran if u.uid == page}) == 1


def test_the_room_a_resent_unit_held_is_not_sought_from_other_units_meanwhile():
    """A page that filled its class was taken back after a lost worker: the ledger still
    held its room, but the driver counted the class as needing all of it again and searched
    every other page and source, their images unused, until the page finished."""
    from builder.units import search_uid

    s = spec(target=4)
    pages = {(src, q): [f"{src}{q}{i}.ok" for i in range(4)] for src in (0, 1)
             for q in ("q1", "q2")}
    executor = FakeExecutor(s, pages, defer=True)
    page = search_uid(0, "cat", "q1", 0)
    ran: list[WorkUnit] = []

    executor.run = _lost_then_failing(executor, page, ran, fails_from=1)
    runner, stats = run(s, executor, units_per_worker=1)
    check_exact(stats)
    assert stats["accepted"] == 4
    assert {u.uid for u in ran if u.kind == SEARCH} == {page, ran[1].uid}  # no third page


def test_the_room_held_for_half_written_units_is_not_sought_from_other_sources():
    """The ledger holds room for a half-written unit's images. The driver counted that room
    as still needed, so it searched every page of every query and fallback source (their
    images then over_target) before the unit could finish last."""
    from builder.units import WRITTEN

    s = spec(target=6)
    pages = {(src, q): [f"{src}{q}{i}.ok" for i in range(40)] for src in (0, 1)
             for q in ("q1", "q2")}
    executor = FakeExecutor(s, pages)
    executor.ledger.grant("s00-gone-p00002", {"cat": 2}, {"cat": 2})  # as recover_ledger
    ran: list[WorkUnit] = []

    async def run_unit(worker, unit, original=executor.run):
        ran.append(unit)
        if unit.kind == WRITTEN:
            return _written_report(executor, worker, unit, 2)
        return await original(worker, unit)

    executor.run = run_unit
    runner, stats = run(s, executor, partial_units={"s00-gone-p00002": {"cat": 2}})
    check_exact(stats)
    assert stats["accepted"] == 6 and "over_target" not in stats["rejected_by_reason"]
    assert [u.kind for u in ran] == ["search", "search", WRITTEN]


def test_a_page_finished_from_what_it_wrote_does_not_end_its_query_on_a_later_resume():
    """A WRITTEN unit's journaled report has no search outcome, which the planner read as
    "no more pages": a later --resume never searched the pages after it."""
    from builder.units import WRITTEN, search_uid

    s = spec(target=20)
    first, written = search_uid(0, "cat", "q1", 0), search_uid(0, "cat", "q1", 1)
    state = ResumeState("job")
    state.reports.append((WorkUnit(first, 0, SEARCH, 0, engine="sandbox", label="cat",
                                   query="q1", page=0, per_page=2),
                          UnitReport(first, search=SearchOutcome(hits=2, has_more=True))))
    state.reports.append((WorkUnit(written, 1, WRITTEN, -1, attempt=1), UnitReport(written)))
    state.done.update({first, written})
    planner = UnitPlanner(s, resume=state)
    unit = planner.next_class_unit("cat", 0.0)
    assert (unit.source, unit.query, unit.page) == (0, "q1", 2)


@pytest.mark.parametrize("per_worker", [1, 4])
def test_a_page_sent_as_written_is_never_searched_as_well(per_worker):
    """A half-written page's search failed once (429), so its query waited to retry it; with
    the held room the class needed nothing new, and the page was sent as a WRITTEN unit. A
    lost worker then took counts back, the class needed more, and the planner searched the
    page as well: one uid in two flights (the driver failed on the second report, or counted
    its images twice)."""
    from builder.units import WRITTEN, search_uid

    s = spec(target=6)
    pages = {(0, "q1"): [f"a{i}.ok" for i in range(6)], (0, "q2"): [f"b{i}.ok" for i in range(6)]}
    executor = FakeExecutor(s, pages, defer=True)
    page = search_uid(0, "cat", "q1", 0)
    executor.ledger.grant(page, {"cat": 2}, {"cat": 2})  # as recover_ledger
    ran: list[WorkUnit] = []
    running: set[str] = set()

    async def run_unit(worker, unit, original=executor.run):
        assert unit.uid not in running, f"{unit.uid} sent while it runs"
        ran.append(unit)
        running.add(unit.uid)
        try:
            if unit.kind == WRITTEN:
                await asyncio.sleep(0.05)
                if unit.attempt == 1:
                    await executor.reset()
                    raise WorkerLost(worker, "node removed")
                return _written_report(executor, worker, unit, 2)
            if unit.uid == page and len([u for u in ran if u.uid == page]) == 1:
                return (UnitReport(unit.uid, search=SearchOutcome(
                    error="HTTP 429", retryable=True, retry_after=0.01), settled=False),
                    WorkerEvents(f"w{worker}", []))
            return await original(worker, unit)
        finally:
            running.discard(unit.uid)

    executor.run = run_unit
    runner, stats = run(s, executor, partial_units={page: {"cat": 2}},
                        units_per_worker=per_worker)
    check_exact(stats)
    sent = [u.kind for u in ran if u.uid == page]
    assert sent == [SEARCH, WRITTEN, WRITTEN]
    assert stats["accepted"] == executor.ledger.accepted["cat"] == 6
