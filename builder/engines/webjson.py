"""HTTP GET of a JSON web API for the engines, with failures mapped to ``EngineError``.

Every web engine talks to its API the same way: a GET with a timeout and a User-Agent, a 429 or
5xx is a retryable ``EngineError`` carrying ``Retry-After``, other 4xx are not retryable, and a body
that is not the JSON the API promised is retryable (blocked clients often get an HTML page).
Secrets in the query string (``key=``) never appear in error messages.

Requests go through the SSRF guard (``builder.netguard.open_guarded``), like the image fetcher's:
http and https only, every redirect hop vetted, the connected address checked, private and
loopback addresses refused unless the spec's ``download.allow_private_networks`` is set. A URL
the guard refuses is a non-retryable ``EngineError`` and nothing is requested. A request ends
within about its timeout whatever the server sends (connect, headers and body together; past it,
a retryable ``EngineError``), answers are read up to ``MAX_ANSWER_BYTES``, and an error body is
quoted in a message only as a short printable excerpt (``excerpt``).
"""

from __future__ import annotations

import html
import http.client
import json
import re
import urllib.error
import urllib.parse
from typing import Any, Mapping

from builder.engines.base import count_request
from builder.errors import EngineError, printable
from builder.fetch import parse_retry_after  # one Retry-After parser for fetches and engines
from builder.netguard import BlockedAddressError, UrlRejected, open_guarded
from builder.urls import SECRET_PARAMS

DEFAULT_USER_AGENT = "PixCrawler/0.1 (+https://github.com/pixcrawler/pixcrawler)"
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_ANSWER_BYTES = 16 * 1024 * 1024
"""The largest API answer read; a bigger one is a non-retryable ``EngineError``."""
MAX_EXCERPT_CHARS = 200
"""The most characters of a server's answer (or a URL) quoted in an error message."""
_READ_CHUNK = 64 * 1024
def redact(url: str) -> str:
    """The URL with secret query parameters blanked, for messages and logs."""
    return SECRET_PARAMS.sub(r"\1***", url)


def excerpt(data: bytes | str, limit: int = MAX_EXCERPT_CHARS) -> str:
    """At most ``limit`` characters of ``data`` for a message: whitespace collapsed, other
    unprintable characters shown as ``?``, an ellipsis where it was cut."""
    text = printable(data.decode("utf-8", "replace") if isinstance(data, bytes) else data)
    return text if len(text) <= limit else text[:limit] + "\u2026"


def with_params(url: str, params: Mapping[str, Any] | None) -> str:
    """``url`` with ``params`` added to its query; a fragment is dropped (a ``#`` at the end
    of a base URL would otherwise swallow the parameters)."""
    parts = urllib.parse.urlsplit(url)
    query = parts.query
    if params:
        query = (query + "&" if query else "") + urllib.parse.urlencode(params)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def fetch(url: str, *, engine: str, params: Mapping[str, Any] | None = None,
          headers: Mapping[str, str] | None = None, timeout_s: float = 15.0,
          user_agent: str = DEFAULT_USER_AGENT, allow_private_networks: bool = False,
          form: Mapping[str, str] | None = None) -> bytes:
    """GET ``url`` (with ``params`` appended) through the SSRF guard and return the body;
    failures raise EngineError. With ``form``, POST it URL-encoded instead (an OAuth token
    request)."""
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    try:
        url = with_params(url, params)
    except ValueError as exc:
        raise EngineError(f"{engine}: cannot request {excerpt(redact(url))}: {exc} (check the "
                          "source's options.base_url)", retryable=False) from None
    shown = excerpt(redact(url))
    count_request()
    try:
        with open_guarded(url, headers={"User-Agent": user_agent, "Accept": "application/json",
                                        **(headers or {})},
                          timeout_s=timeout_s, allow_private_networks=allow_private_networks,
                          data=data) as resp:
            return _read_bounded(resp, engine=engine, shown=shown, timeout_s=timeout_s)
    except UrlRejected as exc:
        raise EngineError(f"{engine}: refused to request {shown}: {exc.detail} (engines speak "
                          "http/https to public addresses only; private ones need "
                          "download.allow_private_networks)", retryable=False) from None
    except urllib.error.HTTPError as exc:
        status = exc.code
        retry_after = parse_retry_after(exc.headers.get("Retry-After") if exc.headers else None)
        try:
            detail = excerpt(exc.read(MAX_EXCERPT_CHARS * 4)).strip()
        except (OSError, http.client.HTTPException):
            detail = ""
        finally:
            exc.close()
        raise EngineError(f"{engine}: {shown} answered HTTP {status}"
                          + (f": {detail}" if detail else ""),
                          status=status, retryable=status in RETRYABLE_STATUSES,
                          retry_after=retry_after) from None
    except TimeoutError:
        raise EngineError(f"{engine}: {shown} did not answer within {timeout_s:g} s",
                          retryable=True) from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, BlockedAddressError):
            raise EngineError(f"{engine}: refused to request {shown}: {exc.reason.detail} "
                              "(private addresses need download.allow_private_networks)",
                              retryable=False) from None
        raise EngineError(f"{engine}: request to {shown} failed: {excerpt(str(exc.reason))}",
                          retryable=True) from None
    except (OSError, http.client.HTTPException) as exc:
        raise EngineError(f"{engine}: request to {shown} failed: "
                          f"{type(exc).__name__}: {excerpt(str(exc))}", retryable=True) from None


def _read_bounded(resp: Any, *, engine: str, shown: str, timeout_s: float) -> bytes:
    """The body, at most ``MAX_ANSWER_BYTES``. ``open_guarded``'s response raises
    ``TimeoutError`` once the request's ``timeout_s`` is spent, even mid-read, so a server
    dripping bytes cannot hold a search."""
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            chunk = resp.read(_READ_CHUNK)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise EngineError(f"{engine}: the answer of {shown} is over {MAX_ANSWER_BYTES} "
                                  "bytes; not read further", retryable=False)
            chunks.append(chunk)
    except TimeoutError:
        raise EngineError(f"{engine}: the answer of {shown} took over {timeout_s:g} s",
                          retryable=True) from None


def loads(body: bytes, *, engine: str, what: str = "response") -> Any:
    """Parse a JSON body; a non-JSON body (a block page, a truncated answer) is retryable."""
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise EngineError(f"{engine}: {what} is not JSON (starts with "
                          f"{excerpt(body[:120], 120)!r})",
                          retryable=True) from None


def fetch_json(url: str, *, engine: str, params: Mapping[str, Any] | None = None,
               headers: Mapping[str, str] | None = None, timeout_s: float = 15.0,
               user_agent: str = DEFAULT_USER_AGENT, allow_private_networks: bool = False,
               form: Mapping[str, str] | None = None) -> Any:
    """``fetch`` then ``loads``."""
    body = fetch(url, engine=engine, params=params, headers=headers, timeout_s=timeout_s,
                 user_agent=user_agent, allow_private_networks=allow_private_networks,
                 form=form)
    return loads(body, engine=engine)


def as_int(value: Any, default: int = 0) -> int:
    """An integer from an API field that may be a number, a numeric string, or junk.

    Junk includes JSON's ``1e999`` (infinity) and NaN, which ``int`` refuses with
    ``OverflowError`` / ``ValueError``.
    """
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return default


def as_text(value: Any) -> str:
    """A text field (title, author, license) from an API: strings as they are, numbers as
    their decimal form, anything else (null, lists, objects, booleans) as ``""``."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return ""


def as_url(value: Any) -> str:
    """An image URL from an API field: a non-blank string, else ``""`` (the hit is dropped)."""
    return value if isinstance(value, str) and value.strip() else ""


def strip_html(text: Any) -> str:
    """Plain text from an HTML fragment (Commons' Artist field, Baidu's titles). A tag holds
    no ``<``: a lone one is text, and a run of them with no ``>`` is one pass, not one per
    ``<`` (160,000 took 15 s)."""
    no_tags = re.sub(r"<[^<>]*>", " ", as_text(text))
    return " ".join(html.unescape(no_tags).split())
