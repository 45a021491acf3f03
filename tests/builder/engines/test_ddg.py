"""DuckDuckGo and Bing through the real ddgs package, its HTTP routed to local fakes."""

from __future__ import annotations

import html

import pytest

from builder.engines.ddg import BingImagesEngine, DdgsImagesEngine
from builder.errors import EngineError, EngineUnavailable, SourceError
from tests.builder.engines.fakes import (
    DDG_VQD,
    FakeServer,
    Response,
    bing_handler,
    ddg_handler,
    fake_images,
    route_ddgs,
)


@pytest.fixture
def ddg(monkeypatch: pytest.MonkeyPatch):
    images = fake_images(250)
    with FakeServer(ddg_handler(images)) as srv:
        refused = route_ddgs(monkeypatch, srv.url)
        yield srv, images
    assert not refused, f"ddgs tried to leave the machine: {refused}"


def test_duckduckgo_maps_results_and_sends_safesearch_and_filters(ddg):
    srv, images = ddg
    engine = DdgsImagesEngine(region="de-de", safesearch="off",
                              filters={"size": "Large", "type_image": "photo"})
    page = engine.search("cat", label="cat", page=0, per_page=10)
    assert [h.url for h in page.hits] == [img["url"] for img in images[:10]]
    hit = page.hits[4]
    assert (hit.rank, hit.page_url, hit.title) == (4, images[4]["page_url"], "Cat number 4")
    assert page.has_more
    token_fetch, search = srv.requests
    assert token_fetch.path == "/" and token_fetch.query["q"] == "cat"
    assert search.path == "/i.js"
    assert search.query["vqd"] == DDG_VQD and search.query["l"] == "de-de"
    assert search.query["p"] == "-1"  # safesearch off
    assert "size:Large" in search.query["f"] and "type:photo" in search.query["f"]


def test_duckduckgo_pages_through_backend_pages_and_caches_them(ddg):
    srv, images = ddg
    engine = DdgsImagesEngine()
    pages = [engine.search("cat", label="cat", page=p, per_page=60) for p in range(5)]
    assert [len(p.hits) for p in pages] == [60, 60, 60, 60, 10]
    assert [p.has_more for p in pages] == [True, True, True, True, False]
    assert [h.url for p in pages for h in p.hits] == [img["url"] for img in images]
    assert [h.rank for h in pages[4].hits] == list(range(240, 250))
    offsets = [r.query.get("s", "0") for r in srv.requests if r.path == "/i.js"]
    assert offsets == ["0", "100", "200", "300"]  # each backend page fetched once
    again = engine.search("cat", label="cat", page=1, per_page=60)
    assert [h.url for h in again.hits] == [h.url for h in pages[1].hits]
    assert len([r for r in srv.requests if r.path == "/i.js"]) == 4
    # what the rate limiter charges: every request, the token pages included
    assert sum(p.requests for p in pages + [again]) == len(srv.requests)
    assert [p.requests for p in pages] == [2, 2, 0, 2, 2] and again.requests == 0


def test_an_engine_keeps_the_hits_of_its_latest_queries_only(ddg, monkeypatch):
    """Every query's hits were kept for the whole job: thousands of queries held about a
    gigabyte in each worker. The least recently searched go past HITS_KEPT, and a query
    asked again starts over."""
    from builder.engines import ddg as ddg_mod

    srv, _ = ddg
    monkeypatch.setattr(ddg_mod, "HITS_KEPT", 200)  # two queries' first backend pages
    engine = DdgsImagesEngine()
    for query in ("cat", "dog", "cat", "fox"):
        engine.search(query, label="x", page=0, per_page=10)
    assert list(engine._cache) == ["cat", "fox"]  # dog, searched least lately, went
    searched = [r.query["q"] for r in srv.requests if r.path == "/"]
    assert searched == ["cat", "dog", "fox"]  # cat's second search was from its hits
    engine.search("dog", label="x", page=0, per_page=10)
    assert [r.query["q"] for r in srv.requests if r.path == "/"][-1] == "dog"


def test_searches_on_several_threads_share_the_engine_safely(ddg, monkeypatch):
    """A worker's units search on threads of their own: summing the cache's hits while
    another thread changed it raised "OrderedDict mutated during iteration" out of a unit,
    and stopped the run."""
    import threading

    from builder.engines import ddg as ddg_mod

    engine = DdgsImagesEngine()
    failures: list[BaseException] = []

    def searches(n: int) -> None:
        try:
            for i in range(40):
                engine.search(f"q{n}-{i % 7}", label="x", page=i % 2, per_page=10)
        except BaseException as exc:  # noqa: BLE001 - the test reports any
            failures.append(exc)

    monkeypatch.setattr(ddg_mod, "HITS_KEPT", 300)  # evictions all along
    threads = [threading.Thread(target=searches, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert engine._kept == sum(s.counted for s in engine._cache.values())
    assert engine._kept <= 300 + 100


def test_duckduckgo_no_results_is_an_empty_last_page(monkeypatch: pytest.MonkeyPatch):
    with FakeServer(ddg_handler([])) as srv:
        refused = route_ddgs(monkeypatch, srv.url)
        page = DdgsImagesEngine().search("zzzz", label="z", page=0, per_page=10)
    assert page.hits == [] and not page.has_more and not refused


def test_duckduckgo_blocked_token_page_is_retryable(ddg):
    srv, _ = ddg
    srv.fail_next(status=403, body=b"<html>blocked</html>", content_type="text/html")
    with pytest.raises(EngineError) as info:
        DdgsImagesEngine().search("cat", label="cat", page=0, per_page=10)
    assert info.value.retryable and "vqd" in str(info.value)


@pytest.mark.parametrize("status,retryable,heard", [
    (403, False, 403), (429, True, 429), (503, True, 503), (400, True, 429), (418, True, 429)])
def test_duckduckgo_refused_results_page_is_an_engine_error_not_no_results(ddg, status,
                                                                         retryable, heard):
    """ddgs itself answers a refused i.js page with "No results found.", which ended the
    query as if DuckDuckGo had nothing more; the query stays open for the next try. A 400
    or 418 is its rate limit too (ddgs' own check reads them so): the governor hears a 429,
    which slows the pace, where a 400 would be the job's own request."""
    srv, images = ddg
    engine = DdgsImagesEngine()
    fake = srv.handler

    def refuse_once(req, state={"refused": False}):
        if req.path == "/i.js" and not state["refused"]:
            state["refused"] = True
            return Response(status, b"<html>Too many requests from you</html>", {},
                            "text/html")
        return fake(req)

    srv.handler = refuse_once
    with pytest.raises(EngineError) as info:
        engine.search("cat", label="cat", page=0, per_page=10)
    assert info.value.status == heard and info.value.retryable is retryable
    assert f"HTTP {status}" in str(info.value) and "Too many requests" in str(info.value)
    page = engine.search("cat", label="cat", page=0, per_page=10)
    assert [h.url for h in page.hits] == [img["url"] for img in images[:10]] and page.has_more


def test_bing_refused_page_is_an_engine_error_not_no_results(monkeypatch: pytest.MonkeyPatch):
    with FakeServer(bing_handler(fake_images(50))) as srv:
        refused = route_ddgs(monkeypatch, srv.url)
        srv.fail_next(status=429, body=b"", content_type="text/html")
        with pytest.raises(EngineError) as info:
            BingImagesEngine().search("cat", label="cat", page=0, per_page=30)
    assert info.value.status == 429 and info.value.retryable and not refused


# Bing's bot check, as a challenged search embeds it and as the challenge page itself (reached
# through a redirect, which ddgs' HTTP client follows): both answered with HTTP 200.
BING_CHALLENGE_PAGES = {
    "embedded": '<!DOCTYPE html><html><head><title>cat - Bing</title></head><body>'
                '<div id="b_content"><h1>One last step</h1><p>Please solve the challenge below to '
                'continue</p><iframe id="b_captcha" src="/turing/captcha/challenge?q=cat&amp;'
                'iframeid=local-gen-1" frameborder="0"></iframe></div></body></html>',
    "challenge page": '<!DOCTYPE html><html><head><script src="https://challenges.cloudflare.'
                      'com/turnstile/v0/api.js" async defer></script></head><body>'
                      '<form id="challenge" method="post" action="/challenge/verify">'
                      '<div class="cf-turnstile" data-sitekey="0x4AAA"></div></form>'
                      "</body></html>",
}


@pytest.mark.parametrize("kind", sorted(BING_CHALLENGE_PAGES))
def test_bing_captcha_page_with_status_200_is_an_engine_error_not_no_results(
        kind, monkeypatch: pytest.MonkeyPatch):
    """ddgs finds no results in Bing's bot check and answered it as "no results", which ended
    the query; it is a retryable error (Bing's rate limit) and the query stays open."""
    images = fake_images(50)
    with FakeServer(bing_handler(images)) as srv:
        refused = route_ddgs(monkeypatch, srv.url)
        engine = BingImagesEngine()
        srv.fail_next(status=200, body=BING_CHALLENGE_PAGES[kind],
                      content_type="text/html; charset=utf-8")
        with pytest.raises(EngineError) as info:
            engine.search("cat", label="cat", page=0, per_page=30)
        page = engine.search("cat", label="cat", page=0, per_page=30)
    assert info.value.retryable and info.value.status == 429 and not refused
    message = str(info.value)
    assert "bot check" in message and "another engine" in message and "wait" in message
    assert [r.query["first"] for r in srv.requests] == ["1", "1"]  # the same page, asked again
    assert [h.url for h in page.hits] == [img["url"] for img in images[:30]] and page.has_more


def test_a_backend_redirect_to_another_host_is_refused_not_followed(
        monkeypatch: pytest.MonkeyPatch):
    """ddgs' client followed any redirect, past the checks every other engine's requests
    pass: a results page sent to a loopback service had that service's answer quoted in the
    job's search errors."""
    with FakeServer(lambda req: Response(403, "INTERNAL SECRET", content_type="text/plain")
                    ) as internal, FakeServer(bing_handler(fake_images(50))) as srv:
        refused = route_ddgs(monkeypatch, srv.url)
        srv.fail_next(status=302, headers={"Location": internal.url + "/latest/meta-data"},
                      content_type="text/html")
        with pytest.raises(EngineError) as info:
            BingImagesEngine().search("cat", label="cat", page=0, per_page=30)
    assert internal.requests == [] and not refused
    assert "302" in str(info.value) and "not followed" in str(info.value)
    assert "SECRET" not in str(info.value)


def test_a_backend_redirect_within_its_site_is_followed(monkeypatch: pytest.MonkeyPatch):
    """Bing sends a challenged search to its bot check by a redirect on its own site: that
    page is still read (and found to be the bot check)."""
    with FakeServer(bing_handler(fake_images(50))) as srv:
        refused = route_ddgs(monkeypatch, srv.url)
        srv.fail_next(status=302, headers={"Location": "/turing/captcha/challenge?q=cat"},
                      content_type="text/html")
        srv.fail_next(status=200, body=BING_CHALLENGE_PAGES["challenge page"],
                      content_type="text/html; charset=utf-8")
        with pytest.raises(EngineError, match="bot check") as info:
            BingImagesEngine().search("cat", label="cat", page=0, per_page=30)
    assert info.value.status == 429 and not refused
    assert srv.paths() == ["/images/async", "/turing/captcha/challenge"]
    assert srv.requests[1].query == {"q": "cat"}


def test_bing_genuine_empty_page_is_still_no_results(monkeypatch: pytest.MonkeyPatch):
    """The bot-check markers are specific: an empty results page, even for a query about
    captchas that Bing echoes back, ends the query as before."""
    def empty(req):
        query = html.escape(req.query.get("q", ""))
        return Response(200, f'<div class="dg_nores">There are no results for <strong>{query}'
                             '</strong></div><ul class="dgControl_list"></ul>',
                        content_type="text/html; charset=utf-8")

    with FakeServer(empty) as srv:
        refused = route_ddgs(monkeypatch, srv.url)
        page = BingImagesEngine().search("bing captcha challenge verify", label="c", page=0,
                                         per_page=30)
    assert page.hits == [] and not page.has_more and not refused
    assert len(srv.requests) == 1


def test_duckduckgo_connection_failure_is_retryable(monkeypatch: pytest.MonkeyPatch):
    from tests.builder.engines.fakes import closed_port

    refused = route_ddgs(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(EngineError) as info:
        DdgsImagesEngine(timeout_s=2).search("cat", label="cat", page=0, per_page=10)
    assert info.value.retryable and not refused


def test_unknown_filter_is_refused():
    with pytest.raises(SourceError, match="valid: size, color"):
        DdgsImagesEngine(filters={"colour": "red"})


def test_bing_maps_results_and_pages(monkeypatch: pytest.MonkeyPatch):
    images = fake_images(50)
    with FakeServer(bing_handler(images)) as srv:
        refused = route_ddgs(monkeypatch, srv.url)
        engine = BingImagesEngine()
        first = engine.search("cat", label="cat", page=0, per_page=30)
        second = engine.search("cat", label="cat", page=1, per_page=30)
    assert not refused
    assert [h.url for h in first.hits + second.hits] == [img["url"] for img in images]
    hit = first.hits[7]
    assert (hit.rank, hit.page_url, hit.title) == (7, images[7]["page_url"], "Cat number 7")
    assert first.has_more and not second.has_more
    firsts = [r.query["first"] for r in srv.requests]
    assert firsts[:2] == ["1", "36"]
    assert all(r.path == "/images/async" for r in srv.requests)


def test_duckduckgo_timeout_is_retryable(monkeypatch: pytest.MonkeyPatch):
    import threading

    release = threading.Event()
    fast = ddg_handler(fake_images(5))

    def slow(req):
        release.wait(5)
        return fast(req)

    with FakeServer(slow) as srv:
        refused = route_ddgs(monkeypatch, srv.url)
        try:
            with pytest.raises(EngineError, match="timed out") as info:
                DdgsImagesEngine(timeout_s=1).search("cat", label="cat", page=0, per_page=5)
        finally:
            release.set()
    assert info.value.retryable and not refused


@pytest.mark.parametrize("results", [[{"image": 5, "title": ["t"]}], ["junk"], 7])
def test_duckduckgo_answer_of_the_wrong_types_is_a_retryable_engine_error(
        results, monkeypatch: pytest.MonkeyPatch):
    fake = ddg_handler(fake_images(3))

    def handle(req):
        if req.path == "/i.js":
            return Response(200, {"results": results})
        return fake(req)

    with FakeServer(handle) as srv:
        refused = route_ddgs(monkeypatch, srv.url)
        with pytest.raises(EngineError) as info:
            DdgsImagesEngine().search("cat", label="cat", page=0, per_page=10)
    assert info.value.retryable and not refused


def test_junk_from_ddgs_is_dropped_and_good_results_kept(monkeypatch: pytest.MonkeyPatch):
    from types import SimpleNamespace as Result

    engine = DdgsImagesEngine(max_backend_pages=1)
    junk = [Result(image=5), Result(image={"a": 1}), Result(image=None), "junk", None,
            Result(image="https://a.example/x.jpg", title=["t"], url=5),
            Result(image="https://a.example/y.jpg", title=7, url="https://p.example/y")]
    monkeypatch.setattr(engine._backend, "search", lambda *a, **kw: junk)
    page = engine.search("cat", label="cat", page=0, per_page=10)
    assert [(h.url, h.rank, h.page_url, h.title) for h in page.hits] == \
        [("https://a.example/x.jpg", 0, "", ""),
         ("https://a.example/y.jpg", 1, "https://p.example/y", "7")]
    assert not page.has_more


def test_bing_on_a_ddgs_without_its_backend_is_refused_not_swapped(
        monkeypatch: pytest.MonkeyPatch):
    # ddgs < 9.13 has no Bing images backend and would quietly search DuckDuckGo instead
    from ddgs.engines import ENGINES

    monkeypatch.setitem(ENGINES, "images", {k: v for k, v in ENGINES["images"].items()
                                            if k != "bing"})
    with pytest.raises(EngineUnavailable) as info:
        BingImagesEngine()
    message = str(info.value)
    assert "no 'bing' images backend" in message and "ddgs>=9.13" in message
    DdgsImagesEngine()  # DuckDuckGo's backend is there: no complaint
