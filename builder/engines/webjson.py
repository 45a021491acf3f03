"""HTTP GET of a JSON web API for the engines, with failures mapped to ``EngineError``.

Every web engine talks to its API the same way: a GET with a timeout and a User-Agent, a 429 or
5xx is a retryable ``EngineError`` carrying ``Retry-After``, other 4xx are not retryable, and a body
that is not the JSON the API promised is retryable (blocked clients often get an HTML page).
Secrets in the query string (``key=``) never appear in error messages.
"""

from __future__ import annotations

import html
import http.client
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Mapping

from builder.errors import EngineError
from builder.fetch import parse_retry_after  # one Retry-After parser for fetches and engines

DEFAULT_USER_AGENT = "PixCrawler/0.1 (+https://github.com/pixcrawler/pixcrawler)"
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_SECRET_PARAMS = re.compile(r"(?i)([?&](?:key|api_key|token|access_token|client_secret)=)"
                            r"[^&]*")


def redact(url: str) -> str:
    """The URL with secret query parameters blanked, for messages and logs."""
    return _SECRET_PARAMS.sub(r"\1***", url)


def fetch(url: str, *, engine: str, params: Mapping[str, Any] | None = None,
          headers: Mapping[str, str] | None = None, timeout_s: float = 15.0,
          user_agent: str = DEFAULT_USER_AGENT, form: Mapping[str, str] | None = None) -> bytes:
    """GET ``url`` (with ``params`` appended) and return the body; failures raise EngineError.
    With ``form``, POST it URL-encoded instead (an OAuth token request)."""
    if params:
        sep = "&" if "?" in url else "?"
        url = f"{url}{sep}{urllib.parse.urlencode(params)}"
    body = urllib.parse.urlencode(form).encode() if form is not None else None
    req = urllib.request.Request(url, data=body, headers={"User-Agent": user_agent,
                                                          "Accept": "application/json",
                                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.read()
    except urllib.error.HTTPError as exc:
        status = exc.code
        retry_after = parse_retry_after(exc.headers.get("Retry-After") if exc.headers else None)
        try:
            detail = exc.read(500).decode("utf-8", "replace").strip()
        except OSError:
            detail = ""
        raise EngineError(f"{engine}: {redact(url)} answered HTTP {status}"
                          + (f": {detail}" if detail else ""),
                          status=status, retryable=status in RETRYABLE_STATUSES,
                          retry_after=retry_after) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise EngineError(f"{engine}: request to {redact(url)} failed: {reason}",
                          retryable=True) from None
    except ValueError as exc:
        raise EngineError(f"{engine}: cannot request {redact(url)}: {exc} (check the source's "
                          "options.base_url)", retryable=False) from None


def loads(body: bytes, *, engine: str, what: str = "response") -> Any:
    """Parse a JSON body; a non-JSON body (a block page, a truncated answer) is retryable."""
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        snippet = body[:120].decode("utf-8", "replace")
        raise EngineError(f"{engine}: {what} is not JSON (starts with {snippet!r})",
                          retryable=True) from None


def fetch_json(url: str, *, engine: str, params: Mapping[str, Any] | None = None,
               headers: Mapping[str, str] | None = None, timeout_s: float = 15.0,
               user_agent: str = DEFAULT_USER_AGENT, form: Mapping[str, str] | None = None
               ) -> Any:
    """``fetch`` then ``loads``."""
    body = fetch(url, engine=engine, params=params, headers=headers, timeout_s=timeout_s,
                 user_agent=user_agent, form=form)
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
    """Plain text from an HTML fragment (Commons' Artist field, Baidu's titles)."""
    no_tags = re.sub(r"<[^>]*>", " ", as_text(text))
    return " ".join(html.unescape(no_tags).split())
