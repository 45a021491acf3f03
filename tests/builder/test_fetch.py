"""The fetcher against a real aiohttp server on 127.0.0.1 (in a background thread)."""

from __future__ import annotations

import asyncio
import gzip
import io
import logging
import socket
import threading
import time
import zlib
from collections import defaultdict
from typing import Any, Optional

import pytest
from aiohttp import web
from PIL import Image
from yarl import URL

from builder import fetch
from builder.fetch import Fetcher, fetch_all, parse_retry_after
from builder.reasons import TRANSIENT_REASONS, Reason
from builder.records import Candidate, Record
from builder.spec import DownloadSpec, SignalsSpec


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


JPEG = _jpeg()
HTML = b"<!DOCTYPE html><html><body>not found</body></html>"
STREAM_TOTAL = 64 * 1024 * 1024
STREAM_CHUNK = 16 * 1024


class State:
    """What the server saw; handlers write it (on the server thread), tests read it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.hits: dict[str, int] = defaultdict(int)
        self.times: dict[str, list[float]] = defaultdict(list)
        self.in_flight = 0
        self.max_in_flight = 0
        self.stream_sent = 0
        self.stream_disconnected = False
        # none (404) | rules | error (500) | crawl_delay | bad_numbers
        self.robots_mode = "none"

    def hit(self, key: str) -> int:
        with self.lock:
            self.hits[key] += 1
            self.times[key].append(time.monotonic())
            return self.hits[key]


def make_app(state: State) -> web.Application:
    routes = web.RouteTableDef()

    def image(**headers: str) -> web.Response:
        return web.Response(body=JPEG, content_type="image/jpeg", headers=headers)

    @routes.get("/robots.txt")
    async def robots(request: web.Request) -> web.Response:
        state.hit("robots")
        await asyncio.sleep(0.2)  # so that concurrent first requests overlap the fetch
        if state.robots_mode == "rules":
            return web.Response(text="User-agent: *\nDisallow: /all-private/\n\n"
                                     "User-agent: PixCrawler\nDisallow: /private/\n")
        if state.robots_mode == "crawl_delay":
            return web.Response(text="User-agent: PixCrawler\nCrawl-delay: 1\n")
        if state.robots_mode == "bad_numbers":
            return web.Response(text="User-agent: *\nCrawl-delay: \u00b2\nRequest-rate: \u00b9/5\n"
                                     "Disallow: /private/\n")
        if state.robots_mode == "error":
            return web.Response(status=500)
        if state.robots_mode == "slow_hops":
            return web.Response(status=302, headers={"Location": "/robots-hop/0"})
        if state.robots_mode == "redirect_nowhere":
            return web.Response(status=302)
        if state.robots_mode == "flaky" and state.hits["robots"] == 1:
            return web.Response(status=503)
        if state.robots_mode == "flaky":
            return web.Response(text="User-agent: *\nDisallow: /private/\n")
        if state.robots_mode in ("gzip", "deflate", "br"):
            # a server that compresses although the fetcher asked for identity
            raw = b"User-agent: *\nDisallow: /private/\n"
            body = {"gzip": gzip.compress(raw), "deflate": zlib.compress(raw),
                    "br": b"\x0b\x02\x80garbage"}[state.robots_mode]
            return web.Response(body=body, headers={"Content-Encoding": state.robots_mode,
                                                    "Content-Type": "text/plain"})
        return web.Response(status=404)

    @routes.get("/img.jpg")
    async def img(request: web.Request) -> web.Response:
        state.hit("img")
        return image()

    @routes.get("/private/img.jpg")
    async def private(request: web.Request) -> web.Response:
        state.hit("private")
        return image()

    @routes.get("/octet.bin")
    async def octet(request: web.Request) -> web.Response:
        return web.Response(body=JPEG, content_type="application/octet-stream")

    @routes.get("/html.jpg")
    async def html(request: web.Request) -> web.Response:
        return web.Response(body=HTML, content_type="image/jpeg")

    @routes.get("/status/{code}")
    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        state.hit(f"status{code}")
        return web.Response(status=code, text="no")

    @routes.get("/cut-once/{key}")
    async def cut_once(request: web.Request) -> web.StreamResponse:
        """The whole image, with opt-out headers; the first time cut off mid-body."""
        headers = {"X-Robots-Tag": "all", "tdm-reservation": "0"}
        if state.hit("cut" + request.match_info["key"]) > 1:
            return image(**headers)
        resp = web.StreamResponse(headers={**headers, "Content-Type": "image/jpeg",
                                           "Content-Length": str(len(JPEG))})
        await resp.prepare(request)
        await resp.write(JPEG[:len(JPEG) // 2])
        assert request.transport is not None
        request.transport.close()
        return resp

    @routes.get("/flaky/{key}")
    async def flaky(request: web.Request) -> web.Response:
        if state.hit("flaky" + request.match_info["key"]) == 1:
            return web.Response(status=500)
        return image()

    @routes.get("/ratelimited/{key}/{after}")
    async def ratelimited(request: web.Request) -> web.Response:
        if state.hit("rl" + request.match_info["key"]) == 1:
            return web.Response(status=429, headers={"Retry-After": request.match_info["after"]})
        return image()

    @routes.get("/always429")
    async def always429(request: web.Request) -> web.Response:
        state.hit("always429")
        return web.Response(status=429, headers={"Retry-After": "0"})

    @routes.get("/hop/{n}")
    async def hop(request: web.Request) -> web.Response:
        """A slow answer that sends the client on to another URL, for ever."""
        n = int(request.match_info["n"])
        state.hit("hop")
        await asyncio.sleep(0.25)
        return web.Response(status=302, headers={"Location": f"/hop/{n + 1}"})

    @routes.get("/robots-hop/{n}")
    async def robots_hop(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        state.hit("robots_hop")
        await asyncio.sleep(0.3)
        if n >= 4:
            return web.Response(text="User-agent: *\nDisallow: /private/\n")
        return web.Response(status=302, headers={"Location": f"/robots-hop/{n + 1}"})

    @routes.get("/img-50ms.jpg")
    async def img_50ms(request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)
        return image()

    @routes.get("/slow")
    async def slow(request: web.Request) -> web.Response:
        state.hit("slow")
        await asyncio.sleep(1.0)
        return image()

    @routes.get("/stream-big")
    async def stream_big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        chunk = JPEG + b"\0" * (STREAM_CHUNK - len(JPEG))
        try:
            while state.stream_sent < STREAM_TOTAL:
                await resp.write(chunk)
                state.stream_sent += len(chunk)
        except (ConnectionError, OSError):
            state.stream_disconnected = True
            return resp
        await resp.write_eof()
        return resp

    @routes.get("/big-cl")
    async def big_cl(request: web.Request) -> web.Response:
        return web.Response(body=JPEG + b"\0" * 300_000, content_type="image/jpeg")

    @routes.get("/redirect/{n}")
    async def redirect(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        target = "/img.jpg" if n <= 1 else f"/redirect/{n - 1}"
        raise web.HTTPFound(target)

    @routes.get("/loop-a")
    async def loop_a(request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop-b")

    @routes.get("/loop-b")
    async def loop_b(request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently("/loop-a")

    @routes.get("/to-ftp")
    async def to_ftp(request: web.Request) -> web.Response:
        raise web.HTTPFound("ftp://example.com/a.jpg")

    @routes.get("/to-private")
    async def to_private(request: web.Request) -> web.Response:
        raise web.HTTPFound("/private/img.jpg")

    @routes.get("/optout/{tag}")
    async def optout(request: web.Request) -> web.Response:
        return image(**{"X-Robots-Tag": request.match_info["tag"]})

    @routes.get("/conc/{i}")
    async def conc(request: web.Request) -> web.Response:
        with state.lock:
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            await asyncio.sleep(0.05)
        finally:
            with state.lock:
                state.in_flight -= 1
        return image()

    @routes.get("/bare429/{i}")
    async def bare429(request: web.Request) -> web.Response:
        state.hit("bare429")
        return web.Response(status=429)  # no Retry-After

    @routes.get("/ts/{i}")
    async def ts(request: web.Request) -> web.Response:
        state.hit("ts")
        return image()

    app = web.Application()
    app.add_routes(routes)
    return app


class ThreadServer:
    """An aiohttp app on 127.0.0.1:<free port>, served by its own loop in a daemon thread."""

    def __init__(self, app: web.Application):
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._runner: Optional[web.AppRunner] = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        self.loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = self._runner.addresses[0][1]
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> "ThreadServer":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("test server did not start")
        return self

    def stop(self) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def server() -> Any:
    state = State()
    srv = ThreadServer(make_app(state)).start()
    srv.state = state  # type: ignore[attr-defined]
    yield srv
    srv.stop()


@pytest.fixture()
def srv(server: Any) -> Any:
    server.state.reset()
    return server


NO_ORIGIN_SIGNALS = SignalsSpec(tdmrep=False, content_usage=False, content_signal=False,
                                ai_txt=False)
"""The opt-out signals that cost requests per origin (tests/builder/test_signals.py covers them),
off here so these tests count only the requests they make."""


def cfg(**kw: Any) -> DownloadSpec:
    base = dict(timeout_s=5.0, retries=2, backoff_s=0.01, allow_private_networks=True,
                respect_robots=False, signals=NO_ORIGIN_SIGNALS)
    base.update(kw)
    return DownloadSpec(**base)


def rec(url: str) -> Record:
    return Record(Candidate(url=url, label="x"))


def run_fetch(urls: list[str], config: DownloadSpec) -> tuple[list[Record], dict[str, Any]]:
    async def main() -> tuple[list[Record], dict[str, Any]]:
        async with Fetcher(config) as fetcher:
            out = await fetcher.fetch_many([rec(u) for u in urls])
            return out, fetcher.stats

    return asyncio.run(main())


def one(url: str, config: DownloadSpec) -> Record:
    return run_fetch([url], config)[0][0]


def base(srv: Any, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{srv.port}"


# ---- success and content ----------------------------------------------------------------------


def test_image_ok_fills_record(srv: Any) -> None:
    r = one(base(srv) + "/img.jpg", cfg())
    assert not r.rejected, r.detail
    assert r.data == JPEG
    assert r.format == "jpeg"
    assert r.http_status == 200
    assert r.content_type == "image/jpeg"
    assert r.final_url == base(srv) + "/img.jpg"
    assert r.fetch_ms > 0


def test_user_agent_is_sent(srv: Any) -> None:
    seen: list[str] = []

    async def ua(request: web.Request) -> web.Response:
        seen.append(request.headers.get("User-Agent", ""))
        return web.Response(body=JPEG)

    app = web.Application()
    app.router.add_get("/ua", ua)
    other = ThreadServer(app).start()
    try:
        r = one(f"http://127.0.0.1:{other.port}/ua", cfg())
    finally:
        other.stop()
    assert not r.rejected
    assert seen and "PixCrawler" in seen[0] and "http" in seen[0]


def test_format_from_bytes_not_header(srv: Any) -> None:
    html, octet = run_fetch([base(srv) + "/html.jpg", base(srv) + "/octet.bin"], cfg())[0]
    assert html.rejected and html.reason == Reason.NOT_AN_IMAGE.value
    assert "image/jpeg" in html.detail and html.data is None
    assert not octet.rejected and octet.format == "jpeg"
    assert octet.content_type == "application/octet-stream"


def test_fetch_all_sync_helper_keeps_order(srv: Any) -> None:
    urls = [base(srv) + "/img.jpg", base(srv) + "/status/404", base(srv) + "/img.jpg"]
    out = fetch_all([rec(u) for u in urls], cfg())
    assert [r.candidate.url for r in out] == urls
    assert [r.rejected for r in out] == [False, True, False]


def test_single_fetch_and_mixed_batch(srv: Any) -> None:
    async def main() -> tuple[Record, list[Record]]:
        async with Fetcher(cfg(allow_private_networks=True)) as fetcher:
            single = await fetcher.fetch(rec(base(srv) + "/img.jpg"))
            batch = [rec(u) for u in (base(srv) + "/img.jpg", "ftp://x/y", "not a url",
                                      base(srv, "localhost") + "/img.jpg",
                                      base(srv) + "/status/404")]
            return single, await fetcher.fetch_many(batch)

    single, batch = asyncio.run(main())
    assert not single.rejected and single.data == JPEG
    assert [r.reason for r in batch] == ["", Reason.UNSUPPORTED_SCHEME.value,
                                         Reason.INVALID_URL.value, "",
                                         Reason.HTTP_CLIENT_ERROR.value]


# ---- HTTP errors and retries ------------------------------------------------------------------


def test_404_is_client_error_not_retried(srv: Any) -> None:
    r = one(base(srv) + "/status/404", cfg())
    assert r.reason == Reason.HTTP_CLIENT_ERROR.value
    assert "404" in r.detail and r.http_status == 404
    assert srv.state.hits["status404"] == 1


def test_500_then_success_is_retried(srv: Any) -> None:
    (r,), stats = run_fetch([base(srv) + "/flaky/a"], cfg())
    assert not r.rejected, r.detail
    assert r.http_status == 200 and r.data == JPEG
    assert srv.state.hits["flakya"] == 2
    assert stats["retries"] == 1
    assert stats["by_status"] == {500: 1, 200: 1}


def test_a_response_cut_off_and_fetched_again_is_in_the_ledger_once(srv: Any) -> None:
    """The opt-out headers of a 2xx are recorded when they arrive. A body cut off then
    (a reset, a stall past the timeout) was fetched again and its headers recorded again:
    the image's ledger held each entry twice, and the rights summary counted them twice."""
    r = one(base(srv) + "/cut-once/a", cfg(retries=1, backoff_s=0))
    assert not r.rejected and r.data == JPEG and srv.state.hits["cuta"] == 2
    names = [s.name for s in r.rights]
    assert "x_robots_tag" in names and len(names) == len(set(names)), names


def test_always_500_is_server_error_after_retries(srv: Any) -> None:
    r = one(base(srv) + "/status/503", cfg(retries=2))
    assert r.reason == Reason.HTTP_SERVER_ERROR.value
    assert r.http_status == 503 and "3 tries" in r.detail
    assert srv.state.hits["status503"] == 3


def test_429_retry_after_is_honoured(srv: Any) -> None:
    r = one(base(srv) + "/ratelimited/a/1", cfg(backoff_s=0.01))
    assert not r.rejected, r.detail
    first, second = srv.state.times["rla"]
    assert second - first >= 0.5  # Retry-After: 1 (the server's clock sees some of it late)


def test_retry_after_is_capped(srv: Any) -> None:
    started = time.monotonic()
    r = one(base(srv) + "/ratelimited/b/30", cfg(max_retry_after_s=0.2))
    assert not r.rejected, r.detail
    assert time.monotonic() - started < 3
    first, second = srv.state.times["rlb"]
    assert second - first >= 0.15


def test_a_host_answering_429_without_retry_after_gets_its_requests_spaced(srv: Any) -> None:
    """Each record backed off on its own while the host's other slots kept sending: 600
    requests in 20 s to a host that only ever said 429."""
    started = time.monotonic()
    out, stats = run_fetch([base(srv) + f"/bare429/{i}" for i in range(8)],
                           cfg(retries=2, max_retry_after_s=0.25, per_host_concurrency=16))
    assert {r.reason for r in out} == {Reason.RATE_LIMITED.value}
    times = sorted(srv.state.times["bare429"])
    assert len(times) == 24
    later = times[8:]  # the first 8 went out together, before any answer
    gaps = [b - a for a, b in zip(later, later[1:])]
    # the server's times, taken as it gets to each request: a request handled late under
    # load shortens the gap after it (each record on its own sent them 0.03 s apart)
    assert min(gaps) >= 0.12 and time.monotonic() - started >= 16 * 0.2, gaps


def test_a_host_waiting_its_turn_holds_no_global_slot(srv: Any) -> None:
    """A host's delay was waited out holding a global slot: with concurrency 2, two requests
    to a host with a 1 s delay kept another host's images waiting."""
    reported: dict[str, float] = {}

    async def main() -> list[Record]:
        config = cfg(concurrency=2, hosts={"127.0.0.1": {"delay_s": 1.0}})
        async with Fetcher(config) as fetcher:
            records = [rec(base(srv) + f"/ts/{i}") for i in range(3)] + \
                [rec(base(srv, "localhost") + f"/img.jpg?{i}") for i in range(2)]
            return await fetcher.fetch_many(
                records, on_result=lambda r: reported.__setitem__(r.candidate.url,
                                                                  time.monotonic()))

    out = asyncio.run(main())
    assert not any(r.rejected for r in out)
    first, second, third = srv.state.times["ts"]
    # the other host's images came in while the first host's second request waited its turn
    assert all(reported[base(srv, "localhost") + f"/img.jpg?{i}"] < second
               for i in range(2)), (reported, srv.state.times["ts"])
    assert second - first >= 0.5 and third - second >= 0.5  # delay_s 1.0, server's clock


def test_broken_urls_do_not_slow_their_host(srv: Any, monkeypatch: Any) -> None:
    """Every 5xx, retries included, doubled its host's gap: a few broken images held a host's
    good ones back for minutes. Only a 429 or 503 to a URL's first request slows a host.
    (Checked on the host's gap, not the clock: the good URLs' successes ease a gap back to
    nothing within a couple of seconds, no more than a loaded machine's own delays.)"""
    gaps: list[float] = []
    slow_down = fetch._Host.slow_down

    def recorded(host: Any, now: float, most: float) -> None:
        slow_down(host, now, most)
        gaps.append(host.gap)

    monkeypatch.setattr(fetch._Host, "slow_down", recorded)
    urls = [base(srv) + f"/status/500?{i}" for i in range(3)] + \
        [base(srv) + f"/ts/{i}" for i in range(20)]
    # (a gap of at most 1 s: a slowed host ends its 20 good URLs within a minute)
    out, _ = run_fetch(urls, cfg(retries=3, backoff_s=0.05, per_host_concurrency=2,
                                 max_retry_after_s=1.0))
    assert [r.reason for r in out[:3]] == [Reason.HTTP_SERVER_ERROR.value] * 3
    assert not any(r.rejected for r in out[3:])
    assert srv.state.hits["status500"] == 12 and not any(gaps), gaps


def test_a_hosts_delay_holds_when_global_slots_kept_its_requests_waiting(srv: Any) -> None:
    """A request whose turn passed while the global slots were busy started with every other
    such request at once: the host's delay (its Crawl-delay, its error gap) was lost."""
    config = cfg(concurrency=2, hosts={"127.0.0.1": {"delay_s": 0.3}})
    urls = [base(srv, "localhost") + f"/slow?{i}" for i in range(2)] + \
        [base(srv) + f"/ts/{i}" for i in range(3)]
    out, _ = run_fetch(urls, config)
    assert not any(r.rejected for r in out)
    times = sorted(srv.state.times["ts"])
    # delay_s 0.3 (the server's times: one handled late shortens the gap after it); the
    # requests that lost their delay went out together
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.15, times


def test_always_429_is_rate_limited(srv: Any) -> None:
    r = one(base(srv) + "/always429", cfg(retries=1))
    assert r.reason == Reason.RATE_LIMITED.value and r.http_status == 429
    assert srv.state.hits["always429"] == 2


def test_timeout(srv: Any) -> None:
    started = time.monotonic()
    r = one(base(srv) + "/slow", cfg(timeout_s=0.3, retries=1))
    assert r.reason == Reason.TIMEOUT.value
    assert srv.state.hits["slow"] == 2
    assert time.monotonic() - started < 3


def test_an_image_whose_hops_each_answer_slowly_runs_out_of_its_deadline(srv: Any) -> None:
    """Every timeout was per request: a server answering each hop just inside it, and
    sending the client on to a new URL, held the image (and a connection) for every hop's
    timeout and every retry's wait: about 20 minutes with the defaults."""
    started = time.monotonic()
    r = one(base(srv) + "/hop/0", cfg(timeout_s=1.0, max_redirects=20, deadline_s=1.0))
    assert r.reason == Reason.TIMEOUT.value, r.detail
    assert "download.deadline_s 1 s" in r.detail and "/hop/" in r.detail
    assert 2 <= srv.state.hits["hop"] <= 5 and time.monotonic() - started < 2.5


def test_waits_for_a_turn_on_a_host_spend_none_of_an_images_deadline(srv: Any) -> None:
    urls = [base(srv) + "/img.jpg"] * 4
    records, _ = run_fetch(urls, cfg(per_host_delay_s=0.4, per_host_concurrency=1,
                                     timeout_s=0.5, deadline_s=0.5))
    assert [r.rejected for r in records] == [False] * 4  # the last waited 1.2 s for its turn


def test_the_wait_for_an_origins_opt_out_files_spends_none_of_an_images_deadline(
        srv: Any) -> None:
    """The image's deadline ran while its origin's robots.txt was read (often another
    image's read, waited for): a fast image behind a slow robots.txt was a timeout."""
    srv.state.robots_mode = "slow_hops"
    r = one(base(srv) + "/img-50ms.jpg", cfg(timeout_s=1.0, deadline_s=1.0,
                                             respect_robots=True))
    assert not r.rejected, r.detail
    assert srv.state.hits["robots_hop"] == 5  # read whole: 1.4 s, past the image's deadline


def test_a_robots_txt_whose_hops_answer_slowly_is_not_read(srv: Any) -> None:
    """A robots.txt (or tdmrep.json, ai.txt, page) got a whole request timeout at each of its
    six hops; its hops now share two."""
    srv.state.robots_mode = "slow_hops"
    started = time.monotonic()
    r = one(base(srv) + "/img.jpg", cfg(timeout_s=0.5, respect_robots=True))
    assert r.rejected and "robots.txt of" in r.detail and "could not be read" in r.detail
    assert time.monotonic() - started < 3.5  # two reads (RFC 9309's retry), 1 s each
    srv.state.reset()
    srv.state.robots_mode = "slow_hops"
    r = one(base(srv) + "/private/img.jpg", cfg(timeout_s=1.0, respect_robots=True))
    assert r.reason == Reason.ROBOTS_DISALLOWED.value, r.detail  # read within the two


def test_connection_refused() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    r = one(f"http://127.0.0.1:{port}/x.jpg", cfg(retries=1))
    assert r.reason == Reason.CONNECTION_ERROR.value
    assert "2 tries" in r.detail


# ---- byte caps --------------------------------------------------------------------------------


def test_streamed_body_over_cap_is_aborted_early(srv: Any) -> None:
    r = one(base(srv) + "/stream-big", cfg(max_bytes=100_000))
    assert r.reason == Reason.TOO_MANY_BYTES.value and "streaming" in r.detail
    assert r.data is None
    deadline = time.monotonic() + 5
    while not srv.state.stream_disconnected and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.state.stream_disconnected, "the server never saw the client hang up"
    # Socket buffers hold a few MB; reading it all would have taken all 64 MB.
    assert srv.state.stream_sent < STREAM_TOTAL // 4


def test_content_length_over_cap_is_refused_up_front(srv: Any) -> None:
    r = one(base(srv) + "/big-cl", cfg(max_bytes=100_000))
    assert r.reason == Reason.TOO_MANY_BYTES.value and "Content-Length" in r.detail


def test_body_under_cap_is_kept(srv: Any) -> None:
    r = one(base(srv) + "/big-cl", cfg(max_bytes=400_000))
    assert not r.rejected and len(r.data or b"") == len(JPEG) + 300_000


# ---- redirects --------------------------------------------------------------------------------


def test_redirect_followed(srv: Any) -> None:
    r = one(base(srv) + "/redirect/3", cfg(max_redirects=3))
    assert not r.rejected, r.detail
    assert r.final_url == base(srv) + "/img.jpg"
    assert r.http_status == 200


def test_too_many_redirects(srv: Any) -> None:
    r = one(base(srv) + "/redirect/3", cfg(max_redirects=2))
    assert r.reason == Reason.TOO_MANY_REDIRECTS.value
    r0 = one(base(srv) + "/redirect/1", cfg(max_redirects=0))
    assert r0.reason == Reason.TOO_MANY_REDIRECTS.value


def test_redirect_loop(srv: Any) -> None:
    r = one(base(srv) + "/loop-a", cfg(max_redirects=20))
    assert r.reason == Reason.TOO_MANY_REDIRECTS.value and "loop" in r.detail


def test_redirect_hop_is_vetted(srv: Any) -> None:
    r = one(base(srv) + "/to-ftp", cfg())
    assert r.reason == Reason.UNSUPPORTED_SCHEME.value, r.detail


# ---- opt-outs and robots.txt ------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["noai", "noimageai, nofollow", "pixcrawler: noindex",
                                 "*: noimageindex"])
def test_x_robots_tag_opt_out(srv: Any, tag: str) -> None:
    r = one(base(srv) + f"/optout/{tag}", cfg())
    assert r.reason == Reason.OPTED_OUT.value and r.data is None


def test_x_robots_tag_for_other_bots_or_ignored(srv: Any) -> None:
    other, ignored = run_fetch([base(srv) + "/optout/googlebot: noai",
                                base(srv) + "/optout/noai"], cfg(respect_optouts=False))[0]
    assert not other.rejected and not ignored.rejected
    r = one(base(srv) + "/optout/googlebot: noai, nofollow", cfg())
    assert not r.rejected


def test_robots_disallow_and_single_fetch(srv: Any) -> None:
    srv.state.robots_mode = "rules"
    urls = [base(srv) + ("/private/img.jpg" if i % 2 else "/img.jpg") for i in range(20)]
    out, stats = run_fetch(urls, cfg(respect_robots=True))
    for i, r in enumerate(out):
        if i % 2:
            assert r.reason == Reason.ROBOTS_DISALLOWED.value
        else:
            assert not r.rejected, r.detail
    assert srv.state.hits["robots"] == 1
    assert stats["robots_fetches"] == 1
    assert srv.state.hits["private"] == 0


def test_robots_checked_on_redirect_hop(srv: Any) -> None:
    srv.state.robots_mode = "rules"
    r = one(base(srv) + "/to-private", cfg(respect_robots=True))
    assert r.reason == Reason.ROBOTS_DISALLOWED.value
    assert srv.state.hits["private"] == 0


def test_robots_missing_allows(srv: Any) -> None:
    srv.state.robots_mode = "none"
    r = one(base(srv) + "/private/img.jpg", cfg(respect_robots=True))
    assert not r.rejected, r.detail


def test_robots_that_cannot_be_read_disallows_everything(srv: Any) -> None:
    """RFC 9309 2.3.1.4: a server error means complete disallow (it used to mean allow all,
    and a server too loaded to serve robots.txt then got every image request)."""
    srv.state.robots_mode = "error"
    out, stats = run_fetch([base(srv) + p for p in ("/img.jpg", "/private/img.jpg")],
                           cfg(respect_robots=True))
    assert [r.reason for r in out] == [Reason.ROBOTS_UNREACHABLE.value] * 2
    assert "could not be read" in out[0].detail and "HTTP 500" in out[0].detail
    assert srv.state.hits["robots"] == 2 and stats["robots_fetches"] == 2  # asked once more
    assert srv.state.hits["img"] == srv.state.hits["private"] == 0
    assert Reason.ROBOTS_UNREACHABLE in TRANSIENT_REASONS  # retry-failed asks again


def test_a_robots_redirect_that_names_no_location_is_no_answer(srv: Any) -> None:
    """A 3xx without a Location cannot be followed: the file was not read. It counted as a
    4xx, "no rules", and every image was fetched."""
    srv.state.robots_mode = "redirect_nowhere"
    r = one(base(srv) + "/private/img.jpg", cfg(respect_robots=True))
    assert r.reason == Reason.CONNECTION_ERROR.value and "no answer" in r.detail, r.detail
    assert srv.state.hits["private"] == 0


def test_robots_that_fails_once_is_asked_again(srv: Any) -> None:
    srv.state.robots_mode = "flaky"
    out, _ = run_fetch([base(srv) + p for p in ("/img.jpg", "/private/img.jpg")],
                       cfg(respect_robots=True))
    assert [r.reason for r in out] == ["", Reason.ROBOTS_DISALLOWED.value]
    assert srv.state.hits["robots"] == 2


@pytest.mark.parametrize("mode,reason", [("gzip", Reason.ROBOTS_DISALLOWED),
                                         ("deflate", Reason.ROBOTS_DISALLOWED),
                                         ("br", Reason.CONNECTION_ERROR)])
def test_a_compressed_robots_txt_is_read_not_taken_for_garbage(srv: Any, mode: str,
                                                              reason: Reason) -> None:
    """Read as it came, a gzipped robots.txt lost its Disallow; an encoding the fetcher cannot
    undo is no usable answer (an unreachable file)."""
    srv.state.robots_mode = mode
    r = one(base(srv) + "/private/img.jpg", cfg(respect_robots=True))
    assert r.reason == reason.value, r.detail


def test_robots_ignored_when_not_respected(srv: Any) -> None:
    srv.state.robots_mode = "rules"
    r = one(base(srv) + "/private/img.jpg", cfg(respect_robots=False))
    assert not r.rejected
    assert srv.state.hits["robots"] == 0


def test_robots_crawl_delay_spaces_requests(srv: Any) -> None:
    srv.state.robots_mode = "crawl_delay"
    out, _ = run_fetch([base(srv) + f"/ts/{i}" for i in range(2)], cfg(respect_robots=True))
    assert not any(r.rejected for r in out)
    first, second = srv.state.times["ts"]
    assert second - first >= 0.9


def test_robots_with_unconvertible_numbers_is_obeyed_and_cached(srv: Any) -> None:
    srv.state.robots_mode = "bad_numbers"
    urls = [base(srv) + p for p in ("/img.jpg", "/private/img.jpg", "/img.jpg")]
    out, stats = run_fetch(urls, cfg(respect_robots=True))
    assert [r.reason for r in out] == ["", Reason.ROBOTS_DISALLOWED.value, ""]
    assert srv.state.hits["robots"] == 1 and stats["robots_fetches"] == 1


def test_robots_check_ignores_the_userinfo(srv: Any) -> None:
    srv.state.robots_mode = "rules"
    urls = [f"http://u%5B@127.0.0.1:{srv.port}/img.jpg",
            f"http://u%5D:p%5B@127.0.0.1:{srv.port}/private/img.jpg"]
    out, stats = run_fetch(urls, cfg(respect_robots=True))
    assert [r.reason for r in out] == ["", Reason.ROBOTS_DISALLOWED.value]
    assert stats["fetched"] + stats["rejected"] == 2


def test_unexpected_error_rejects_only_its_record(srv: Any, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    real = Fetcher._get_with_retries

    async def flaky(self: Fetcher, url: URL, delay: float, record: Record,
                    deadline: Any) -> Optional[str]:
        if url.path == "/private/img.jpg":
            raise RuntimeError("a bug in our code")
        return await real(self, url, delay, record, deadline)

    monkeypatch.setattr(Fetcher, "_get_with_retries", flaky)
    with caplog.at_level(logging.WARNING, logger="pixcrawler.fetch"):
        out, stats = run_fetch([base(srv) + "/img.jpg", base(srv) + "/private/img.jpg"], cfg())
    assert not out[0].rejected
    assert out[1].reason == Reason.CONNECTION_ERROR.value
    assert "RuntimeError" in out[1].detail and "a bug in our code" in out[1].detail
    assert stats["fetched"] == 1 and stats["rejected"] == 1
    assert any("RuntimeError" in r.getMessage() for r in caplog.records)


def test_cancellation_still_propagates(srv: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    async def cancelled(self: Fetcher, url: URL, delay: float, record: Record,
                        deadline: Any) -> Optional[str]:
        raise asyncio.CancelledError

    monkeypatch.setattr(Fetcher, "_get_with_retries", cancelled)

    async def main() -> None:
        async with Fetcher(cfg()) as fetcher:
            await fetcher.fetch(rec(base(srv) + "/img.jpg"))

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(main())


# ---- SSRF guard and bad URLs ------------------------------------------------------------------


def test_ssrf_guard_blocks_loopback_literal_and_resolved(srv: Any) -> None:
    literal, named = run_fetch([base(srv) + "/img.jpg", base(srv, "localhost") + "/img.jpg"],
                               cfg(allow_private_networks=False))[0]
    assert literal.reason == Reason.BLOCKED_ADDRESS.value
    assert named.reason == Reason.BLOCKED_ADDRESS.value and "resolves" in named.detail
    assert srv.state.hits["img"] == 0


def test_unicode_hosts_are_guarded_too(srv: Any) -> None:
    # IDNA maps these onto "localhost" and "127.0.0.1": the guard must see the mapped host.
    urls = [f"http://ⓛⓞⓒⓐⓛⓗⓞⓢⓣ:{srv.port}/img.jpg", f"http://１２７.０.０.１:{srv.port}/img.jpg"]
    blocked = run_fetch(urls, cfg(allow_private_networks=False))[0]
    assert [r.reason for r in blocked] == [Reason.BLOCKED_ADDRESS.value] * 2
    assert srv.state.hits["img"] == 0
    allowed = run_fetch(urls, cfg(allow_private_networks=True))[0]
    assert [r.rejected for r in allowed] == [False, False]


def test_private_networks_allowed_when_configured(srv: Any) -> None:
    out, _ = run_fetch([base(srv) + "/img.jpg", base(srv, "localhost") + "/img.jpg"],
                       cfg(allow_private_networks=True))
    assert [r.rejected for r in out] == [False, False]
    assert srv.state.hits["img"] == 2


@pytest.mark.parametrize("url,reason", [
    ("not a url", Reason.INVALID_URL),
    ("", Reason.INVALID_URL),
    ("http://", Reason.INVALID_URL),
    ("http://[::1", Reason.INVALID_URL),
    ("http://host:99999/x.jpg", Reason.INVALID_URL),
    ("http://a b.example/x.jpg", Reason.INVALID_URL),
    ("http://2130706433/x.jpg", Reason.INVALID_URL),
    ("ftp://x/y.jpg", Reason.UNSUPPORTED_SCHEME),
    ("file:///etc/passwd", Reason.UNSUPPORTED_SCHEME),
    ("data:image/png;base64,AAAA", Reason.UNSUPPORTED_SCHEME),
    ("javascript:alert(1)", Reason.UNSUPPORTED_SCHEME),
    ("http://169.254.169.254/latest/meta-data/", Reason.BLOCKED_ADDRESS),
    ("http://[::ffff:10.0.0.1]/x.jpg", Reason.BLOCKED_ADDRESS),
    ("https://10.1.2.3/x.jpg", Reason.BLOCKED_ADDRESS),
])
def test_bad_urls_never_raise(url: str, reason: Reason) -> None:
    r = one(url, cfg(allow_private_networks=False, respect_robots=True))
    assert r.rejected and r.reason == reason.value, r.detail
    assert r.stage in ("url",)


# ---- politeness -------------------------------------------------------------------------------


def test_per_host_concurrency_cap(srv: Any) -> None:
    out, _ = run_fetch([base(srv) + f"/conc/{i}" for i in range(15)],
                       cfg(per_host_concurrency=3, concurrency=50))
    assert not any(r.rejected for r in out)
    assert srv.state.max_in_flight == 3


def test_global_concurrency_cap_across_hosts(srv: Any) -> None:
    urls = [base(srv, host) + f"/conc/{i}" for i in range(8) for host in ("127.0.0.1",
                                                                          "localhost")]
    out, _ = run_fetch(urls, cfg(per_host_concurrency=10, concurrency=2))
    assert not any(r.rejected for r in out)
    assert srv.state.max_in_flight == 2


def test_per_host_delay(srv: Any) -> None:
    out, _ = run_fetch([base(srv) + f"/ts/{i}" for i in range(5)],
                       cfg(per_host_delay_s=0.15, per_host_concurrency=5))
    assert not any(r.rejected for r in out)
    times = srv.state.times["ts"]
    assert len(times) == 5
    gaps = [b - a for a, b in zip(times, times[1:])]
    # Starts are spaced 0.15 s apart on the client; arrival times add some scheduling jitter.
    assert times[-1] - times[0] >= 4 * 0.15 * 0.95, gaps
    assert min(gaps) >= 0.075, gaps


def test_stats_count_requests_and_bytes(srv: Any) -> None:
    out, stats = run_fetch([base(srv) + "/img.jpg", base(srv) + "/status/404"], cfg())
    assert stats["requests"] == 2
    assert stats["bytes"] == len(JPEG)
    assert stats["fetched"] == 1 and stats["rejected"] == 1
    assert stats["by_status"] == {200: 1, 404: 1}
    assert stats["by_reason"] == {Reason.HTTP_CLIENT_ERROR.value: 1}


# ---- Retry-After parsing ----------------------------------------------------------------------


def test_parse_retry_after() -> None:
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("inf") is None and parse_retry_after("nan") is None
    assert parse_retry_after("1e999") is None
    now = 1_700_000_000.0
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 120))
    assert parse_retry_after(date, now=now) == pytest.approx(120, abs=1)
    past = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now - 120))
    assert parse_retry_after(past, now=now) == 0.0
    # a date Python cannot hold (a huge offset, year or day) says nothing usable
    assert parse_retry_after("Mon, 01 Jan 2020 00:00:00 +99999999999999999999") is None


def test_idle_hosts_are_forgotten(srv: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import builder.fetch

    monkeypatch.setattr(builder.fetch, "_HOST_SWEEP_AT", 1)

    async def main() -> int:
        async with Fetcher(cfg()) as fetcher:
            await fetcher.fetch(rec(base(srv) + "/img.jpg"))
            await fetcher.fetch(rec(base(srv, "localhost") + "/img.jpg"))
            return len(fetcher._hosts)

    assert asyncio.run(main()) <= 1


def test_runs_on_uvloop_too(srv: Any) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> list[Record]:
        async with Fetcher(cfg(respect_robots=True)) as fetcher:
            return await fetcher.fetch_many([rec(base(srv) + "/img.jpg"),
                                             rec(base(srv) + "/status/404")])

    out = uvloop.run(main())
    assert [r.reason for r in out] == ["", Reason.HTTP_CLIENT_ERROR.value]


def test_on_result_reports_each_record_as_it_is_decided(srv: Any) -> None:
    reported: list[tuple[str, float]] = []

    async def main() -> list[Record]:
        async with Fetcher(cfg(timeout_s=5.0)) as fetcher:
            records = [rec(base(srv) + "/slow"), rec("ftp://x/y.jpg"),
                       rec(base(srv, "localhost") + "/img.jpg")]
            return await fetcher.fetch_many(
                records, on_result=lambda r: reported.append((r.candidate.url,
                                                              time.monotonic())))

    started = time.monotonic()
    out = asyncio.run(main())
    assert sorted(u for u, _ in reported) == sorted(r.candidate.url for r in out)
    when = dict(reported)
    assert when["ftp://x/y.jpg"] - started < 0.5
    assert when[base(srv, "localhost") + "/img.jpg"] < when[base(srv) + "/slow"]
    assert not out[0].rejected and out[1].reason == Reason.UNSUPPORTED_SCHEME.value


def test_a_retry_after_holds_the_host_however_its_name_is_spelled() -> None:
    """The per-host table is keyed by the host as profiles compare it (lower case, no
    trailing dot); a Retry-After looked the host up as the URL spelled it, and held nothing
    for upload.wikimedia.org. (a fully qualified name, which yarl keeps)."""
    from yarl import URL

    async def scenario() -> None:
        async with Fetcher(cfg()) as fetcher:
            host = await fetcher._acquire(URL("https://upload.wikimedia.org/a.jpg"), 0.0)
            fetcher._release(host)
            fetcher._hold_host(URL("https://upload.wikimedia.org./b.jpg"), 30.0)
            assert host.held_until > asyncio.get_running_loop().time() + 20

    asyncio.run(scenario())
