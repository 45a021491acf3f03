"""DuckDuckGo and Bing image search through the ``ddgs`` package (no credentials needed).

``ddgs`` fetches one page of its backend per call (DuckDuckGo's ``i.js`` gives about 100 images a
page, Bing's ``images/async`` 35), so this engine keeps, per query, the results fetched so far and
asks ``ddgs`` for the next backend page only when a requested page reaches past them. A backend
page that adds no new image ends the query, and so does a backend page with no results.

The backend's search class is used directly, not through ``DDGS.images``: that wrapper answers
every failure it does not raise (a 403 block, a 429 rate limit, a 5xx) with "No results
found.", which would end the query as if the engine had nothing more. Here a non-200 answer is
an ``EngineError`` with its status (429 and 5xx retryable, as for the other engines), and the
query stays open for the next try.

Bing can also answer with its bot check (a captcha page) under HTTP 200; ddgs finds no results
in it, which would end the query just the same. A 200 page with no results that carries one of
the backend's ``CHALLENGE_MARKERS`` is a retryable ``EngineError`` too, counted as Bing's rate
limit (status 429). DuckDuckGo needs no markers: its results page is JSON, so a challenge
page there already fails to parse (a retryable ``EngineError``), and a block of its token page
leaves no ``vqd`` (the same).

The backend is checked when the engine is built: ddgs falls back to ``auto`` (every backend,
DuckDuckGo first) for a backend it does not have, with only a log line, so ``engine: bing`` on a
ddgs older than 9.13 (which added Bing images) would quietly answer from DuckDuckGo. Here a
missing backend makes the engine unavailable, with the version to install.
"""

from __future__ import annotations

import importlib.util
import math
import threading
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping

from builder.engines import webjson
from builder.engines.base import SearchEngine, SearchHit, SearchPage, count_request
from builder.engines.webjson import RETRYABLE_STATUSES
from builder.errors import EngineError, EngineUnavailable, SourceError
from builder.netguard import REDIRECT_STATUSES, same_origin

MAX_REDIRECTS = 5
"""Redirects a backend request follows (within the backend's own site: ``_Counted``)."""
_BODY_AND_QUERY = ("params", "data", "json", "content", "files")
"""A request's parts that a redirect's target (a full URL, fetched with GET) replaces."""
# SourceSpec.options keys passed through to the backend (DuckDuckGo's filters).
FILTER_OPTIONS = ("size", "color", "type_image", "layout", "license_image")
MIN_DDGS = {"bing": "9.13"}
"""The first ddgs release with each images backend (where later than 9.0)."""
CHALLENGE_MARKERS: dict[str, tuple[str, ...]] = {
    "bing": ("/turing/captcha/", "challenges.cloudflare.com/turnstile", "/challenge/verify"),
}
"""Per backend, lower-case strings of its bot-check page, looked for only in a 200 answer with
no results. Bing's challenge lives at ``/turing/captcha/challenge`` (a search it challenges
embeds or sends there), shows a Cloudflare Turnstile widget and posts to
``/challenge/verify``. An empty results page of ``images/async`` has none of them; the visible
text ("One last step") is localized, so it is not used."""


def check_backend(engine: str, backend: str) -> None:
    """Refuse (``EngineUnavailable``) when the installed ddgs has no ``backend`` for images:
    it would silently search another one."""
    import ddgs
    from ddgs.engines import ENGINES

    available = sorted(ENGINES.get("images", {}))
    if backend not in available:
        need = MIN_DDGS.get(backend, "9")
        raise EngineUnavailable(
            f"{engine}: ddgs {getattr(ddgs, '__version__', '?')} has no {backend!r} images "
            f"backend (it has: {', '.join(available) or 'none'}); it would answer from another "
            f"search engine instead. Install ddgs>={need}: pip install 'ddgs>={need}'")


class _Refused(Exception):
    """A backend page answered with a status other than 200."""

    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


class _Challenged(Exception):
    """A backend page answered 200 with the service's bot check instead of results."""

    def __init__(self, marker: str):
        super().__init__(f"bot check ({marker})")
        self.marker = marker


def _challenge_marker(backend: str, text: str) -> str | None:
    """The first of ``backend``'s ``CHALLENGE_MARKERS`` in ``text``, or None."""
    lowered = text.lower()
    return next((m for m in CHALLENGE_MARKERS.get(backend, ()) if m in lowered), None)


class _Counted:
    """ddgs' HTTP client, counting each request it sends (``count_request``) for the rate
    limiter: a DuckDuckGo page is two (its token page, then the results)."""

    def __init__(self, client: Any):
        self._client = client

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        """The answer, following the backend's redirects within its own site only.

        ddgs' client (``primp``, in Rust) would follow any redirect, to any host: past the
        checks every other engine's requests pass (``netguard``), to a loopback or private
        address whose answer ends up quoted in the job's search errors. A redirect elsewhere,
        or past ``MAX_REDIRECTS``, is a refused page (``_Refused``)."""
        kwargs["follow_redirects"] = False
        for _ in range(MAX_REDIRECTS + 1):
            count_request()
            resp = self._client.request(method, url, *args, **kwargs)
            location = _location(resp) if resp.status_code in REDIRECT_STATUSES else ""
            if not location:
                return resp
            target = urllib.parse.urljoin(url, location)
            if not same_origin(url, target) or \
                    (method.upper() != "GET" and resp.status_code != 303):
                raise _Refused(resp.status_code, f"a redirect to {webjson.redact(target)}, not "
                               "followed: only a GET's redirects within the backend's own "
                               "site are")
            method, url, args = "GET", target, ()
            kwargs = {k: v for k, v in kwargs.items() if k not in _BODY_AND_QUERY}
        raise _Refused(resp.status_code, f"more than {MAX_REDIRECTS} redirects")

    def get(self, url: str, *args: Any, **kwargs: Any) -> Any:
        return self.request("GET", url, *args, **kwargs)

    def post(self, url: str, *args: Any, **kwargs: Any) -> Any:
        return self.request("POST", url, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "_client":  # not set yet (a copy being made)
            raise AttributeError(name)
        return getattr(self._client, name)


def _location(resp: Any) -> str:
    """A ddgs response's ``Location`` header ('' if none; primp gives header names in lower
    case)."""
    headers = getattr(getattr(resp, "_resp", None), "headers", None) or {}
    return str(headers.get("location") or "")


def _backend_class(backend: str) -> type:
    """ddgs' search class for ``backend``, with a ``request`` that raises ``_Refused`` for a
    non-200 answer where ddgs' own returns None (read as "no results"), an
    ``extract_results`` that raises ``_Challenged`` for a bot-check page without results,
    and its HTTP client's requests counted (``_Counted``)."""
    from ddgs.engines import ENGINES

    base = ENGINES["images"][backend]

    class Checked(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.http_client = _Counted(self.http_client)

        def request(self, *args: object, **kwargs: object) -> str:
            resp = self.http_client.request(*args, **kwargs)
            if resp.status_code != 200:
                raise _Refused(resp.status_code, resp.text or "")
            return resp.text

        def extract_results(self, html_text: str) -> list[object]:
            results: list[object] = super().extract_results(html_text)
            # Only a page without results is looked at: one with results is no bot check,
            # and a marker-like string in a result (a page URL) must not throw it away.
            marker = None if results else _challenge_marker(backend, html_text)
            if marker:
                raise _Challenged(marker)
            return results

    Checked.__name__ = f"Checked{base.__name__}"
    return Checked


@dataclass
class _QueryResults:
    hits: list[SearchHit] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    next_page: int = 1
    exhausted: bool = False
    counted: int = 0
    """Of ``hits``, those the engine's total counts."""


QUERIES_KEPT = 4096
"""The most queries an engine keeps (those that found nothing weigh nothing in hits)."""
HITS_KEPT = 50_000
"""The most hits an engine keeps (about 26 MB), the least recently searched queries' dropped
first: a query's later pages are cut from the hits its first backend pages gave, and one
dropped fetches them again. Kept for every query, a job of thousands of queries held a
gigabyte of hits in each worker."""


class DdgsImagesEngine(SearchEngine):
    """Image search through ddgs' ``backend`` search class (see the module docstring).

    ``backend="duckduckgo"`` honours ``safesearch`` (DuckDuckGo's ``p`` parameter) and the
    DuckDuckGo filters in ``filters`` (size, color, type_image, layout, license_image).
    """

    name = "duckduckgo"
    backend = "duckduckgo"

    def __init__(self, *, region: str = "wt-wt", safesearch: str = "moderate",
                 filters: Mapping[str, str] | None = None, timeout_s: float = 10.0,
                 proxy: str | None = None, max_backend_pages: int = 10):
        if importlib.util.find_spec("ddgs") is None:
            raise EngineUnavailable(f"{self.name}: needs the 'ddgs' package "
                                    "(pip install 'pixcrawler[search]')")
        unknown = sorted(set(filters or {}) - set(FILTER_OPTIONS))
        if unknown:
            raise SourceError(f"{self.name}: unknown filter option(s) {unknown}; "
                                    f"valid: {', '.join(FILTER_OPTIONS)}")
        check_backend(self.name, self.backend)
        self.region = region
        self.safesearch = safesearch
        self.filters = {k: str(v) for k, v in (filters or {}).items() if v}
        self.max_backend_pages = max_backend_pages
        self._backend = _backend_class(self.backend)(proxy=proxy,
                                                     timeout=max(1, math.ceil(timeout_s)))
        self._cache: OrderedDict[str, _QueryResults] = OrderedDict()
        self._kept = 0
        """The hits the cache holds (each query's ``counted``)."""
        self._lock = threading.Lock()
        """Guards the cache: a worker's units search on threads of their own."""

    def search(self, query: str, *, label: str, page: int, per_page: int) -> SearchPage:
        with self._lock:
            state = self._cache.get(query)
            if state is None:
                state = self._cache[query] = _QueryResults()
            self._cache.move_to_end(query)
        start, end = page * per_page, (page + 1) * per_page
        while len(state.hits) < end and not state.exhausted:
            self._fetch_next(query, state)
        with self._lock:
            if self._cache.get(query) is state:
                self._kept += len(state.hits) - state.counted
                state.counted = len(state.hits)
            while (self._kept > HITS_KEPT or len(self._cache) > QUERIES_KEPT) and \
                    len(self._cache) > 1:  # the query searched last is the last to go
                self._kept -= self._cache.popitem(last=False)[1].counted
        hits = [SearchHit(url=h.url, rank=start + i, page_url=h.page_url, title=h.title)
                for i, h in enumerate(state.hits[start:end])]
        return SearchPage(hits=hits, has_more=len(state.hits) > end or not state.exhausted)

    def _fetch_next(self, query: str, state: _QueryResults) -> None:
        from ddgs.exceptions import DDGSException, TimeoutException

        try:
            results = self._backend.search(query, region=self.region,
                                           safesearch=self.safesearch, page=state.next_page,
                                           **self.filters)
        except _Refused as exc:
            detail = webjson.excerpt(" ".join(exc.body.split()))
            # These backends answer a limited address with 400 or 418 too (ddgs' own
            # rate-limit check reads both so): the governor hears a 429, which slows the pace.
            status = 429 if exc.status in (400, 418) else exc.status
            raise EngineError(f"{self.name}: the {self.backend} backend answered HTTP "
                              f"{exc.status}" + (f": {detail}" if detail else "")
                              + (" (a block: slow down, or set a proxy)"
                                 if status in (403, 429) else ""),
                              status=status, retryable=status in RETRYABLE_STATUSES
                              ) from None
        except _Challenged as exc:
            # 429: the bot check is the service's rate limit in another form, so the governor
            # backs off and counts it as rate-limited, and a probe reports the source blocked.
            raise EngineError(f"{self.name}: the {self.backend} backend answered HTTP 200 with "
                              f"its bot check (a captcha page, {exc.marker!r}) instead of "
                              "results: it is limiting this address. The query stays open; wait "
                              "a while before searching again, set a proxy, or use another "
                              "engine", status=429, retryable=True) from None
        except TimeoutException as exc:
            raise EngineError(f"{self.name}: timed out: {exc}", retryable=True) from None
        except (DDGSException, ValueError, LookupError, TypeError, AttributeError) as exc:
            # ddgs' own errors (a failed request, no vqd token), or an answer its parser
            # cannot take (JSON that is not its shape, values of the wrong types).
            raise EngineError(f"{self.name}: search failed: {type(exc).__name__}: "
                              f"{webjson.excerpt(str(exc))}", retryable=True) from None
        state.next_page += 1
        added = 0
        for r in results or []:
            url = webjson.as_url(getattr(r, "image", None))
            if not url or url in state.seen:
                continue
            state.seen.add(url)
            state.hits.append(SearchHit(url=url, page_url=webjson.as_url(getattr(r, "url", None)),
                                        title=webjson.as_text(getattr(r, "title", None))))
            added += 1
        if added == 0 or state.next_page > self.max_backend_pages:
            state.exhausted = True

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
            self._kept = 0


class BingImagesEngine(DdgsImagesEngine):
    """Bing image search via ``ddgs`` (``backend="bing"``).

    Bing's ``images/async`` endpoint as ddgs calls it takes no safe-search or filter parameters:
    ``safesearch`` and the filter options are ignored here, so pair this engine with the NSFW
    validator.
    """

    name = "bing"
    backend = "bing"
