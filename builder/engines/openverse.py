"""Openverse (openly licensed images) through its public API.

``GET /v1/images/?q=&page=&page_size=`` answers ``results[]`` with each image's URL, landing page,
title, creator and Creative Commons license, plus ``page_count``. It works without credentials
(anonymous clients get pages of at most 20 and a low request rate); an OAuth access token in env
``OPENVERSE_TOKEN`` raises both (pages up to 500). Our ``(page, per_page)`` is mapped onto the
API's fixed-size 1-based pages, so any ``per_page`` works.

The server's ``OPENVERSE_TOKEN`` is sent only to Openverse's own API (the origin of
``OPENVERSE_API``): a spec's ``options.base_url`` elsewhere is searched anonymously, with a
warning, so a spec cannot collect the token. A token passed to the constructor is sent to the
``base_url`` passed with it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from builder.engines import webjson
from builder.engines.base import SearchEngine, SearchHit, SearchPage
from builder.errors import EngineError
from builder.netguard import same_origin

log = logging.getLogger(__name__)

OPENVERSE_API = "https://api.openverse.org/v1/images/"
ANON_PAGE_SIZE = 20
AUTH_PAGE_SIZE = 500
# SourceSpec.options keys passed through as Openverse query filters.
FILTER_OPTIONS = ("license", "license_type", "category", "aspect_ratio", "size", "source",
                  "extension")


def format_license(code: Any, version: Any = "") -> str:
    """Openverse's ``license``/``license_version`` as a readable name: ``CC BY-SA 2.0``."""
    code = code.strip().lower() if isinstance(code, str) else ""
    if not code:
        return ""
    if code == "cc0":
        name = "CC0"
    elif code == "pdm":
        name = "Public Domain Mark"
    else:
        name = "CC " + code.upper()
    return f"{name} {webjson.as_text(version)}".strip()


class OpenverseEngine(SearchEngine):
    name = "openverse"

    def __init__(self, base_url: str = OPENVERSE_API, *, token: str | None = None,
                 safesearch: str = "moderate", filters: dict[str, Any] | None = None,
                 timeout_s: float = 15.0, user_agent: str = webjson.DEFAULT_USER_AGENT,
                 allow_private_networks: bool = False):
        self.base_url = base_url
        self.allow_private_networks = allow_private_networks
        self.token = token if token is not None else _server_token(base_url)
        self.max_page_size = AUTH_PAGE_SIZE if self.token else ANON_PAGE_SIZE
        self.safesearch = safesearch
        self.filters = {k: str(v) for k, v in (filters or {}).items()
                        if k in FILTER_OPTIONS and v}
        self.timeout_s = timeout_s
        self.user_agent = user_agent

    def _get(self, query: str, api_page: int, page_size: int) -> dict[str, Any]:
        params = {"q": query, "page": str(api_page), "page_size": str(page_size), **self.filters}
        if self.safesearch == "off":
            params["mature"] = "true"
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        body = webjson.fetch_json(self.base_url, engine=self.name, params=params,
                                  headers=headers, timeout_s=self.timeout_s,
                                  user_agent=self.user_agent,
                                  allow_private_networks=self.allow_private_networks)
        if not isinstance(body, dict) or not isinstance(body.get("results"), list):
            raise EngineError(f"{self.name}: answer has no 'results' list", retryable=True)
        return body

    def search(self, query: str, *, label: str, page: int, per_page: int) -> SearchPage:
        size = min(per_page, self.max_page_size)
        start, end = page * per_page, (page + 1) * per_page
        hits: list[SearchHit] = []
        has_more = True
        for api_page in range(start // size + 1, (end - 1) // size + 2):
            body = self._get(query, api_page, size)
            results = body["results"]
            for i, r in enumerate(results):
                offset = (api_page - 1) * size + i
                if start <= offset < end and isinstance(r, dict) and webjson.as_url(r.get("url")):
                    hits.append(_hit(r, offset))
            page_count = webjson.as_int(body.get("page_count"))
            if api_page >= page_count or len(results) < size:
                has_more = False
                break
        return SearchPage(hits=hits, has_more=has_more)


def _server_token(base_url: str) -> str | None:
    """``OPENVERSE_TOKEN`` when ``base_url`` is Openverse's API, else None (and a warning)."""
    token = os.environ.get("OPENVERSE_TOKEN") or None
    if token and not same_origin(base_url, OPENVERSE_API):
        log.warning("openverse: options.base_url %s is not Openverse's API; the server's "
                    "OPENVERSE_TOKEN is sent only to %s, so this source searches anonymously",
                    webjson.excerpt(base_url), OPENVERSE_API)
        return None
    return token


def _hit(r: dict[str, Any], rank: int) -> SearchHit:
    return SearchHit(url=webjson.as_url(r.get("url")), rank=rank,
                     page_url=webjson.as_url(r.get("foreign_landing_url")),
                     title=webjson.as_text(r.get("title")),
                     license=format_license(r.get("license"), r.get("license_version")),
                     author=webjson.as_text(r.get("creator")))
