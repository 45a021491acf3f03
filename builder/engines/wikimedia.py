"""Wikimedia Commons image search through the public MediaWiki API (no credentials needed).

One ``action=query`` call searches the File namespace (``generator=search``, ``gsrnamespace=6``)
and returns each file's URL, size, MIME type and license metadata (``prop=imageinfo`` with
``extmetadata``). Page ``p`` of ``per_page`` covers the search offsets
``[p*per_page, (p+1)*per_page)``; files that are not raster images (PDFs, audio, video, SVG) are
dropped from it, so a page may hold fewer hits than ``per_page``. The search adds
``filetype:bitmap`` (CirrusSearch syntax) so few are. Wikimedia asks API clients for a
descriptive User-Agent; ours names PixCrawler.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from builder.engines import webjson
from builder.engines.base import SearchEngine, SearchHit, SearchPage
from builder.errors import EngineError
from builder.spec import PUBLIC_ENDPOINTS

COMMONS_API = PUBLIC_ENDPOINTS["wikimedia"]
MAX_LIMIT = 50
RASTER_MIMES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp", "image/tiff",
                          "image/bmp"})
_RETRYABLE_API_ERRORS = ("maxlag", "ratelimited", "readonly", "internal_api_error")


class WikimediaEngine(SearchEngine):
    name = "wikimedia"

    def __init__(self, base_url: str = COMMONS_API, *, timeout_s: float = 15.0,
                 user_agent: str = webjson.DEFAULT_USER_AGENT, filetype: str = "bitmap",
                 thumb_width: int | None = None, allow_private_networks: bool = False):
        self.base_url = base_url
        self.allow_private_networks = allow_private_networks
        self.timeout_s = timeout_s
        self.user_agent = user_agent
        self.filetype = filetype
        self.thumb_width = thumb_width

    def _params(self, query: str, offset: int, limit: int) -> dict[str, Any]:
        search = f"{query} filetype:{self.filetype}" if self.filetype else query
        params: dict[str, Any] = {
            "action": "query", "format": "json", "formatversion": "2",
            "generator": "search", "gsrnamespace": "6", "gsrsearch": search,
            "gsrlimit": str(limit), "gsroffset": str(offset),
            "prop": "imageinfo", "iiprop": "url|extmetadata|size|mime",
            "iiextmetadatafilter": "LicenseShortName|Artist|ObjectName|ImageDescription",
        }
        if self.thumb_width:
            params["iiurlwidth"] = str(self.thumb_width)
        return params

    def search(self, query: str, *, label: str, page: int, per_page: int) -> SearchPage:
        start, end = page * per_page, (page + 1) * per_page
        pos = start
        hits: list[SearchHit] = []
        has_more = True
        while pos < end:
            body = webjson.fetch_json(self.base_url, engine=self.name,
                                      params=self._params(query, pos, min(MAX_LIMIT, end - pos)),
                                      timeout_s=self.timeout_s, user_agent=self.user_agent,
                                      allow_private_networks=self.allow_private_networks)
            _raise_api_error(body)
            pages = _pages(body)
            for offset, p in enumerate(pages):
                hit = self._hit(p, rank=pos + offset)
                if hit is not None:
                    hits.append(hit)
            cont = body.get("continue")
            next_offset = webjson.as_int(cont.get("gsroffset"), -1) \
                if isinstance(cont, dict) else -1
            if next_offset < 0:
                has_more = False
                break
            if next_offset <= pos:
                raise EngineError(f"{self.name}: API continued at offset {next_offset} after "
                                  f"{pos}; refusing to loop", retryable=False)
            pos = next_offset
        return SearchPage(hits=hits, has_more=has_more)

    def _hit(self, page: dict[str, Any], *, rank: int) -> SearchHit | None:
        infos = page.get("imageinfo")
        info = infos[0] if isinstance(infos, list) and infos else None
        if not isinstance(info, dict) or webjson.as_text(info.get("mime")) not in RASTER_MIMES:
            return None
        url = webjson.as_url(info.get("thumburl")) or webjson.as_url(info.get("url"))
        if not url:
            return None
        meta = info.get("extmetadata")
        meta = meta if isinstance(meta, dict) else {}
        title = webjson.strip_html(_meta(meta, "ObjectName")) or \
            PurePosixPath(webjson.as_text(page.get("title")).removeprefix("File:")).stem
        return SearchHit(url=url, rank=rank, page_url=webjson.as_url(info.get("descriptionurl")),
                         title=title, license=webjson.strip_html(_meta(meta, "LicenseShortName")),
                         author=webjson.strip_html(_meta(meta, "Artist")),
                         caption=webjson.strip_html(_meta(meta, "ImageDescription"))[:1000])


def _meta(meta: dict[str, Any], key: str) -> str:
    entry = meta.get(key)
    value = entry.get("value") if isinstance(entry, dict) else entry
    return webjson.as_text(value)


def _pages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The result pages in search order (formatversion=2 gives a list, 1 a dict by page id)."""
    query = body.get("query")
    pages = query.get("pages") if isinstance(query, dict) else None
    if isinstance(pages, dict):
        pages = list(pages.values())
    if not isinstance(pages, list):
        return []
    pages = [p for p in pages if isinstance(p, dict)]
    return sorted(pages, key=lambda p: webjson.as_int(p.get("index")))


def _raise_api_error(body: Any) -> None:
    if not isinstance(body, dict):
        raise EngineError("wikimedia: API answered a non-object JSON", retryable=True)
    err = body.get("error")
    if isinstance(err, dict):
        code = webjson.as_text(err.get("code"))
        raise EngineError(f"wikimedia: API error {code}: {webjson.as_text(err.get('info'))}",
                          retryable=code.startswith(_RETRYABLE_API_ERRORS),
                          status=429 if code == "ratelimited" else 0)
