"""Openverse (openly licensed images) through its public API.

``GET /v1/images/?q=&page=&page_size=`` answers ``results[]`` with each image's URL, landing page,
title, creator and Creative Commons license, plus ``page_count``. Our ``(page, per_page)`` is
mapped onto the API's fixed-size 1-based pages, so any ``per_page`` works.

Anonymous clients get pages of at most 20, a low request rate, and no result past the 240th
(``ANON_MAX_RESULTS``: the API refuses deeper pages, so a query ends there). Registered clients
(env ``OPENVERSE_CLIENT_ID`` / ``OPENVERSE_CLIENT_SECRET``, from ``POST /v1/auth_tokens/register/``)
get pages up to 500: the engine exchanges the credentials for an access token (OAuth client
credentials, ``POST /v1/auth_tokens/token/``), renews it before it expires, and once more when
the API answers 401 (``invalid_token``: revoked or expired early). A fixed token in env
``OPENVERSE_TOKEN`` still works, but cannot be renewed: a 401 then says how to set credentials.

The server's credentials and token from the environment are sent only to Openverse's own API
(the origin of ``OPENVERSE_API``): a spec's ``options.base_url`` elsewhere is searched
anonymously, with a warning, so a spec cannot collect them. Credentials or a token passed to the
constructor are sent to the ``base_url`` passed with them.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Optional

from builder.engines import webjson
from builder.engines.base import SearchEngine, SearchHit, SearchPage
from builder.errors import EngineError, SourceError
from builder.netguard import same_origin
from builder.spec import PUBLIC_ENDPOINTS
from builder.urls import without_secrets

log = logging.getLogger(__name__)

OPENVERSE_API = PUBLIC_ENDPOINTS["openverse"]
ANON_PAGE_SIZE = 20
AUTH_PAGE_SIZE = 500
ANON_MAX_RESULTS = 240
"""Anonymous queries end at the 240th result (12 pages of 20)."""
TOKEN_MARGIN_S = 60.0
"""A token is renewed this long before it expires."""
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
                 client_id: str | None = None, client_secret: str | None = None,
                 token_url: str | None = None, safesearch: str = "moderate",
                 filters: dict[str, Any] | None = None, timeout_s: float = 15.0,
                 user_agent: str = webjson.DEFAULT_USER_AGENT,
                 allow_private_networks: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        self.base_url = base_url
        self.allow_private_networks = allow_private_networks
        server = _server_credentials(base_url)
        self.client_id = client_id or server.get("OPENVERSE_CLIENT_ID")
        self.client_secret = client_secret or server.get("OPENVERSE_CLIENT_SECRET")
        if bool(self.client_id) != bool(self.client_secret):
            raise SourceError("openverse: set both OPENVERSE_CLIENT_ID and "
                              "OPENVERSE_CLIENT_SECRET (or neither, to search anonymously)")
        self.token_url = token_url or base_url.rstrip("/").rsplit("/", 1)[0] + \
            "/auth_tokens/token/"
        self.token = token if token is not None else server.get("OPENVERSE_TOKEN")
        self._clock = clock
        self._expires_at = float("inf")
        if self.client_id:
            self.token, self._expires_at = None, 0.0
        authenticated = bool(self.token or self.client_id)
        self.max_page_size = AUTH_PAGE_SIZE if authenticated else ANON_PAGE_SIZE
        self.max_results: Optional[int] = None if authenticated else ANON_MAX_RESULTS
        self.safesearch = safesearch
        self.filters = {k: str(v) for k, v in (filters or {}).items()
                        if k in FILTER_OPTIONS and v}
        self.timeout_s = timeout_s
        self.user_agent = user_agent

    def _renew(self) -> None:
        """Exchange the client credentials for an access token (OAuth client credentials)."""
        body = webjson.fetch_json(self.token_url, engine=self.name, form={
            "grant_type": "client_credentials", "client_id": self.client_id or "",
            "client_secret": self.client_secret or ""}, timeout_s=self.timeout_s,
            user_agent=self.user_agent, allow_private_networks=self.allow_private_networks)
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise EngineError(f"{self.name}: the token endpoint answered without an "
                              "access_token", retryable=True)
        lifetime = webjson.as_int(body.get("expires_in"), 3600)
        self.token = token
        self._expires_at = self._clock() + max(0.0, lifetime - TOKEN_MARGIN_S)

    def _headers(self) -> dict[str, str]:
        if self.client_id and (self.token is None or self._clock() >= self._expires_at):
            self._renew()
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _get(self, query: str, api_page: int, page_size: int) -> dict[str, Any]:
        params = {"q": query, "page": str(api_page), "page_size": str(page_size), **self.filters}
        if self.safesearch == "off":
            params["mature"] = "true"
        for attempt in range(2):
            try:
                body = webjson.fetch_json(self.base_url, engine=self.name, params=params,
                                          headers=self._headers(), timeout_s=self.timeout_s,
                                          user_agent=self.user_agent,
                                          allow_private_networks=self.allow_private_networks)
                break
            except EngineError as exc:
                if exc.status != 401 or not self.token:
                    raise
                if not self.client_id:
                    raise EngineError(
                        f"{self.name}: the access token was refused ({exc}); a fixed "
                        "OPENVERSE_TOKEN cannot be renewed: set OPENVERSE_CLIENT_ID and "
                        "OPENVERSE_CLIENT_SECRET instead", status=401, retryable=False) from None
                if attempt:
                    raise
                self.token = None  # revoked or expired early: renew once and ask again
        if not isinstance(body, dict) or not isinstance(body.get("results"), list):
            raise EngineError(f"{self.name}: answer has no 'results' list", retryable=True)
        return body

    def search(self, query: str, *, label: str, page: int, per_page: int) -> SearchPage:
        size = min(per_page, self.max_page_size)
        start, end = page * per_page, (page + 1) * per_page
        limit = self.max_results
        if limit is not None:
            limit = (limit // size) * size  # the API refuses a page reaching past the limit
        if limit is not None and end > limit:
            end = limit
            if start >= end:
                return SearchPage(hits=[], has_more=False)
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
        if limit is not None and end >= limit:
            has_more = False
        return SearchPage(hits=hits, has_more=has_more)


_SERVER_SECRETS = ("OPENVERSE_CLIENT_ID", "OPENVERSE_CLIENT_SECRET", "OPENVERSE_TOKEN")


def _server_credentials(base_url: str) -> dict[str, str]:
    """The server's Openverse credentials from the environment when ``base_url`` is
    Openverse's API, else none (and a warning)."""
    found = {k: v for k in _SERVER_SECRETS if (v := os.environ.get(k))}
    if found and not same_origin(base_url, OPENVERSE_API):
        log.warning("openverse: options.base_url %s is not Openverse's API; the server's "
                    "credentials are sent only to %s, so this source searches anonymously",
                    webjson.excerpt(without_secrets(base_url)), OPENVERSE_API)
        return {}
    return found


def _hit(r: dict[str, Any], rank: int) -> SearchHit:
    return SearchHit(url=webjson.as_url(r.get("url")), rank=rank,
                     page_url=webjson.as_url(r.get("foreign_landing_url")),
                     title=webjson.as_text(r.get("title")),
                     license=format_license(r.get("license"), r.get("license_version")),
                     author=webjson.as_text(r.get("creator")))
