"""The sandbox web's image-search endpoint, as an engine (``GET /search?q=&page=&per_page=``).

The sandbox runs on 127.0.0.1, so a spec using it sets ``download.allow_private_networks``; the
request goes through the same guarded client as every web engine (``webjson.fetch``).
"""

from __future__ import annotations

from builder.engines import webjson
from builder.engines.base import SearchEngine, SearchHit, SearchPage
from builder.errors import EngineError


class SandboxEngine(SearchEngine):
    name = "sandbox"

    def __init__(self, base_url: str, timeout_s: float = 10.0, *,
                 allow_private_networks: bool = False):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.allow_private_networks = allow_private_networks

    def search(self, query: str, *, label: str, page: int, per_page: int) -> SearchPage:
        body = webjson.fetch_json(f"{self.base_url}/search", engine=self.name,
                                  params={"q": query, "page": page, "per_page": per_page},
                                  timeout_s=self.timeout_s,
                                  allow_private_networks=self.allow_private_networks)
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
