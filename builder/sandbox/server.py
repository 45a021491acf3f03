"""The sandbox web: an aiohttp server on 127.0.0.1 that stands in for the internet.

``SandboxWeb`` runs the app in a background thread with its own event loop, so synchronous code
(tests, the demo, benchmarks) can start it, point a job at ``base_url`` and stop it. It serves:

- ``GET /search?q=&page=&per_page=`` image-search JSON (``&fail=429|500`` makes it fail)
- ``GET /img/...``, ``/f/...``, ``/private/...`` the corpus (see ``corpus.py``), faults included
- ``GET /page/{slug}/{pos}`` a tiny HTML page per search result
- ``GET /bench/{i}.jpg`` benchmark images; ``GET /robots.txt``; ``GET /healthz``
- ``GET /heavy/{i}.jpg?bytes=N&chunked=0|1&meet=M`` a hostile server's answer: N bytes (default
  ``HEAVY_BYTES``, at most ``MAX_HEAVY_BYTES``) that start like a JPEG and do not decode, with a
  Content-Length or chunked; streamed, so the sandbox holds none of it (``heavy_urls``). With
  ``meet=M`` each answer sends half its body, then waits until M answers with the same ``meet``
  are half sent (at most ``MEET_TIMEOUT_S``): M bodies are then half read at once, whatever the
  scheduling
- ``GET /api/openverse/v1/images/`` the search as Openverse answers it (anonymous: pages of at
  most 20, no result past the 240th); ``GET /api/google/customsearch/v1`` Google's Custom Search
  API as it answers a key made after it closed: 403 ``PERMISSION_DENIED`` (for the engine probe)
- ``GET /sig/...`` images and pages carrying opt-out headers, XMP and meta tags, and more origins
  (one port each) with their own robots.txt, tdmrep.json and ai.txt (``sites.py``;
  ``signal_urls()``, ``site()``)

Images are rendered on first request (in the loop's thread pool) and kept in a bounded cache.
"""

from __future__ import annotations

import asyncio
import errno
import html
import signal
import threading
import time
import urllib.parse
from collections import Counter, OrderedDict
from typing import Any, Callable, Sequence

from aiohttp import web

from builder.ports import free_port
from builder.sandbox.sites import (PAGE_CASES, SIGNAL_CASES, SignalCase, Site, default_sites,
                                   thumb_width)
from builder.signals import AI_TXT_PATH, TDMREP_PATH
from builder.xmp import jpeg_with_xmp, xmp_with_data_mining
from builder.sandbox.corpus import (
    ACCEPTED,
    CLEAN,
    FAULTS,
    JPEG_HEAD,
    ROBOTS_TXT,
    Corpus,
    Entry,
    Picture,
    derive_seed,
    encode,
)

DEFAULT_CLASSES: tuple[str, ...] = ("cat", "dog", "bird")
MAX_PER_PAGE = 500
_CACHE_LIMIT_BYTES = 512 * 1024 * 1024
_FILLER = bytes(range(256)) * 256  # 64 KiB of a too_big body, written over and over
_READY_TIMEOUT_S = 30.0
MAX_PORT = 65_535
HEAVY_BYTES = 19_000_000
"""The default size of a ``/heavy/`` body: just under the default ``download.max_bytes``."""
MAX_HEAVY_BYTES = 200_000_000
MEET_TIMEOUT_S = 10.0


class _ByteCache:
    """An LRU of rendered bodies, bounded in bytes (rendering is deterministic, so evicting is
    only a cost in time)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.size = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def put(self, key: str, data: bytes) -> None:
        if key in self._items:
            return
        self._items[key] = data
        self.size += len(data)
        while self.size > self.limit and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.size -= len(old)



def _decimal_index(text: str) -> int | None:
    """``text`` as a non-negative int when it is plain ASCII digits, else None.

    ``str.isdigit`` also passes superscripts ("²") that ``int`` refuses.
    """
    if not (text.isascii() and text.isdecimal()):
        return None
    try:
        return int(text)
    except ValueError:  # more digits than int() converts
        return None


async def _write_filler(resp: web.StreamResponse, sent: int, upto: int) -> int:
    """Write filler from byte ``sent`` of a body up to byte ``upto``; returns the new ``sent``."""
    while sent < upto:
        chunk = _FILLER[: upto - sent]
        await resp.write(chunk)
        sent += len(chunk)
    return sent


def _origin(host: str, port: int) -> str:
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


class SandboxWeb:
    """A local web of images, search results and deliberate faults.

    ``faults`` says whether search results include fault instances (one after every
    ``fault_every`` clean images, cycling through ``FAULTS``); the dedicated instances behind
    ``fault_urls()`` are served either way. ``slow_s`` is how long ``slow`` URLs wait before
    answering; ``big_bytes`` how much a ``too_big`` URL streams; ``bench_images`` how many
    benchmark JPEGs ``bench_urls()`` lists. ``sites`` serves the opt-out sites
    (``sites.py``), each on a port of its own.
    """

    def __init__(self, classes: Sequence[str] = DEFAULT_CLASSES, images_per_class: int = 40, *,
                 seed: int = 0, faults: bool = True, fault_every: int = 6,
                 host: str = "127.0.0.1", port: int = 0, slow_s: float = 5.0,
                 big_bytes: int = 3_000_000, bench_images: int = 0, sites: bool = True):
        if slow_s < 0 or big_bytes < len(JPEG_HEAD):
            raise ValueError(f"slow_s must be >= 0 and big_bytes >= {len(JPEG_HEAD)}")
        if not 0 <= port <= MAX_PORT:
            raise ValueError(f"port {port} is not a TCP port: give 0-{MAX_PORT} (0: a free one)")
        self.corpus = Corpus(classes, images_per_class, seed=seed, faults=faults,
                             fault_every=fault_every, bench_images=bench_images)
        self.classes = self.corpus.classes
        self.host = host
        self.port = port
        self.slow_s = slow_s
        self.big_bytes = big_bytes
        self.base_url = ""
        self._dead_port = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cache = _ByteCache(_CACHE_LIMIT_BYTES)
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        self._hits: Counter[str] = Counter()
        self._sleepers: set[asyncio.Task[Any]] = set()
        self._meetings: dict[int, tuple[list[int], asyncio.Event]] = {}
        self._outcomes = self._expected_outcomes()
        self.sites: dict[str, Site] = default_sites() if sites else {}
        self._site_urls: dict[str, str] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> str:
        """Start serving (idempotent); returns ``base_url``."""
        with self._lock:
            if self._thread is not None:
                return self.base_url
            self._dead_port = free_port()
            ready = threading.Event()
            errors: list[OSError] = []
            thread = threading.Thread(target=self._serve, args=(ready, errors), daemon=True,
                                      name="pixcrawler-sandbox-web")
            thread.start()
            if not ready.wait(_READY_TIMEOUT_S):
                raise RuntimeError(f"the sandbox web did not start within {_READY_TIMEOUT_S}s")
            if errors:
                thread.join()
                exc = errors[0]
                why = ("the port is in use by another program" if exc.errno == errno.EADDRINUSE
                       else exc.strerror or str(exc))
                raise OSError(f"the sandbox web cannot listen on {self.host}:{self.port}: "
                              f"{why} (pick another port, or 0 for a free one)") from exc
            self._thread = thread
            return self.base_url

    def stop(self) -> None:
        """Stop serving and join the server thread (idempotent)."""
        with self._lock:
            thread, loop = self._thread, self._loop
            if thread is None or loop is None:
                return
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            self._thread = None
            self._loop = None

    def __enter__(self) -> "SandboxWeb":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self, ready: threading.Event, errors: list[OSError]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        # A short shutdown_timeout: a client that stalls a stream must not hold stop() up.
        runner = web.AppRunner(self._make_app(), access_log=None, shutdown_timeout=0.25)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, self.host, self.port).start())
        except OSError as exc:
            errors.append(exc)
            loop.run_until_complete(runner.cleanup())
            loop.close()
            ready.set()
            return
        self.base_url = _origin(self.host, runner.addresses[0][1])
        self._site_urls = {"main": self.base_url} if "main" in self.sites else {}
        site_runners = []
        for site in self.sites.values():
            if site.name == "main":
                continue
            site_runner = web.AppRunner(self._make_site_app(site), access_log=None,
                                        shutdown_timeout=0.25)
            loop.run_until_complete(site_runner.setup())
            loop.run_until_complete(web.TCPSite(site_runner, self.host, 0).start())
            self._site_urls[site.name] = _origin(self.host, site_runner.addresses[0][1])
            site_runners.append(site_runner)
        self._loop = loop
        ready.set()
        try:
            loop.run_forever()
        finally:
            for task in list(self._sleepers):  # pending ``slow`` answers: drop them now
                task.cancel()
            for site_runner in site_runners:
                loop.run_until_complete(site_runner.cleanup())
            loop.run_until_complete(runner.cleanup())
            leftovers = asyncio.all_tasks(loop)
            for task in leftovers:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_default_executor())
            self._pending.clear()
            loop.close()

    # -- URLs -----------------------------------------------------------------------------------

    def _require_started(self) -> str:
        if not self.base_url:
            raise RuntimeError("the sandbox web is not started: call start() (or use it in a "
                               "with-block) before asking for its URLs")
        return self.base_url

    def _absolute(self, entry: Entry, origin: str) -> str:
        if entry.kind == "connection_refused":
            return f"http://127.0.0.1:{self._dead_port}{entry.path}"
        if entry.kind == "bad_scheme":
            return f"ftp://{urllib.parse.urlsplit(origin).netloc}{entry.path}"
        return origin + entry.path

    def fault_urls(self) -> dict[str, str]:
        """Fault name -> absolute URL of a dedicated instance of it (not in search results).

        Its ``exact_duplicate`` and ``near_duplicate`` copy ``class_image_urls(classes[0])[0]``
        (when classes have images), so list that URL before them to see them rejected.
        """
        base = self._require_started()
        return {kind: self._absolute(entry, base) for kind, entry in self.corpus.probes.items()}

    def class_image_urls(self, label: str) -> list[str]:
        """The clean images of class ``label``, in search-result order."""
        base = self._require_started()
        if label not in self.corpus.clean:
            raise ValueError(f"unknown class {label!r}: this sandbox serves {list(self.classes)}")
        return [base + e.path for e in self.corpus.clean[label]]

    def bench_urls(self) -> list[str]:
        """``bench_images`` distinct ~40 KB 512x384 JPEGs (rendered on first request)."""
        base = self._require_started()
        return [f"{base}/bench/{i:05d}.jpg" for i in range(self.corpus.bench_images)]

    def heavy_urls(self, n: int, *, size: int = HEAVY_BYTES, chunked: bool = False,
                   meet: int = 0) -> list[str]:
        """``n`` distinct URLs answering ``size`` bytes each (see ``/heavy/`` above); with
        ``meet``, every ``meet`` of them are half sent together."""
        base = self._require_started()
        mode = ("&chunked=1" if chunked else "") + (f"&meet={meet}" if meet else "")
        return [f"{base}/heavy/{i:05d}.jpg?bytes={size}{mode}" for i in range(n)]

    def search_urls(self, label: str) -> list[str]:
        """Every URL the search results list for ``label``, in order (faults included)."""
        base = self._require_started()
        if label not in self.corpus.results:
            raise ValueError(f"unknown class {label!r}: this sandbox serves {list(self.classes)}")
        return [self._absolute(e, base) for e in self.corpus.results[label]]

    def _expected_outcomes(self) -> dict[str, str]:
        out: dict[str, str] = {}
        entries = list(self.corpus.entries.values()) + self.corpus.url_only
        for entry in entries:
            out[entry.path] = ACCEPTED if entry.kind == CLEAN else FAULTS[entry.kind]
        return out

    def site(self, name: str) -> Site:
        """The opt-out site ``name`` (mutable while serving: its files and headers)."""
        if name not in self.sites:
            raise ValueError(f"unknown site {name!r}: this sandbox serves {list(self.sites)}")
        return self.sites[name]

    def site_url(self, name: str) -> str:
        """The origin (``http://127.0.0.1:<port>``) of site ``name``."""
        self._require_started()
        self.site(name)
        return self._site_urls[name]

    def signal_urls(self, cases: dict[str, SignalCase] | None = None) -> dict[str, str]:
        """Case name -> absolute URL, for ``SIGNAL_CASES`` (or ``cases``, e.g. ``PAGE_CASES``)."""
        return {name: self.site_url(c.site) + c.path
                for name, c in (SIGNAL_CASES if cases is None else cases).items()}

    def signal_page(self, case: str) -> str:
        """The absolute URL of the page a ``PAGE_CASES`` case's image is found on."""
        c = PAGE_CASES[case]
        return self.site_url(c.site) + c.page

    def outcome_of(self, url: str) -> str | None:
        """What the pipeline must make of ``url``: "accepted", a Reason value, or None when the
        URL is not one of this sandbox's corpus, benchmark or signal-case URLs."""
        try:
            path = urllib.parse.urlsplit(url).path
        except ValueError:
            return None
        if self._site_urls:
            for case in SIGNAL_CASES.values():
                if url == self._site_urls.get(case.site, "") + case.path:
                    return case.outcome
        if path.startswith("/bench/"):
            return ACCEPTED if self._bench_index(path.rsplit("/", 1)[-1]) is not None else None
        return self._outcomes.get(path)

    def hits(self, url: str) -> int:
        """How many requests the server has seen for ``url``'s path (retries, robots.txt...)."""
        return self._hits[urllib.parse.urlsplit(url).path or "/"]

    # -- the app --------------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        @web.middleware
        async def count(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
            self._hits[request.path] += 1
            return await handler(request)

        app = web.Application(middlewares=[count])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/robots.txt", self._robots)
        app.router.add_get("/search", self._search)
        app.router.add_get("/page/{slug}/{pos}", self._page)
        app.router.add_get("/bench/{name}", self._bench)
        app.router.add_get("/heavy/{name}", self._heavy)
        app.router.add_get("/api/openverse/v1/images/", self._openverse)
        app.router.add_get("/api/google/customsearch/v1", self._google)
        if "main" in self.sites:
            main = self.sites["main"]
            app.router.add_get("/sig/{tail:.*}",
                               lambda request: self._site_answer(main, request))
        app.router.add_get("/{tail:.*}", self._entry)
        return app

    # -- engine look-alikes (for the engine probe) ----------------------------------------------

    async def _openverse(self, request: web.Request) -> web.Response:
        try:
            page = int(request.query.get("page", "1"))
            size = int(request.query.get("page_size", "20"))
        except ValueError:
            return web.json_response({"detail": "page and page_size are integers"}, status=400)
        if "Authorization" not in request.headers and (size > 20 or page * size > 240):
            return web.json_response({"detail": "Anonymous requests get pages of at most 20 "
                                                "and no result past the 240th."}, status=401)
        label = self.corpus.class_for_query(request.query.get("q", ""))
        items = self.corpus.clean[label] if label is not None else []
        origin = f"{request.scheme}://{request.host}"
        chunk = items[(page - 1) * size:page * size]
        results = [{"id": f"sandbox-{label}-{i}", "url": origin + e.path,
                    "foreign_landing_url": f"{origin}/page/{self.corpus.slugs[e.label]}/{i}",
                    "title": f"A {e.label} picture", "creator": "sandbox", "license": "by",
                    "license_version": "4.0"} for i, e in enumerate(chunk)]
        return web.json_response({"result_count": len(items),
                                  "page_count": -(-len(items) // size) if items else 0,
                                  "page_size": size, "page": page, "results": results})

    async def _google(self, request: web.Request) -> web.Response:
        message = "This project does not have the access to Custom Search JSON API."
        return web.json_response({"error": {"code": 403, "message": message, "errors": [
            {"message": message, "domain": "global", "reason": "forbidden"}],
            "status": "PERMISSION_DENIED"}}, status=403)

    # -- opt-out sites --------------------------------------------------------------------------

    def _make_site_app(self, site: Site) -> web.Application:
        @web.middleware
        async def count(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
            site.paths.append(request.path_qs)
            site.in_flight += 1
            site.max_in_flight = max(site.max_in_flight, site.in_flight)
            try:
                if site.delay_s:
                    await self._sleep(site.delay_s)
                return await handler(request)
            finally:
                site.in_flight -= 1

        async def robots(request: web.Request) -> web.Response:
            return self._file(site.robots_txt, "text/plain", request.path in site.down)

        async def tdmrep(request: web.Request) -> web.Response:
            return self._file(site.tdmrep_json, "application/json", request.path in site.down)

        async def ai_txt(request: web.Request) -> web.Response:
            return self._file(site.ai_txt, "text/plain", request.path in site.down)

        app = web.Application(middlewares=[count])
        app.router.add_get("/robots.txt", robots)
        app.router.add_get(TDMREP_PATH, tdmrep)
        app.router.add_get(AI_TXT_PATH, ai_txt)
        app.router.add_get("/{tail:.*}", lambda request: self._site_answer(site, request))
        return app

    @staticmethod
    def _file(text: str | None, content_type: str, down: bool = False) -> web.Response:
        if down:
            raise web.HTTPServiceUnavailable(text="this server is failing\n")
        if text is None:
            raise web.HTTPNotFound(text="no such file here\n")
        return web.Response(text=text, content_type=content_type)

    async def _sleep(self, seconds: float) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._sleepers.add(task)
        try:
            await asyncio.sleep(seconds)
        finally:
            self._sleepers.discard(task)

    async def _site_answer(self, site: Site, request: web.Request) -> web.Response:
        """A site's page or image: any other path is an image, the same for the same site and
        path, with the headers and XMP the site sets for it."""
        path = request.path
        if path in site.down:
            raise web.HTTPServiceUnavailable(text="this server is failing\n")
        if path in site.statuses:
            return web.Response(status=site.statuses[path], text="no\n")
        if path in site.redirects:
            raise web.HTTPFound(location=site.redirects[path])
        if path in site.pages:
            charset = site.page_charsets.get(path, "utf-8")
            return web.Response(body=site.pages[path].encode(charset), content_type="text/html",
                                charset=charset)
        if site.thumb_widths:
            width = thumb_width(path)
            if width is not None and width not in site.thumb_widths:
                return web.Response(status=400, text=f"Use thumbnail steps listed on "
                                    f"https://w.wiki/GHai ({width}px is not one)\n")
        xmp = site.xmp_for(path)
        key = f"site:{site.name}:{path}"
        data = await self._render(key, lambda: _site_image(site.name, path, xmp))
        return web.Response(body=data, content_type="image/jpeg",
                            headers=site.headers_for(path))

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _robots(self, request: web.Request) -> web.Response:
        return web.Response(text=ROBOTS_TXT)

    async def _search(self, request: web.Request) -> web.Response:
        fail = request.query.get("fail")
        if fail == "429":
            return web.json_response({"error": "rate limited (asked for with fail=429)"},
                                     status=429, headers={"Retry-After": "1"})
        if fail == "500":
            return web.json_response({"error": "server error (asked for with fail=500)"},
                                     status=500)
        if fail is not None:
            return web.json_response({"error": f"fail must be 429 or 500, not {fail!r}"},
                                     status=400)
        try:
            page = int(request.query.get("page", "0"))
            per_page = int(request.query.get("per_page", "20"))
        except ValueError:
            return web.json_response({"error": "page and per_page must be integers"}, status=400)
        if page < 0 or not 1 <= per_page <= MAX_PER_PAGE:
            return web.json_response(
                {"error": f"need page >= 0 and 1 <= per_page <= {MAX_PER_PAGE}"}, status=400)
        label = self.corpus.class_for_query(request.query.get("q", ""))
        items = self.corpus.results[label] if label is not None else []
        origin = f"{request.scheme}://{request.host}"
        start = page * per_page
        results = []
        for pos, entry in enumerate(items[start:start + per_page], start=start):
            credited = pos % 3 == 0
            results.append({
                "url": self._absolute(entry, origin),
                "page_url": f"{origin}/page/{self.corpus.slugs[entry.label]}/{pos}",
                "title": f"A {entry.label} picture, number {pos + 1}",
                "license": "CC-BY-4.0" if credited else "",
                "author": "sandbox" if credited else "",
                "caption": f"a {entry.label} in a sandbox picture, shapes on a gradient",
            })
        return web.json_response({"results": results, "has_more": start + per_page < len(items),
                                  "total": len(items)})

    async def _page(self, request: web.Request) -> web.Response:
        slug, pos = request.match_info["slug"], request.match_info["pos"]
        label = next((lb for lb, s in self.corpus.slugs.items() if s == slug), None)
        items = self.corpus.results.get(label, []) if label is not None else []
        index = _decimal_index(pos)
        if index is None or index >= len(items):
            raise web.HTTPNotFound(text="no such sandbox page\n")
        entry = items[index]
        origin = f"{request.scheme}://{request.host}"
        title = html.escape(f"A {entry.label} picture, number {index + 1}")
        src = html.escape(self._absolute(entry, origin), quote=True)
        return web.Response(text=f"<!DOCTYPE html><html><head><title>{title}</title></head>"
                                 f"<body><h1>{title}</h1><img src=\"{src}\"></body></html>\n",
                            content_type="text/html")

    def _bench_index(self, name: str) -> int | None:
        stem, dot, ext = name.partition(".")
        index = _decimal_index(stem)
        if ext != "jpg" or index is None or index >= self.corpus.bench_images:
            return None
        return index

    async def _bench(self, request: web.Request) -> web.Response:
        i = self._bench_index(request.match_info["name"])
        if i is None:
            raise web.HTTPNotFound(text="no such benchmark image\n")
        pic = self.corpus.bench_picture(i)
        data = await self._render(request.path, lambda: encode(pic))
        return web.Response(body=data, content_type="image/jpeg")

    async def _heavy(self, request: web.Request) -> web.StreamResponse:
        stem, _, ext = request.match_info["name"].partition(".")
        index = _decimal_index(stem)
        size = _decimal_index(request.query.get("bytes", str(HEAVY_BYTES)))
        chunked = request.query.get("chunked", "0")
        meet = _decimal_index(request.query.get("meet", "0"))
        if index is None or ext != "jpg" or size is None or meet is None or \
                not len(JPEG_HEAD) + 8 <= size <= MAX_HEAVY_BYTES or chunked not in ("0", "1"):
            raise web.HTTPBadRequest(text=f"need /heavy/<n>.jpg?bytes=<{len(JPEG_HEAD) + 8}.."
                                          f"{MAX_HEAVY_BYTES}>&chunked=<0|1>&meet=<m>\n")
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        if chunked == "1":
            resp.enable_chunked_encoding()
        else:
            resp.content_length = size
        await resp.prepare(request)
        try:
            head = JPEG_HEAD + index.to_bytes(8, "big")
            await resp.write(head)
            sent = len(head)
            if meet:
                sent = await _write_filler(resp, sent, size // 2)
                await self._meet(meet)
            await _write_filler(resp, sent, size)
            await resp.write_eof()
        except ConnectionError:
            pass  # the client gave up (its byte cap, a timeout)
        return resp

    async def _meet(self, group: int) -> None:
        """Wait until ``group`` answers of this ``meet`` group are here (or MEET_TIMEOUT_S)."""
        arrived, everyone = self._meetings.setdefault(group, ([0], asyncio.Event()))
        arrived[0] += 1
        if arrived[0] >= group:
            everyone.set()
            del self._meetings[group]
            return
        try:
            await asyncio.wait_for(everyone.wait(), MEET_TIMEOUT_S)
        except asyncio.TimeoutError:
            pass  # a group that never fills goes on: the answer still completes

    async def _render(self, key: str, make: Callable[[], bytes]) -> bytes:
        """``make()``'s bytes, from the cache or rendered once in the thread pool."""
        data = self._cache.get(key)
        if data is not None:
            return data
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().run_in_executor(None, make)
            self._pending[key] = pending
            try:
                data = await asyncio.shield(pending)
            finally:
                self._pending.pop(key, None)
            self._cache.put(key, data)
            return data
        return await asyncio.shield(pending)

    async def _body(self, entry: Entry) -> bytes:
        if entry.kind == "exact_duplicate":
            original = self.corpus.entries[entry.original]
            return await self._render(original.path, lambda: self.corpus.body(original))
        return await self._render(entry.path, lambda: self.corpus.body(entry))

    async def _entry(self, request: web.Request) -> web.StreamResponse:
        entry = self.corpus.entries.get(request.path)
        if entry is None:
            raise web.HTTPNotFound(text="nothing here\n")
        kind = entry.kind
        first = self._hits[request.path] == 1
        if kind == "not_found":
            raise web.HTTPNotFound(text="not found (on purpose)\n")
        if kind == "always_500" or (kind == "flaky_500" and first):
            return web.Response(status=500, text="server error (on purpose)\n")
        if kind == "always_429" or (kind == "rate_limited_once" and first):
            return web.Response(status=429, text="slow down (on purpose)\n",
                                headers={"Retry-After": "1"})
        if kind == "redirect_loop":
            raise web.HTTPFound(location=entry.original)
        if kind == "too_big":
            return await self._stream_too_big(request)
        if kind == "slow":
            task = asyncio.current_task()
            if task is not None:
                self._sleepers.add(task)
            try:
                await asyncio.sleep(self.slow_s)
            finally:
                self._sleepers.discard(task)
        headers = {"X-Robots-Tag": "noai"} if kind == "noai" else None
        data = await self._body(entry)
        return web.Response(body=data, content_type=entry.content_type, headers=headers)

    async def _stream_too_big(self, request: web.Request) -> web.StreamResponse:
        """``big_bytes`` of a JPEG-looking body, chunked, with no Content-Length."""
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            await resp.write(JPEG_HEAD)
            sent = len(JPEG_HEAD)
            while sent < self.big_bytes:
                chunk = _FILLER[: self.big_bytes - sent]
                await resp.write(chunk)
                sent += len(chunk)
            await resp.write_eof()
        except ConnectionError:
            pass  # the client stopped reading at its byte cap, as it should
        return resp


def _site_image(site: str, path: str, data_mining: str | None) -> bytes:
    """A JPEG for a site path (distinct per site and path), with ``plus:DataMining`` in its XMP
    when given."""
    pic = Picture(seed=derive_seed("site", site, path), width=320, height=240, quality=88,
                  hue=(derive_seed("hue", site, path) % 1000) / 1000)
    data = encode(pic)
    if data_mining is not None:
        data = jpeg_with_xmp(data, xmp_with_data_mining(data_mining))
    return data


def serve_forever(host: str = "127.0.0.1", port: int = 8800, **kwargs: Any) -> None:
    """Serve a ``SandboxWeb`` until Ctrl-C or SIGTERM (for ``pixcrawler sandbox``)."""
    sandbox = SandboxWeb(host=host, port=port, **kwargs)
    url = sandbox.start()
    if threading.current_thread() is threading.main_thread():
        # SIGTERM as Ctrl-C: the handler raises. One that set a threading.Event deadlocked
        # when the signal came while this thread held the event's lock inside its own wait
        # (a stop hung for good, now and then).
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"sandbox web serving at {url}  (classes: {', '.join(sandbox.classes)}; "
          f"try {url}/search?q={urllib.parse.quote(sandbox.classes[0])}; Ctrl-C to stop)",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        sandbox.stop()


__all__ = ["DEFAULT_CLASSES", "FAULTS", "SandboxWeb", "serve_forever"]
