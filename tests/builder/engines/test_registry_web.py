"""The web engines built from a dataset spec, as the planner builds them."""

from __future__ import annotations

import email.utils

import pytest

from builder.engines import make_engine
from builder.engines.google import GOOGLE_API, GoogleEngine
from builder.engines.webjson import parse_retry_after, redact
from builder.errors import EngineUnavailable, SourceError
from builder.spec import parse_spec
from tests.builder.engines.fakes import (
    FakeServer,
    baidu_handler,
    fake_images,
    google_handler,
    openverse_handler,
    wikimedia_handler,
)


def _spec(source: dict) -> object:
    return parse_spec({"name": "cats", "classes": {"cat": None}, "sources": [source],
                       "download": {"timeout_s": 3, "user_agent": "PixCrawlerTest/1",
                                    "allow_private_networks": True}})


@pytest.mark.parametrize("engine,path,handler", [
    ("wikimedia", "/w/api.php", wikimedia_handler),
    ("openverse", "/v1/images/", openverse_handler),
    ("baidu", "/search/acjson", baidu_handler),
])
def test_keyless_engines_from_a_spec_reach_their_base_url(engine, path, handler,
                                                          monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OPENVERSE_TOKEN", raising=False)
    images = fake_images(4)
    with FakeServer(handler(images)) as srv:
        spec = _spec({"engine": engine, "options": {"base_url": srv.url + path,
                                                    "original": True}})
        eng = make_engine(spec.sources[0], spec)
        page = eng.search("cat", label="cat", page=0, per_page=4)
    assert eng.name == engine
    assert [h.url for h in page.hits] == [img["url"] for img in images]
    assert srv.requests[0].headers["user-agent"] == "PixCrawlerTest/1"


def test_google_from_a_spec(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GOOGLE_API_KEY", "k")
    monkeypatch.setenv("GOOGLE_CSE_ID", "c")
    spec = _spec({"engine": "google", "safesearch": "off", "region": "de-de",
                  "options": {"imgType": "photo", "bogus": "x"}})
    eng = make_engine(spec.sources[0], spec)
    assert (eng.base_url, eng.api_key, eng.cse_id) == (GOOGLE_API, "k", "c")
    assert (eng.safesearch, eng.country, eng.filters) == ("off", "de", {"imgType": "photo"})
    assert eng.allow_private_networks and eng.user_agent == "PixCrawlerTest/1"


def test_a_spec_base_url_never_receives_the_servers_google_key(monkeypatch):
    """The key comes from the server's environment, the base_url from whoever wrote the spec:
    a base_url that is not Google's API makes the engine unavailable before any request."""
    monkeypatch.setenv("GOOGLE_API_KEY", "server-secret")
    monkeypatch.setenv("GOOGLE_CSE_ID", "c")
    with FakeServer(google_handler(fake_images(3), key="server-secret", cx="c")) as srv:
        spec = _spec({"engine": "google", "options": {"base_url": srv.url + "/customsearch/v1"}})
        with pytest.raises(EngineUnavailable, match="sent only there"):
            make_engine(spec.sources[0], spec).search("cat", label="cat", page=0, per_page=3)
    assert srv.requests == []


def test_google_without_credentials_is_unavailable(monkeypatch: pytest.MonkeyPatch):
    for name in ("GOOGLE_API_KEY", "GOOGLE_CSE_KEY", "GOOGLE_CSE_ID"):
        monkeypatch.delenv(name, raising=False)
    spec = _spec({"engine": "google"})
    with pytest.raises(EngineUnavailable, match="GOOGLE_API_KEY"):
        make_engine(spec.sources[0], spec)


def test_ddgs_engines_are_built_with_spec_settings():
    spec = _spec({"engine": "duckduckgo", "region": "fr-fr", "safesearch": "on",
                  "options": {"layout": "Wide", "rate": 2}})
    eng = make_engine(spec.sources[0], spec)
    assert (eng.name, eng.region, eng.safesearch, eng.filters) == \
        ("duckduckgo", "fr-fr", "on", {"layout": "Wide"})
    bing = _spec({"engine": "bing"})
    assert make_engine(bing.sources[0], bing).backend == "bing"


@pytest.mark.parametrize("options", [
    {"timeout_s": ".inf"}, {"timeout_s": 10_000}, {"timeout_s": 0},
    {"timeout_s": "soon"}, {"timeout_s": True}, {"thumb_width": 12.5},
    {"thumb_width": "1e999"}, {"thumb_width": 5},
])
def test_bad_numeric_options_are_source_errors_naming_the_option(options):
    """sources[].options is free-form in the spec: numbers are checked when the engine is
    built (at planning), not left to fail or hang inside a request."""
    spec = _spec({"engine": "wikimedia", "options": options})
    with pytest.raises(SourceError, match=f"options.{next(iter(options))} must be"):
        make_engine(spec.sources[0], spec)


def test_numeric_options_in_range_are_used():
    spec = _spec({"engine": "wikimedia", "options": {"timeout_s": "7.5", "thumb_width": 640.0}})
    eng = make_engine(spec.sources[0], spec)
    assert eng.timeout_s == 7.5 and eng.thumb_width == 640


def test_retry_after_parsing_and_secret_redaction():
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after(date, now=1_000_000) == pytest.approx(30.0)
    assert redact("https://x/v1?key=SECRET&q=cat") == "https://x/v1?key=***&q=cat"
    # Google's search engine id is the operator's too: with it anyone can search the
    # operator's configured engine
    assert redact("https://g/v1?key=K&cx=0175:abc&q=cat") == "https://g/v1?key=***&cx=***&q=cat"


JUNK = {"results": "x", "data": 5, "items": {"a": 1}, "query": [], "continue": "no",
        "page_count": "many", "listNum": "lots", "error": None}


@pytest.mark.parametrize("engine,path", [
    ("wikimedia", "/w/api.php"), ("openverse", "/v1/images/"), ("baidu", "/search/acjson"),
    ("google", "/customsearch/v1"),
])
def test_malformed_answers_give_an_empty_page_or_an_engine_error(engine, path):
    """Junk inside an object gives an empty page or a retryable EngineError; an answer that is
    not a JSON object at all is always a retryable EngineError."""
    from builder.errors import EngineError
    from tests.builder.engines.fakes import Response

    for body in (JUNK, [1, 2], "null"):
        with FakeServer(lambda req, body=body: Response(200, body)) as srv:
            if engine == "google":  # a key for a base_url other than Google's is given with it
                engine_ = GoogleEngine(srv.url + path, api_key="k", cse_id="c",
                                       allow_private_networks=True)
            else:
                spec = _spec({"engine": engine, "options": {"base_url": srv.url + path}})
                engine_ = make_engine(spec.sources[0], spec)
            if body is JUNK:
                try:
                    page = engine_.search("cat", label="cat", page=0, per_page=5)
                except EngineError as exc:
                    assert exc.retryable, exc
                else:
                    assert page.hits == [] and not page.has_more
                continue
            with pytest.raises(EngineError) as info:
                engine_.search("cat", label="cat", page=0, per_page=5)
            assert info.value.retryable
