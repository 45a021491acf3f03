"""API keys on requests, and the per-key request rate limit.

A request carries ``Authorization: Bearer <key>``. A browser's ``EventSource`` cannot send
headers, so the events route also takes ``?token=``: a ``StreamTokens`` token for that one job,
short-lived, never the key itself (a URL reaches proxies' and servers' logs and the browser's
history, so an API key there is refused). Key lookups go through a ``ReadCache``: each
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
import base64
import binascii
import hashlib
import hmac
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


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


STREAM_TOKEN_PREFIX = "pxs_"
MAX_STREAM_TOKEN = 512
"""Characters a stream token may have: its job id (at most 160), key id, expiry and signature
take under 300; a longer string is refused unread."""
_TOKEN_CONTEXT = b"pixcrawler event stream tokens"
_TOKEN_AGAIN = (" (get one with POST /v1/jobs/{id}/events/token, sending the API key in the "
                "Authorization header)")


def token_secret(salt: str) -> bytes:
    """The stream tokens' signing secret, derived from the store's key salt: every replica
    sharing the store (or ``PIXCRAWLER_KEY_SALT``) has it, and nothing more is stored. Whoever
    can read the salt can make tokens, so a salt kept in the store's ``meta`` table makes the
    database (and its backups) as secret as the keys; ``PIXCRAWLER_KEY_SALT`` keeps it out."""
    return hmac.new(salt.encode(), _TOKEN_CONTEXT, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class StreamTokens:
    """Signed permissions to open one job's event stream for a while (``ttl_s``).

    A token is the key's id, the time it expires and the job's id, signed with HMAC-SHA256:
    any replica that shares the store checks it without a lookup, and no token is stored.
    Seen in a log, it lets whoever saw it watch that job's progress until it expires (a
    stream opened with it ends then too), while the key is not revoked; the key itself never
    goes into a URL."""

    def __init__(self, secret: bytes, ttl_s: float,
                 clock: Callable[[], float] = time.time):
        self.secret = secret
        self.ttl_s = ttl_s
        self.clock = clock

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self.secret, body.encode("ascii"), hashlib.sha256).digest())

    def issue(self, owner: str, job_id: str) -> tuple[str, int]:
        """(token, when it expires in Unix seconds) for ``owner``'s job ``job_id``."""
        expires = math.ceil(self.clock() + self.ttl_s)
        body = _b64(f"{owner}\n{expires}\n{job_id}".encode())
        return f"{STREAM_TOKEN_PREFIX}{body}.{self._sign(body)}", expires

    @staticmethod
    def well_formed(token: str) -> None:
        """ApiError 401 for what cannot be a token, before any secret is read."""
        if not (len(token) <= MAX_STREAM_TOKEN and token.isascii()
                and token.startswith(STREAM_TOKEN_PREFIX)):
            raise unauthorized("not a stream token" + _TOKEN_AGAIN)

    def check(self, token: str, job_id: str) -> tuple[str, int]:
        """(the key id ``token`` was made for, when it expires); ApiError 401 unless it is a
        token of this server for ``job_id`` that has not expired."""
        self.well_formed(token)
        body, dot, signature = token[len(STREAM_TOKEN_PREFIX):].partition(".")
        if not dot or not hmac.compare_digest(signature, self._sign(body)):
            raise unauthorized("not a stream token of this server" + _TOKEN_AGAIN)
        try:
            owner, expires, for_job = base64.urlsafe_b64decode(
                body + "=" * (-len(body) % 4)).decode().split("\n", 2)
            ends = int(expires)
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise unauthorized("not a stream token of this server" + _TOKEN_AGAIN) from None
        if for_job != job_id:
            raise unauthorized("this stream token is for another job" + _TOKEN_AGAIN)
        if ends < self.clock():
            raise unauthorized("this stream token has expired" + _TOKEN_AGAIN)
        return owner, ends


class Authenticator:
    """Turns a request's key (or an event stream's token) into a Principal, or raises
    ApiError 401. Use from one event loop (the replica's)."""

    def __init__(self, store: JobStore, enabled: bool = True, cache_s: float = 5.0,
                 stream_token_s: float = 300.0):
        self.store = store
        self.enabled = enabled
        self.cache_s = cache_s
        self.stream_token_s = stream_token_s
        self._keys: ReadCache[Optional[ApiKey]] = ReadCache(cache_s)
        self._ids: ReadCache[Optional[ApiKey]] = ReadCache(cache_s)
        self._tokens: Optional[StreamTokens] = None

    async def _stream_tokens(self) -> StreamTokens:
        if self._tokens is None:
            salt = await asyncio.to_thread(lambda: self.store.salt)
            self._tokens = StreamTokens(token_secret(salt), self.stream_token_s)
        return self._tokens

    async def stream_token(self, principal: Principal, job_id: str) -> tuple[str, int]:
        """A token that opens ``job_id``'s event stream as ``principal``, and its expiry."""
        return (await self._stream_tokens()).issue(principal.owner, job_id)

    async def authenticate_stream(self, authorization: Optional[str], token: Optional[str],
                                  job_id: str) -> tuple[Principal, Optional[int]]:
        """The caller of an event stream, and when its token expires (None without one): a
        Bearer Authorization header if sent, else ``?token=`` (checked against ``job_id``;
        its key must still be active). Another scheme's header (a proxy's Basic
        credentials, which a browser sends by itself) leaves the token to count."""
        bearer = bool(authorization) and \
            authorization.strip().partition(" ")[0].lower() == "bearer"
        if not self.enabled or bearer or (authorization and not token):
            return await self.authenticate(authorization), None
        if not token:
            raise unauthorized("missing credentials: send 'Authorization: Bearer <key>', or "
                               "(from a browser's EventSource) `?token=` with a token from "
                               "POST /v1/jobs/{id}/events/token")
        StreamTokens.well_formed(token)
        owner, expires = (await self._stream_tokens()).check(token, job_id)
        return await self.still_active(Principal(owner=owner, name="")), expires

    async def still_active(self, principal: Principal) -> Principal:
        """``principal`` again if its key is still active (through the cache, ``cache_s``),
        else ApiError 401."""
        if not self.enabled:
            return principal
        record = await self._ids.get(
            principal.owner, lambda: asyncio.to_thread(self.store.active_key, principal.owner))
        if record is None:
            raise unauthorized("invalid or revoked API key")
        return Principal(owner=record.id, name=record.name)

    async def authenticate(self, authorization: Optional[str]) -> Principal:
        if not self.enabled:
            return Principal(owner=ANONYMOUS, name=ANONYMOUS)
        key = _bearer(authorization) if authorization else ""
        if not key:
            raise unauthorized("missing API key: send 'Authorization: Bearer <key>' (create "
                               "one with `pixcrawler keys create NAME`)")
        # A string that cannot be a key is refused before the cache: each one kept (any
        # length, from anyone, for cache_s) would let a client without a key fill the
        # replica's memory.
        record = None
        if KEY_FORM.fullmatch(key):
            record = await self._keys.get(
                key, lambda: asyncio.to_thread(self.store.verify_key, key))
        if record is None:
            raise unauthorized("invalid or revoked API key")
        return Principal(owner=record.id, name=record.name)


def _bearer(header: str) -> str:
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise unauthorized("the Authorization header must be 'Bearer <key>'")
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
