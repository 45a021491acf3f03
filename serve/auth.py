"""API keys on requests, and the per-key request rate limit.

A request carries ``Authorization: Bearer <key>``; the events route also takes ``?key=`` because
a browser's ``EventSource`` cannot send headers. Key lookups go through a ``ReadCache``: each
answer is remembered for ``cache_s`` per replica (so a revoked key stops working within that
time), requests for one key share a lookup, and the store is read on a worker thread, never on
the replica's event loop.

The rate limit is a token bucket per key per replica: ``rate_per_s`` tokens a second, up to
``burst``; with N replicas a key gets up to N times that (Serve spreads requests over them).

With auth off (``--no-auth``) nothing stops a web page from using the API through the visitor's
browser: a page on attacker.example whose name is made to resolve to 127.0.0.1 (DNS rebinding)
reads and submits jobs as a page of the API's own. ``HostGuard`` (run by the ``HostCheck``
middleware in front of everything, the hot-read fast path included) answers such requests with
an error: a browser always sends the name it connected to as ``Host``, and a page can only
send requests that change something with its own ``Origin``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Optional
from urllib.parse import urlsplit

from starlette.responses import JSONResponse

from serve.cache import ReadCache
from serve.errors import ApiError
from serve.store import KEY_FORM, ApiKey, JobStore

ANONYMOUS = "local"


@dataclass(frozen=True)
class Principal:
    """Who is calling: ``owner`` is the key's id (jobs are stored under it)."""

    owner: str
    name: str


class RateLimiter:
    """Token buckets per key. ``rate_per_s`` <= 0 turns the limit off."""

    def __init__(self, rate_per_s: float, burst: int,
                 clock: Callable[[], float] = time.monotonic):
        self.rate = float(rate_per_s)
        self.burst = max(1, int(burst))
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> Optional[float]:
        """Take a token: None if allowed, else the seconds until the next one."""
        if self.rate <= 0:
            return None
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return None
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


def too_many_requests(retry_after: float) -> ApiError:
    seconds = max(1, math.ceil(retry_after))
    return ApiError(429, "rate_limited",
                    f"too many requests for this API key; retry after {seconds} s",
                    headers={"Retry-After": str(seconds)})


class Authenticator:
    """Turns a request's key into a Principal, or raises ApiError 401. Use from one event
    loop (the replica's)."""

    def __init__(self, store: JobStore, enabled: bool = True, cache_s: float = 5.0):
        self.store = store
        self.enabled = enabled
        self.cache_s = cache_s
        self._keys: ReadCache[Optional[ApiKey]] = ReadCache(cache_s)

    async def authenticate(self, authorization: Optional[str],
                           query_key: Optional[str] = None) -> Principal:
        if not self.enabled:
            return Principal(owner=ANONYMOUS, name=ANONYMOUS)
        key = _bearer(authorization) if authorization else (query_key or "").strip()
        if not key:
            raise ApiError(401, "unauthorized",
                           "missing API key: send 'Authorization: Bearer <key>' (create one "
                           "with `pixcrawler keys create NAME`)",
                           headers={"WWW-Authenticate": "Bearer"})
        # A string that cannot be a key is refused before the cache: each one kept (any
        # length, from anyone, for cache_s) would let a client without a key fill the
        # replica's memory.
        record = None
        if KEY_FORM.fullmatch(key):
            record = await self._keys.get(
                key, lambda: asyncio.to_thread(self.store.verify_key, key))
        if record is None:
            raise ApiError(401, "unauthorized", "invalid or revoked API key",
                           headers={"WWW-Authenticate": "Bearer"})
        return Principal(owner=record.id, name=record.name)


def _bearer(header: str) -> str:
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise ApiError(401, "unauthorized", "the Authorization header must be 'Bearer <key>'",
                       headers={"WWW-Authenticate": "Bearer"})
    return value.strip()


LOCAL_NAMES = frozenset({"localhost"})
"""Host names a DNS answer cannot give to another machine, allowed without being listed."""
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ALLOWED_HOSTS_HINT = ("add the name with `pixcrawler serve --allowed-host NAME` (allowed_hosts "
                      "in the app's settings, e.g. serve_config.yaml)")
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_MAX_SHOWN = 100  # characters of a refused Host or Origin quoted back


def host_name(value: str) -> str:
    """``value`` as a host name to compare (lower case, no trailing dot); ValueError if it is
    not a plain DNS name (a scheme, port, path, IP address or wildcard)."""
    name = value.strip().lower().removesuffix(".")
    if not _HOST_NAME.fullmatch(name) or ip_literal(name):
        raise ValueError(f"{value!r} is not a host name such as pix.example.com (no scheme, "
                         "port or path; IP addresses are always answered)")
    return name


def ip_literal(host: str) -> bool:
    """Whether ``host`` (as in a Host header, without its port) is an IP address."""
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]")
                             else host)
    except ValueError:
        return False
    return True


def split_host(value: str) -> str:
    """The host of a Host header's value (``name``, ``name:port``, ``[v6]:port``), lower
    case and without a trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[:value.find("]") + 1] if "]" in value else value
    name, _, port = value.rpartition(":")
    return (name if name and port.isdigit() else value).removesuffix(".")


class HostGuard:
    """Refuses what only a web page on another site would send to a server with auth off.

    ``Host``: ``localhost``, any IP address (a browser sends an IP as Host only for a URL that
    names the IP, which no DNS answer can change) and ``names`` are answered, with any port;
    another name gets 421. ``Origin``: a request that is not GET, HEAD or OPTIONS and carries
    one (a browser sends it with every such request) must come from the same origin (host and
    port as in Host) or from one of ``names``, else it gets 403; ``Origin: null`` (a sandboxed
    frame, a file) is refused. A request without the headers is no browser's and passes.

    With auth on (``enabled`` False) everything passes: a page cannot read the API key a
    browser keeps for the API's own origin, so all it reaches are the pages and /healthz; and
    a server behind a load balancer answers whatever name that gives it."""

    def __init__(self, enabled: bool, names: Iterable[str] = ()):
        self.enabled = enabled
        self.names = frozenset(host_name(n) for n in names)

    def refusal(self, method: str, headers: Iterable[tuple[bytes, bytes]]
                ) -> Optional[ApiError]:
        """The error to answer a request with, or None to let it through."""
        if not self.enabled:
            return None
        host = origin = None
        for name, value in headers:
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1")
        if host is not None:
            shown = split_host(host)
            if not (ip_literal(shown) or shown in LOCAL_NAMES or shown in self.names):
                return ApiError(421, "host_not_allowed", f"this server does not answer for "
                                f"the host {shown[:_MAX_SHOWN]!r}: with auth off it answers "
                                "localhost, IP addresses and the names it is given, so that "
                                f"no web page reaches it through DNS rebinding; "
                                f"{ALLOWED_HOSTS_HINT}")
        if origin is None or method in SAFE_METHODS or self._own(origin, host):
            return None
        return ApiError(403, "origin_not_allowed", f"a request from the web page at "
                        f"{origin[:_MAX_SHOWN]!r} cannot change jobs here: with auth off only "
                        "the API's own page and clients that send no Origin can; for a name "
                        f"a proxy gives the API, {ALLOWED_HOSTS_HINT}")

    def _own(self, origin: str, host: Optional[str]) -> bool:
        """Whether ``origin`` is the request's own (its host and port are the Host header's)
        or on one of ``names``."""
        try:
            parts = urlsplit(origin)
            name = (parts.hostname or "").removesuffix(".")
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not name:
            return False
        return (host is not None and parts.netloc.lower() == host.strip().lower()) \
            or name in self.names


Message = dict[str, Any]
ASGIApp = Callable[[Message, Callable[[], Awaitable[Message]],
                    Callable[[Message], Awaitable[None]]], Awaitable[None]]


class HostCheck:
    """ASGI middleware: every HTTP request passes the replica's ``HostGuard`` first. Added to
    the app last, so it runs before every other middleware (the hot-read fast path too).
    ``guard`` finds the guard; by default the Serve replica's ``host_guard``."""

    def __init__(self, app: ASGIApp, guard: Optional[Callable[[], HostGuard]] = None):
        self.app = app
        self._find = guard or replica_guard
        self._guard: Optional[HostGuard] = None

    async def __call__(self, scope: Message, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] == "http":
            if self._guard is None:
                self._guard = self._find()
            refused = self._guard.refusal(scope["method"], scope["headers"])
            if refused is not None:
                response = JSONResponse(refused.body(), status_code=refused.status)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def replica_guard() -> HostGuard:
    """The ``host_guard`` of the Serve replica this process runs."""
    from ray import serve

    guard: HostGuard = serve.get_replica_context().servable_object.host_guard
    return guard
