"""The shared job loop without Ray or network: planner, ledger, runner, resume seeding.

The backend here is an in-memory stand-in for fetch/validate/dedup: it accepts URLs ending in
'.ok' and rejects the rest as http_client_error, so the loop's own logic is what is tested.
"""

from __future__ import annotations

import asyncio
from typing import Any

from builder.engines.base import SearchEngine, SearchHit, SearchPage
from builder.journal import ResumeState
from builder.job import JobLedger, JobRunner, SearchPlanner, SearchTask
from builder.reasons import Reason
from builder.records import Candidate, Record
from builder.spec import parse_spec


def spec(**extra):
    data = {"name": "t", "target": 3, "classes": {"cat": ["q1", "q2"]},
            "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:1", "per_page": 2,
                         "max_pages": 3},
                        {"engine": "sandbox", "url": "http://127.0.0.1:2", "per_page": 2}]}
    data.update(extra)
    return parse_spec(data)


class ListBackend:
    def __init__(self, pages: dict[tuple[int, str], list[str]]):
        self.pages = pages
        self.searches: list[SearchTask] = []
        self.forgotten: list[str] = []

    async def search(self, task: SearchTask) -> SearchPage:
        self.searches.append(task)
        urls = self.pages.get((task.source, task.query), [])
        chunk = urls[task.page * task.per_page:(task.page + 1) * task.per_page]
        return SearchPage([SearchHit(u) for u in chunk],
                          has_more=(task.page + 1) * task.per_page < len(urls))

    async def process(self, records: list[Record]) -> list[Record]:
        for r in records:
            if r.candidate.url.endswith(".ok"):
                r.sha256 = f"{abs(hash(r.candidate.url)):064x}"[:64]
            else:
                r.reject(Reason.HTTP_CLIENT_ERROR, "404")
        return records

    async def forget(self, image_ids: list[str]) -> None:
        self.forgotten.extend(image_ids)


class Sink:
    def __init__(self):
        self.accepted: list[Record] = []
        self.rejected: list[Record] = []

    async def add(self, records):
        self.accepted.extend(records)

    def add_rejected(self, records):
        self.rejected.extend(records)


def run(s, backend, **kw):
    sink = Sink()
    runner = JobRunner(s, backend, sink, [("sandbox", True), ("sandbox", True)], batch_size=4,
                       **kw)
    stats = asyncio.run(runner.run())
    return runner, sink, stats


def test_planner_uses_sources_in_order_and_records_fallback():
    s = spec()
    planner = SearchPlanner(s, [("a", True), ("b", True)])
    first = planner.next_task("cat")
    assert first.source == 0
    planner.failed(first, final=True)
    second = planner.next_task("cat")
    assert second.source == 0 and second.query != first.query
    planner.done(second, SearchPage([], has_more=False))
    third = planner.next_task("cat")
    assert third.source == 1
    assert planner.fallbacks == [{"label": "cat", "from": "a", "to": "b", "reason": "failing"}]


def test_runner_reaches_target_with_exact_accounting():
    pages = {(0, "q1"): ["http://h/u1.bad", "http://h/u2.ok", "http://h/u3.ok",
                         "http://h/u2.ok"],
             (0, "q2"): ["http://h/u4.ok", "http://h/u5.bad"],
             (1, "q1"): ["http://h/v1.ok", "http://h/v2.ok"], (1, "q2"): ["http://h/v3.ok"]}
    runner, sink, stats = run(spec(), ListBackend(pages))
    assert stats["accepted"] == 3 == len(sink.accepted)
    assert stats["accepted"] + stats["rejected"] == stats["candidates"]
    assert len(sink.rejected) == stats["rejected"]
    reasons = {r.reason for r in sink.rejected}
    assert reasons <= {"http_client_error", "duplicate_url", "over_target"}


def test_sources_dry_gives_shortfall_and_snapshot_counts_reasons():
    pages = {(0, "q1"): ["http://h/a.ok", "http://h/b.bad"], (1, "q2"): ["http://h/c.bad"]}
    runner, sink, stats = run(spec(), ListBackend(pages))
    assert stats["shortfall"] == {"cat": 2}
    snap = runner.ledger.snapshot()
    assert snap["rejected_by_reason"] == {"http_client_error": 2}
    assert snap["classes"]["cat"]["rejected_by_reason"] == {"http_client_error": 2}


def test_over_target_is_rejected_and_forgotten():
    ledger = JobLedger(spec(target=1))
    recs = [Record(Candidate(f"http://x/{i}.ok", "cat"), sha256=f"{i:064x}") for i in range(3)]
    accepted = ledger.settle(recs)
    assert len(accepted) == 1
    assert [r.reason for r in recs[1:]] == ["over_target", "over_target"]
    assert ledger.accepted == 1 and ledger.rejected == 2


def test_resume_skips_each_decided_candidate_once():
    s = spec(target=10)
    done = Candidate("http://h/u2.ok", "cat")
    state = ResumeState("j", manifest=[{"id": "i1", "label": "cat", "url": "http://h/u2.ok",
                                        "shard": 0}])
    pages = {(0, "q1"): ["http://h/u2.ok", "http://h/u3.ok", "http://h/u2.ok"],
             (0, "q2"): ["http://h/u4.ok"]}
    runner, sink, stats = run(s, ListBackend(pages), resume=state)
    assert done.key in {Candidate(m["url"], m["label"]).key for m in state.manifest}
    urls = [r.candidate.url for r in sink.accepted]
    assert "http://h/u2.ok" not in urls
    assert stats["classes"]["cat"]["accepted"] == 3
    dup = [r for r in sink.rejected if r.reason == "duplicate_url"]
    assert [r.candidate.url for r in dup] == ["http://h/u2.ok"]
    assert stats["accepted"] + stats["rejected"] == stats["candidates"]


def test_unreadable_source_falls_back_like_an_unavailable_engine():
    """A source that cannot be read (SourceError, not only EngineUnavailable) is given up on
    and the next source takes over, in both runners alike."""
    from builder.errors import SourceError

    class Unreadable(ListBackend):
        async def search(self, task: SearchTask) -> SearchPage:
            if task.source == 0:
                self.searches.append(task)
                raise SourceError("urls.csv: row 3 has no column 'url'")
            return await super().search(task)

    pages = {(1, "q1"): ["http://h/v1.ok", "http://h/v2.ok", "http://h/v3.ok"]}
    runner, sink, stats = run(spec(), Unreadable(pages))
    assert stats["accepted"] == 3
    assert {(f["from"], f["to"]) for f in runner.planner.fallbacks} == {("sandbox", "sandbox")}
    assert any("row 3" in e["error"] for e in runner.search_errors)


class CarelessJsonEngine(SearchEngine):
    """Parses canned JSON answers (query -> page -> body) trusting their types, as the web
    engines did before: wrong types raise KeyError/TypeError/... or make non-string hits."""

    name = "careless"

    def __init__(self, answers: dict[tuple[str, int], Any]):
        self.answers = answers

    def search(self, query: str, *, label: str, page: int, per_page: int) -> SearchPage:
        body = self.answers.get((query, page), {"results": []})
        hits = [SearchHit(url=r["url"], rank=i, license=r.get("license", "").strip())
                for i, r in enumerate(body["results"])]
        return SearchPage(hits, has_more=int(body.get("page_count", 0)) > page + 1)


class EngineBackend(ListBackend):
    """Searches source 0 with a real engine object, called like the local pipeline calls it."""

    def __init__(self, engine: SearchEngine, pages: dict[tuple[int, str], list[str]]):
        super().__init__(pages)
        self.engine = engine

    async def search(self, task: SearchTask) -> SearchPage:
        if task.source != 0:
            return await super().search(task)
        self.searches.append(task)
        return await asyncio.to_thread(self.engine.search, task.query, label=task.label,
                                       page=task.page, per_page=task.per_page)


def test_malformed_engine_answers_are_engine_errors_and_the_next_source_takes_over():
    """An answer of the wrong types (a number as license, a missing url) fails that search
    (retried, then given up on), not the job."""
    answers = {("q1", 0): {"results": [{"url": "http://h/a.ok", "license": 5}]},
               ("q2", 0): {"results": [{"title": "no url"}], "page_count": float("inf")}}
    pages = {(1, "q1"): ["http://h/v1.ok", "http://h/v2.bad", "http://h/v3.ok"],
             (1, "q2"): ["http://h/v4.ok"]}
    runner, sink, stats = run(spec(), EngineBackend(CarelessJsonEngine(answers), pages))
    assert stats["accepted"] == 3 == len(sink.accepted)
    assert stats["accepted"] + stats["rejected"] == stats["candidates"]
    assert len(sink.rejected) == stats["rejected"]
    assert all(r.candidate.engine == "sandbox" and isinstance(r.candidate.url, str)
               for r in sink.accepted + sink.rejected)
    errors = [e["error"] for e in runner.search_errors]
    assert errors and all(e.startswith("careless: malformed response:") for e in errors)
    assert {"label": "cat", "from": "sandbox", "to": "sandbox", "reason": "failing"} in \
        runner.planner.fallbacks


def test_non_string_urls_never_reach_the_url_checks():
    """Hits whose URL is a number, an object or null fail their search; good pages before
    them still count, and every admitted candidate is accounted for."""
    answers = {("q1", 0): {"results": [{"url": "http://h/a.ok"}, {"url": "http://h/b.bad"}],
                           "page_count": 3},
               ("q1", 1): {"results": [{"url": "http://h/c.ok"}, {"url": 12345}],
                           "page_count": 3},
               ("q2", 0): {"results": [{"url": None}]}}
    pages = {(1, "q1"): ["http://h/v1.ok", "http://h/v2.ok"]}
    runner, sink, stats = run(spec(), EngineBackend(CarelessJsonEngine(answers), pages))
    urls = sorted(r.candidate.url for r in sink.accepted + sink.rejected)
    assert "http://h/c.ok" not in urls  # its page failed as a whole
    assert {"http://h/a.ok", "http://h/b.bad"} <= set(urls)
    assert stats["accepted"] == 3
    assert stats["accepted"] + stats["rejected"] == stats["candidates"] == len(urls)
    assert any("SearchHit.url must be a str" in e["error"] for e in runner.search_errors)


def test_a_file_base_url_never_puts_a_server_file_into_search_errors():
    """The issue's read-any-file attack: ``options.base_url: file:///etc/passwd#`` once came back
    in the job's search_errors with the file's first lines. The engine refuses it unread."""
    from builder.engines import make_engine

    attack = parse_spec({"name": "t", "target": 2, "classes": {"cat": ["q1"]},
                         "sources": [{"engine": "wikimedia",
                                      "options": {"base_url": "file:///etc/passwd#"}},
                                     {"engine": "sandbox", "url": "http://127.0.0.1:2"}]})
    pages = {(1, "q1"): ["http://h/v1.ok", "http://h/v2.ok"]}
    runner, sink, stats = run(attack, EngineBackend(make_engine(attack.sources[0], attack), pages))
    errors = [e["error"] for e in runner.search_errors]
    assert errors and all("scheme 'file' (only http/https)" in e for e in errors)
    assert not any("root:" in e for e in errors)
    assert stats["accepted"] == 2
