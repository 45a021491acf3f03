"""Baidu image search through the JSON endpoint its web page uses (``/search/acjson``).

The endpoint needs no credentials, so unlike the keyed engines this one is always enabled; if
Baidu blocks the client it answers ``{"antiFlag": 1, "message": "Forbid spider access"}``, which
becomes a retryable ``EngineError`` so the rate limiter backs off and the fallback chain moves on.
It has no safe-search parameter: pair it with the NSFW validator.

Each ``data[]`` item carries Baidu-hosted copies (``middleURL``, ``thumbURL``: plain URLs that stay
up) and the original image's URL, ``objURL``, obfuscated with a fixed substitution
(``decode_baidu_url`` reverses it). By default hits use the Baidu-hosted copy; option
``original: true`` prefers the original. The body sometimes holds JavaScript-only escapes
(``\\'``), which are repaired before parsing.
"""

from __future__ import annotations

import re
from typing import Any

from builder.engines import webjson
from builder.engines.base import SearchEngine, SearchHit, SearchPage
from builder.errors import EngineError
from builder.spec import PUBLIC_ENDPOINTS

BAIDU_API = PUBLIC_ENDPOINTS["baidu"]
MAX_RN = 30
_TOKENS = {"_z2C$q": ":", "_z&e3B": ".", "AzdH3F": "/"}
_CHARS = str.maketrans("wkv1ju2it3hs4g5rq6fp7eo8dn9cm0bla", "abcdefghijklmnopqrstuvw1234567890")
_ESCAPES = re.compile(r'(\\["\\/bfnrtu])|\\')
"""A JSON escape pair (kept: group 1), or a backslash before anything else (dropped). Pairs
are matched from the left, so the second backslash of ``\\\\`` is never taken for one."""


def decode_baidu_url(obfuscated: Any) -> str:
    """The plain URL behind Baidu's ``objURL``/``fromURL`` obfuscation; plain URLs pass through.

    Anything but a non-blank string decodes to ``""``.
    """
    obfuscated = webjson.as_url(obfuscated)
    if not obfuscated or obfuscated.startswith(("http://", "https://")):
        return obfuscated
    parts = re.split("(" + "|".join(re.escape(t) for t in _TOKENS) + ")", obfuscated)
    return "".join(_TOKENS.get(p) or p.translate(_CHARS) for p in parts)


def parse_acjson(body: bytes) -> dict[str, Any]:
    """Parse an ``acjson`` answer, repairing the invalid escapes Baidu sometimes emits."""
    text = body.decode("utf-8", "replace")
    fixed = _ESCAPES.sub(r"\1", text)
    data = webjson.loads(fixed.encode("utf-8"), engine="baidu")
    if not isinstance(data, dict):
        raise EngineError("baidu: answer is not a JSON object", retryable=True)
    if data.get("antiFlag"):
        raise EngineError(f"baidu: blocked by Baidu ({data.get('message', 'antiFlag set')}); "
                          "slow down or use another engine", status=403, retryable=True)
    return data


class BaiduEngine(SearchEngine):
    name = "baidu"

    def __init__(self, base_url: str = BAIDU_API, *, original: bool = False,
                 timeout_s: float = 15.0, user_agent: str = webjson.DEFAULT_USER_AGENT,
                 allow_private_networks: bool = False):
        self.base_url = base_url
        self.allow_private_networks = allow_private_networks
        self.original = original
        self.timeout_s = timeout_s
        self.user_agent = user_agent

    def _params(self, query: str, pn: int, rn: int) -> dict[str, str]:
        return {"tn": "resultjson_com", "ipn": "rj", "ct": "201326592", "fp": "result",
                "queryWord": query, "word": query, "cl": "2", "lm": "-1", "ie": "utf-8",
                "oe": "utf-8", "st": "-1", "ic": "0", "face": "0", "istype": "2", "nc": "1",
                "pn": str(pn), "rn": str(rn)}

    def search(self, query: str, *, label: str, page: int, per_page: int) -> SearchPage:
        start, end = page * per_page, (page + 1) * per_page
        pos = start
        hits: list[SearchHit] = []
        has_more = True
        while pos < end:
            rn = min(MAX_RN, end - pos)
            body = webjson.fetch(self.base_url, engine=self.name,
                                 params=self._params(query, pos, rn),
                                 headers={"Referer": "https://image.baidu.com/"},
                                 timeout_s=self.timeout_s, user_agent=self.user_agent,
                                 allow_private_networks=self.allow_private_networks)
            data = parse_acjson(body)
            raw = data.get("data")
            items = [d for d in raw if isinstance(d, dict) and _image_url(d)] \
                if isinstance(raw, list) else []
            for i, item in enumerate(items):
                hits.append(self._hit(item, pos + i))
            total = webjson.as_int(data.get("listNum") or data.get("displayNum"))
            pos += rn
            if not items or (total and pos >= total):
                has_more = False
                break
        return SearchPage(hits=hits, has_more=has_more)

    def _hit(self, item: dict[str, Any], rank: int) -> SearchHit:
        original = _original_url(item)
        url = (original or _image_url(item)) if self.original else (_image_url(item) or original)
        replace = _replace_url(item)
        host = webjson.as_url(item.get("fromURLHost"))
        page_url = webjson.as_url(replace.get("FromURL")) or \
            decode_baidu_url(item.get("fromURL")) or (f"http://{host}/" if host else "")
        title = webjson.as_text(item.get("fromPageTitleEnc")) or \
            webjson.strip_html(item.get("fromPageTitle"))
        return SearchHit(url=url, rank=rank, page_url=page_url, title=title)


def _image_url(item: dict[str, Any]) -> str:
    return webjson.as_url(item.get("middleURL")) or webjson.as_url(item.get("thumbURL")) or \
        webjson.as_url(item.get("hoverURL"))


def _replace_url(item: dict[str, Any]) -> dict[str, Any]:
    """The first ``replaceUrl`` entry: the original image and page URLs, in plain text."""
    entries = item.get("replaceUrl")
    first = entries[0] if isinstance(entries, list) and entries else None
    return first if isinstance(first, dict) else {}


def _original_url(item: dict[str, Any]) -> str:
    replace = _replace_url(item)
    return webjson.as_url(replace.get("ObjURL")) or webjson.as_url(replace.get("ObjUrl")) or \
        decode_baidu_url(item.get("objURL"))
