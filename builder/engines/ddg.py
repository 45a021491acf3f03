"""DuckDuckGo and Bing image search through the ``ddgs`` package (no credentials needed).

``ddgs`` fetches one page of its backend per call (DuckDuckGo's ``i.js`` gives about 100 images a
page, Bing's ``images/async`` 35), so this engine keeps, per query, the results fetched so far and
asks ``ddgs`` for the next backend page only when a requested page reaches past them. A backend
page that adds no new image ends the query; so does ddgs' "No results found." (which is also how
ddgs reports a non-200 answer from ``i.js``; a blocked client usually fails earlier, at the ``vqd``
token fetch, and that failure is a retryable ``EngineError``).

The backend is checked when the engine is built: ddgs falls back to ``auto`` (every backend,
DuckDuckGo first) for a backend it does not have, with only a log line, so ``engine: bing`` on a
ddgs older than 9.13 (which added Bing images) would quietly answer from DuckDuckGo. Here a
missing backend makes the engine unavailable, with the version to install.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from builder.engines import webjson
from builder.engines.base import SearchEngine, SearchHit, SearchPage
from builder.errors import EngineError, EngineUnavailable, SourceError

# SourceSpec.options keys passed through to ``DDGS.images`` (DuckDuckGo's filters).
FILTER_OPTIONS = ("size", "color", "type_image", "layout", "license_image")
_NO_RESULTS = "No results found."
MIN_DDGS = {"bing": "9.13"}
"""The first ddgs release with each images backend (where later than 9.0)."""


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


@dataclass
class _QueryResults:
    hits: list[SearchHit] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    next_page: int = 1
    exhausted: bool = False


class DdgsImagesEngine(SearchEngine):
    """Image search via ``DDGS().images(..., backend=...)``.

    ``backend="duckduckgo"`` honours ``safesearch`` (DuckDuckGo's ``p`` parameter) and the
    DuckDuckGo filters in ``filters`` (size, color, type_image, layout, license_image).
    """

    name = "duckduckgo"
    backend = "duckduckgo"

    def __init__(self, *, region: str = "wt-wt", safesearch: str = "moderate",
                 filters: Mapping[str, str] | None = None, timeout_s: float = 10.0,
                 proxy: str | None = None, max_backend_pages: int = 10):
        try:
            from ddgs import DDGS
        except ImportError:
            raise EngineUnavailable(f"{self.name}: needs the 'ddgs' package "
                                    "(pip install 'pixcrawler[search]')") from None
        unknown = sorted(set(filters or {}) - set(FILTER_OPTIONS))
        if unknown:
            raise SourceError(f"{self.name}: unknown filter option(s) {unknown}; "
                                    f"valid: {', '.join(FILTER_OPTIONS)}")
        check_backend(self.name, self.backend)
        self.region = region
        self.safesearch = safesearch
        self.filters = {k: str(v) for k, v in (filters or {}).items() if v}
        self.max_backend_pages = max_backend_pages
        self._ddgs = DDGS(proxy=proxy, timeout=max(1, math.ceil(timeout_s)))
        self._cache: dict[str, _QueryResults] = {}

    def search(self, query: str, *, label: str, page: int, per_page: int) -> SearchPage:
        state = self._cache.setdefault(query, _QueryResults())
        start, end = page * per_page, (page + 1) * per_page
        while len(state.hits) < end and not state.exhausted:
            self._fetch_next(query, state)
        hits = [SearchHit(url=h.url, rank=start + i, page_url=h.page_url, title=h.title)
                for i, h in enumerate(state.hits[start:end])]
        return SearchPage(hits=hits, has_more=len(state.hits) > end or not state.exhausted)

    def _fetch_next(self, query: str, state: _QueryResults) -> None:
        from ddgs.exceptions import DDGSException, RatelimitException, TimeoutException

        try:
            results = self._ddgs.images(query, region=self.region, safesearch=self.safesearch,
                                        max_results=None, page=state.next_page,
                                        backend=self.backend, **self.filters)
        except RatelimitException as exc:
            raise EngineError(f"{self.name}: rate limited: {exc}", status=429,
                              retryable=True) from None
        except TimeoutException as exc:
            raise EngineError(f"{self.name}: timed out: {exc}", retryable=True) from None
        except DDGSException as exc:
            if str(exc) == _NO_RESULTS:
                state.exhausted = True
                return
            raise EngineError(f"{self.name}: search failed: {exc}", retryable=True) from None
        state.next_page += 1
        added = 0
        for r in results if isinstance(results, list) else []:
            url = webjson.as_url(r.get("image")) if isinstance(r, dict) else ""
            if not url or url in state.seen:
                continue
            state.seen.add(url)
            state.hits.append(SearchHit(url=url, page_url=webjson.as_url(r.get("url")),
                                        title=webjson.as_text(r.get("title"))))
            added += 1
        if added == 0 or state.next_page > self.max_backend_pages:
            state.exhausted = True

    def close(self) -> None:
        self._cache.clear()


class BingImagesEngine(DdgsImagesEngine):
    """Bing image search via ``ddgs`` (``backend="bing"``).

    Bing's ``images/async`` endpoint as ddgs calls it takes no safe-search or filter parameters:
    ``safesearch`` and the filter options are ignored here, so pair this engine with the NSFW
    validator.
    """

    name = "bing"
    backend = "bing"
