"""Google image search through the Programmable Search (Custom Search JSON) API.

The API is being shut down: it is closed to new customers (a new key gets 403
``PERMISSION_DENIED``) and ends for everyone on 2027-01-01 (``SUNSET``). Until then the engine
works with an existing key and says so, with the date, when it is built; from the sunset on it
refuses to be built and names the engines to use instead.

Needs an API key (env ``GOOGLE_API_KEY``, or ``GOOGLE_CSE_KEY``) and a search engine id with
image search turned on (env ``GOOGLE_CSE_ID``); without them the engine is unavailable. The API
answers at most 10 results a request (``num``), 1-based ``start``, and never more than the first
100 results of a query. A 429 (per-minute rate) is retryable. A 403 is not, and is explained by
what Google's error says: a spent daily quota, or a key whose project has no access to the API
(what every key made after the API closed gets).

The server's key from the environment is sent only to Google's API (the origin of
``GOOGLE_API``): with a spec's ``options.base_url`` elsewhere the engine is unavailable, so a spec
cannot collect the key. A key passed to the constructor is sent to the ``base_url`` passed
with it.
"""

from __future__ import annotations

import logging
import os
from datetime import date
from typing import Any, Optional

from builder.engines import webjson
from builder.engines.base import SearchEngine, SearchHit, SearchPage
from builder.errors import EngineError, EngineNeedsKey, EngineSunset, EngineUnavailable
from builder.netguard import same_origin
from builder.spec import PUBLIC_ENDPOINTS

log = logging.getLogger("pixcrawler.engines.google")

GOOGLE_API = PUBLIC_ENDPOINTS["google"]
SUNSET = date(2027, 1, 1)
"""The day Google's Custom Search JSON API stops answering."""
ALTERNATIVES = "duckduckgo, bing, wikimedia or openverse"
_QUOTA_MARKERS = ("dailyLimitExceeded", "quotaExceeded", "rateLimitExceeded",
                  "userRateLimitExceeded", "RESOURCE_EXHAUSTED", "Quota exceeded")


def sunset_notice(today: Optional[date] = None) -> str:
    """The deprecation message, dated: days left, or how long ago it ended."""
    today = today or date.today()
    days = (SUNSET - today).days
    if days > 0:
        return (f"google: the Custom Search JSON API is closed to new customers (new keys get "
                f"403 PERMISSION_DENIED) and ends on {SUNSET.isoformat()}, in {days} day"
                f"{'s' if days != 1 else ''}; move to {ALTERNATIVES}")
    return (f"google: the Custom Search JSON API ended on {SUNSET.isoformat()}; use "
            f"{ALTERNATIVES} instead (engine: duckduckgo in the spec's sources)")


def explain_403(message: str) -> str:
    """What a 403 from the API means: a spent quota, or a key without access to the API."""
    if any(marker in message for marker in _QUOTA_MARKERS):
        return "google: 403: the key's daily quota is spent (it resets at midnight Pacific time)"
    return ("google: 403 PERMISSION_DENIED: this key's project has no access to the Custom "
            "Search JSON API. Google closed the API to new customers, so keys made since get "
            f"this answer; it is not a quota. Use {ALTERNATIVES} instead")
MAX_NUM = 10
MAX_RESULTS = 100
# SourceSpec.options keys passed through as API parameters.
FILTER_OPTIONS = ("imgSize", "imgType", "imgColorType", "imgDominantColor", "rights", "fileType")


class GoogleEngine(SearchEngine):
    name = "google"

    def __init__(self, base_url: str = GOOGLE_API, *, api_key: str | None = None,
                 cse_id: str | None = None, region: str = "wt-wt", safesearch: str = "moderate",
                 filters: dict[str, Any] | None = None, timeout_s: float = 15.0,
                 user_agent: str = webjson.DEFAULT_USER_AGENT,
                 allow_private_networks: bool = False, today: Optional[date] = None):
        if (today or date.today()) >= SUNSET:
            raise EngineSunset(sunset_notice(today))
        self.api_key = api_key or os.environ.get("GOOGLE_API_KEY") or \
            os.environ.get("GOOGLE_CSE_KEY") or ""
        if not api_key and self.api_key and not same_origin(base_url, GOOGLE_API):
            raise EngineUnavailable(
                f"google: options.base_url {webjson.excerpt(base_url)} is not Google's API "
                f"({GOOGLE_API}); the server's GOOGLE_API_KEY is sent only there: remove "
                "options.base_url")
        self.cse_id = cse_id or os.environ.get("GOOGLE_CSE_ID") or ""
        if not self.api_key or not self.cse_id:
            missing = [n for n, v in (("GOOGLE_API_KEY", self.api_key),
                                      ("GOOGLE_CSE_ID", self.cse_id)) if not v]
            raise EngineNeedsKey(
                "google: set GOOGLE_API_KEY and GOOGLE_CSE_ID (a Programmable Search engine id "
                f"with image search on) to use this engine; missing: {', '.join(missing)}. "
                f"Note: {sunset_notice(today).removeprefix('google: ')}")
        log.warning("%s", sunset_notice(today))
        self.base_url = base_url
        self.allow_private_networks = allow_private_networks
        self.safesearch = safesearch
        self.country = region.split("-")[0] if region and region != "wt-wt" else ""
        self.filters = {k: str(v) for k, v in (filters or {}).items()
                        if k in FILTER_OPTIONS and v}
        self.timeout_s = timeout_s
        self.user_agent = user_agent

    def _get(self, query: str, start: int, num: int) -> dict[str, Any]:
        params = {"key": self.api_key, "cx": self.cse_id, "q": query, "searchType": "image",
                  "start": str(start), "num": str(num),
                  "safe": "off" if self.safesearch == "off" else "active", **self.filters}
        if self.country:
            params["gl"] = self.country
        try:
            body = webjson.fetch_json(self.base_url, engine=self.name, params=params,
                                      timeout_s=self.timeout_s, user_agent=self.user_agent,
                                      allow_private_networks=self.allow_private_networks)
        except EngineError as exc:
            if exc.status != 403:
                raise
            raise EngineError(f"{explain_403(str(exc))} ({exc})", status=403,
                              retryable=False) from None
        if not isinstance(body, dict):
            raise EngineError(f"{self.name}: answer is not a JSON object", retryable=True)
        return body

    def search(self, query: str, *, label: str, page: int, per_page: int) -> SearchPage:
        start, end = page * per_page, min((page + 1) * per_page, MAX_RESULTS)
        pos = start
        hits: list[SearchHit] = []
        has_more = end < MAX_RESULTS
        while pos < end:
            body = self._get(query, pos + 1, min(MAX_NUM, end - pos))
            items = body.get("items")
            items = items if isinstance(items, list) else []
            for i, item in enumerate(items):
                link = webjson.as_url(item.get("link")) if isinstance(item, dict) else ""
                if link:
                    image = item.get("image")
                    context = image.get("contextLink") if isinstance(image, dict) else None
                    hits.append(SearchHit(url=link, rank=pos + i,
                                          page_url=webjson.as_url(context),
                                          title=webjson.as_text(item.get("title")),
                                          caption=webjson.as_text(item.get("snippet"))))
            pos += len(items)
            queries = body.get("queries")
            if not items or not isinstance(queries, dict) or not queries.get("nextPage"):
                has_more = False
                break
        return SearchPage(hits=hits, has_more=has_more)
