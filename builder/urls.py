"""URL normalisation and the job-wide URL dedup that runs before any download."""

from __future__ import annotations

import re
import string
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from builder.reasons import Reason

_DEFAULT_PORTS = {"http": 80, "https": 443}
_TRACKING_PREFIXES = ("utm_",)
_TRACKING_KEYS = {"fbclid", "gclid", "mc_cid", "mc_eid"}
_ALLOWED_SCHEMES = ("http", "https")
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
"""Path characters left as they are: RFC 3986 unreserved, sub-delims, ':', '@' and '/'."""
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")

MAX_URL_CHARS = 8192
"""The longest URL a candidate may have: RFC 9110 asks servers to take at least 8,000 octets,
and a longer one is a pasted body or a data: URL, not an image's address."""


def _normalise_path(path: str) -> str:
    """RFC 3986 percent-encoding normalisation of a path.

    An escape of an unreserved character is decoded and other escapes get upper-case hex, but an
    escaped reserved character stays escaped: ``/a%2Fb`` and ``/a/b`` are different resources.
    Characters a path may not hold raw (space, non-ASCII, a stray ``%``) are escaped.
    """
    out = []
    pos = 0
    for match in _ESCAPE.finditer(path):
        out.append(quote(path[pos:match.start()], safe=_PATH_SAFE))
        char = chr(int(match.group(1), 16))
        out.append(char if char in _UNRESERVED else match.group(0).upper())
        pos = match.end()
    out.append(quote(path[pos:], safe=_PATH_SAFE))
    return "".join(out)


def normalise_url(url: str) -> str | None:
    """A canonical form of ``url`` for dedup, or None when it does not parse as http(s)/other.

    Lower-cases scheme and host, drops default ports, fragments and tracking parameters, sorts
    the query, and normalises percent-encoding of the path. The candidate keeps its original URL
    for fetching; this form is only a dedup key.
    """
    try:
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        return None
    if not scheme or not host:
        return None
    netloc = host if ":" not in host else f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        netloc = f"{netloc}:{port}"
    try:
        path = _normalise_path(parts.path or "/")
    except UnicodeEncodeError:  # a lone surrogate has no UTF-8 form to escape
        return None
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k not in _TRACKING_KEYS and not k.startswith(_TRACKING_PREFIXES)]
    return urlunsplit((scheme, netloc, path, urlencode(sorted(query)), ""))


def _scheme(url: str) -> str:
    """The lower-cased scheme of a URL ``normalise_url`` refused ('' if there is none)."""
    try:
        return urlsplit(url.strip()).scheme.lower()
    except ValueError:
        return ""


def check_url(url: str) -> tuple[str | None, Reason | None, str]:
    """(normalised URL, rejection reason or None, detail) for a candidate URL, before fetching.

    The scheme is judged first: ``data:``, ``file:`` and ``javascript:`` URLs have no host but
    are unsupported rather than unparsable. A URL past ``MAX_URL_CHARS`` is not parsed at all.
    """
    if len(url) > MAX_URL_CHARS:
        scheme = _scheme(url[:64])
        if scheme and scheme not in _ALLOWED_SCHEMES:
            return None, Reason.UNSUPPORTED_SCHEME, f"scheme {scheme!r}; only http and https"
        return None, Reason.INVALID_URL, (f"a URL of {len(url):,} characters (at most "
                                          f"{MAX_URL_CHARS:,}): {url[:200]!r}...")
    norm = normalise_url(url)
    scheme = norm.split(":", 1)[0] if norm is not None else _scheme(url)
    if scheme and scheme not in _ALLOWED_SCHEMES:
        return norm, Reason.UNSUPPORTED_SCHEME, f"scheme {scheme!r}; only http and https"
    if norm is None:
        return None, Reason.INVALID_URL, f"cannot parse {url[:200]!r}"
    return norm, None, ""


class UrlDedup:
    """Remembers normalised URLs seen in a job; the first candidate with a URL wins."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def first_seen(self, norm: str, key: str) -> str | None:
        """Record ``norm`` for candidate ``key``; return the earlier key if it was seen before."""
        prev = self._seen.get(norm)
        if prev is None:
            self._seen[norm] = key
        return prev


SECRET_PARAMS = re.compile(r"(?i)([?&](?:key|api_key|apikey|access_key|token|access_token|"
                           r"client_secret|secret|password|sig|signature|cx|"
                           r"x-amz-(?:signature|credential|security-token)|"
                           r"x-goog-(?:signature|credential))=)[^&#]*")
"""Query parameters whose values are credentials: keys, tokens, signatures, Google's search
engine id."""


def without_secrets(url: str) -> str:
    """``url`` with its credentials masked: the user info (``user:password@``) and the values
    of ``SECRET_PARAMS``, each as ``***``. For what is written where others may read it."""
    return SECRET_PARAMS.sub(r"\1***", _USERINFO.sub(r"\1***@", url, count=1))


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://|)[^/?#]*@")
"""The user info of a URL, with its scheme or without (a proxy may be given as
``user:password@host:port``)."""
