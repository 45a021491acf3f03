"""The sandbox web's image-search endpoint, as an engine (``GET /search?q=&page=&per_page=``)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

from builder.engines import webjson
from builder.engines.base import SearchEngine, SearchHit, SearchPage
from builder.errors import EngineError
from builder.fetch import parse_retry_after


class SandboxEngine(SearchEngine):
    name = "sandbox"

    def __init__(self, base_url: str, timeout_s: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def search(self, query: str, *, label: str, page: int, per_page: int) -> SearchPage:
        qs = urllib.parse.urlencode({"q": query, "page": page, "per_page": per_page})
        url = f"{self.base_url}/search?{qs}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            retry_after = exc.headers.get("Retry-After") if exc.headers else None
            raise EngineError(f"sandbox search answered {exc.code}", status=exc.code,
                              retryable=exc.code == 429 or exc.code >= 500,
                              retry_after=parse_retry_after(retry_after)) from None
        except (urllib.error.URLError, OSError, ValueError, RecursionError) as exc:
            raise EngineError(f"sandbox search failed: {exc}") from None
        results = body.get("results", []) if isinstance(body, dict) else None
        if not isinstance(results, list):
            raise EngineError("sandbox search answered JSON without a 'results' list",
                              retryable=True)
        hits = [SearchHit(url=webjson.as_url(r.get("url")), rank=page * per_page + i,
                          page_url=webjson.as_url(r.get("page_url")),
                          title=webjson.as_text(r.get("title")),
                          license=webjson.as_text(r.get("license")),
                          author=webjson.as_text(r.get("author")),
                          caption=webjson.as_text(r.get("caption")))
                for i, r in enumerate(results)
                if isinstance(r, dict) and webjson.as_url(r.get("url"))]
        return SearchPage(hits=hits, has_more=bool(body.get("has_more")))
