"""URL normalisation and the job-wide URL dedup that runs before any download."""

from __future__ import annotations

from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from builder.reasons import Reason

_DEFAULT_PORTS = {"http": 80, "https": 443}
_TRACKING_PREFIXES = ("utm_",)
_TRACKING_KEYS = {"fbclid", "gclid", "mc_cid", "mc_eid"}


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
    path = quote(unquote(parts.path or "/"), safe="/:@!$&'()*+,;=-._~%")
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k not in _TRACKING_KEYS and not k.startswith(_TRACKING_PREFIXES)]
    return urlunsplit((scheme, netloc, path, urlencode(sorted(query)), ""))


def check_url(url: str) -> tuple[str | None, Reason | None, str]:
    """(normalised URL, rejection reason or None, detail) for a candidate URL, before fetching."""
    norm = normalise_url(url)
    if norm is None:
        return None, Reason.INVALID_URL, f"cannot parse {url[:200]!r}"
    scheme = norm.split(":", 1)[0]
    if scheme not in ("http", "https"):
        return norm, Reason.UNSUPPORTED_SCHEME, f"scheme {scheme!r}; only http and https"
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
