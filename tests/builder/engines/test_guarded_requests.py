"""The engines' own requests go through the SSRF guard: http(s) only, public addresses only
(unless the spec allows private ones), every redirect hop vetted, error bodies quoted short.

Each test is an attack a spec could make through ``sources[].options.base_url`` or the sandbox
``url``; before the guard, urllib read ``file:`` URLs and reached 127.0.0.1.
"""

from __future__ import annotations

import logging
import socket

import pytest

from builder import netguard
from builder.engines import make_engine, webjson
from builder.engines.base import MAX_ERROR_CHARS, SearchEngine, SearchPage
from builder.engines.openverse import OpenverseEngine
from builder.errors import EngineError
from builder.netguard import UrlRejected, open_guarded
from builder.reasons import Reason
from builder.spec import parse_spec
from tests.builder.engines.fakes import FakeServer, Response, fake_images, openverse_handler

WEB_ENGINES = ("wikimedia", "openverse", "baidu", "sandbox")


def _source(engine: str, url: str) -> dict:
    if engine == "sandbox":
        return {"engine": "sandbox", "url": url}
    return {"engine": engine, "options": {"base_url": url}}


def _engine(engine: str, url: str, *, private: bool = False) -> SearchEngine:
    """The engine of a source asking ``url``, which the spec's own check (an http(s) URL with
    a host) may refuse: the source is made past it, as the engine must refuse it anyway."""
    spec = parse_spec({"name": "t", "classes": {"cat": None},
                       "sources": [_source(engine, "http://example.org")],
                       "download": {"timeout_s": 3, "allow_private_networks": private}})
    src = _source(engine, url)
    source = spec.sources[0].model_copy(update={k: v for k, v in src.items() if k != "engine"})
    return make_engine(source, spec)


def _search(engine: SearchEngine) -> SearchPage:
    return engine.search("cat", label="cat", page=0, per_page=5)


@pytest.mark.parametrize("engine", WEB_ENGINES)
@pytest.mark.parametrize("url", ["file:///etc/passwd#", "file:///etc/passwd",
                                 "ftp://127.0.0.1/etc/passwd",
                                 "data:text/plain;base64,c2VjcmV0LWRhdGE=#"])
def test_a_base_url_of_another_scheme_is_refused_unread(engine, url):
    with pytest.raises(EngineError) as info:
        _search(_engine(engine, url, private=True))
    message = str(info.value)
    assert not info.value.retryable
    assert "only http/https" in message
    assert "root:" not in message and "secret-data" not in message


@pytest.mark.parametrize("engine", WEB_ENGINES)
def test_a_loopback_base_url_is_refused_without_a_request(engine):
    """The issue's SSRF: an internal admin page on 127.0.0.1 behind a trailing '#'."""
    with FakeServer(lambda req: Response(200, {"secret": "internal-admin-data"})) as srv:
        with pytest.raises(EngineError) as info:
            _search(_engine(engine, f"{srv.url}/internal-admin#"))
    assert srv.requests == []
    assert not info.value.retryable
    assert "loopback" in str(info.value) and "internal-admin-data" not in str(info.value)


def test_a_host_name_resolving_to_loopback_is_refused_at_connect():
    """A name (not a literal IP) passes the URL check; the address it resolves to is what the
    guard checks, inside the connection."""
    with FakeServer(lambda req: Response(200, {"results": []})) as srv:
        with pytest.raises(EngineError, match="resolves only to blocked addresses") as info:
            _search(_engine("sandbox", f"http://localhost:{srv.port}"))
    assert srv.requests == [] and not info.value.retryable


def test_the_spec_can_allow_private_networks_as_for_the_fetcher():
    body = {"results": [{"url": "http://h/a.jpg"}], "has_more": False}
    with FakeServer(lambda req: Response(200, body)) as srv:
        page = _search(_engine("sandbox", f"http://localhost:{srv.port}", private=True))
    assert [h.url for h in page.hits] == ["http://h/a.jpg"]


def test_params_are_not_swallowed_by_a_fragment():
    with FakeServer(openverse_handler(fake_images(2))) as srv:
        page = _search(_engine("openverse", f"{srv.url}/v1/images/#", private=True))
    assert len(page.hits) == 2
    assert srv.requests[0].query["q"] == "cat"


def _public_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the connect check pass 127.0.0.1 (standing in for a public server, named
    public.example) while literal private addresses in URLs stay refused, so a redirect from a
    'public' host can be tested; private.example resolves to 10.0.0.1."""
    real = netguard.blocked_category
    monkeypatch.setattr(netguard, "blocked_category",
                        lambda addr: None if str(addr) == "127.0.0.1" else real(addr))
    real_getaddrinfo = socket.getaddrinfo
    names = {"public.example": "127.0.0.1", "private.example": "10.0.0.1"}
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **kw: real_getaddrinfo(
        names.get(host, host), *a, **kw))


@pytest.mark.parametrize("location,reason", [
    ("http://169.254.169.254/latest/meta-data/", Reason.BLOCKED_ADDRESS),
    ("http://[::1]/admin", Reason.BLOCKED_ADDRESS),
    ("file:///etc/passwd", Reason.UNSUPPORTED_SCHEME),
    ("ftp://public.example/x", Reason.UNSUPPORTED_SCHEME),
])
def test_every_redirect_hop_is_vetted(monkeypatch, location, reason):
    _public_loopback(monkeypatch)
    with FakeServer(lambda req: Response(302, b"", {"Location": location})) as srv:
        with pytest.raises(UrlRejected) as info:
            open_guarded(f"http://public.example:{srv.port}/search")
    assert info.value.reason == reason
    assert srv.paths() == ["/search"]


def test_a_redirect_to_a_name_resolving_to_a_private_address_is_refused_at_connect(
        monkeypatch):
    _public_loopback(monkeypatch)
    location = {"Location": "http://private.example/x"}
    with FakeServer(lambda req: Response(302, b"", location)) as srv:
        with pytest.raises(EngineError, match="private.example resolves only to blocked"):
            webjson.fetch(f"http://public.example:{srv.port}/search", engine="t")
    assert srv.paths() == ["/search"]


def test_redirect_loops_end_and_count_as_refused():
    with FakeServer(lambda req: Response(302, b"", {"Location": "/again"})) as srv:
        with pytest.raises(EngineError, match="more than 5 redirects") as info:
            webjson.fetch(f"{srv.url}/start", engine="t", allow_private_networks=True)
    assert len(srv.requests) == 6 and not info.value.retryable


def test_credentials_do_not_follow_a_redirect_to_another_origin():
    def handle(req):
        if req.path == "/first":
            return Response(302, b"", {"Location": f"http://localhost:{srv.port}/second"})
        if req.path == "/second":
            return Response(302, b"", {"Location": "/third"})
        return Response(200, {"ok": True})

    with FakeServer(handle) as srv:
        webjson.fetch(f"{srv.url}/first", engine="t", allow_private_networks=True,
                      headers={"Authorization": "Bearer tok", "X-Kept": "1"})
    auth = [(r.path, r.headers.get("authorization"), r.headers.get("x-kept"))
            for r in srv.requests]
    assert auth == [("/first", "Bearer tok", "1"), ("/second", None, "1"),
                    ("/third", None, "1")]


def test_a_same_origin_redirect_keeps_credentials():
    def handle(req):
        if req.path == "/v1/images":
            return Response(301, b"", {"Location": "/v1/images/"})
        return Response(200, {"results": []})

    with FakeServer(handle) as srv:
        webjson.fetch(f"{srv.url}/v1/images", engine="t", allow_private_networks=True,
                      headers={"Authorization": "Bearer tok"})
    assert [r.headers.get("authorization") for r in srv.requests] == ["Bearer tok"] * 2


def test_error_bodies_are_quoted_as_a_short_printable_excerpt():
    body = ("line one\n\x1b[31mred\x00" + "x" * 1_000_000).encode()
    with FakeServer(lambda req: Response(500, body, content_type="text/plain")) as srv:
        with pytest.raises(EngineError) as info:
            _search(_engine("wikimedia", f"{srv.url}/w/api.php", private=True))
    message = str(info.value)
    assert message.isprintable() and "line one ?[31mred?xxx" in message
    assert len(message) < 2 * webjson.MAX_EXCERPT_CHARS + 200
    assert info.value.status == 500 and info.value.retryable


def test_an_oversized_answer_is_refused(monkeypatch):
    monkeypatch.setattr(webjson, "MAX_ANSWER_BYTES", 100_000)
    with FakeServer(lambda req: Response(200, b"[" + b"1," * 100_000 + b"1]")) as srv:
        with pytest.raises(EngineError, match="over 100000 bytes") as info:
            _search(_engine("sandbox", srv.url, private=True))
    assert not info.value.retryable


def test_engine_error_messages_are_cut(monkeypatch):
    class Chatty(SearchEngine):
        name = "chatty"

        def search(self, query, *, label, page, per_page):
            raise EngineError("chatty: " + "y" * 50_000, status=503, retry_after=2.0)

    with pytest.raises(EngineError) as info:
        _search(Chatty())
    assert len(str(info.value)) == MAX_ERROR_CHARS + 1
    assert (info.value.status, info.value.retryable, info.value.retry_after) == (503, True, 2.0)


def test_the_servers_openverse_token_goes_only_to_openverse(monkeypatch, caplog):
    """OPENVERSE_TOKEN is the server's: a spec's base_url elsewhere is searched anonymously."""
    monkeypatch.setenv("OPENVERSE_TOKEN", "server-secret")
    assert OpenverseEngine().token == "server-secret"
    assert OpenverseEngine("https://api.openverse.org/v1/images/?x=1").token == "server-secret"
    with FakeServer(openverse_handler(fake_images(3))) as srv:
        with caplog.at_level(logging.WARNING, logger="builder.engines.openverse"):
            page = _search(_engine("openverse", f"{srv.url}/v1/images/", private=True))
    assert len(page.hits) == 3
    assert [r.headers.get("authorization") for r in srv.requests] == [None]
    assert "credentials are sent only to" in caplog.text
