"""API keys on requests, and the per-key request rate limit.

A request carries ``Authorization: Bearer <key>``; the events route also takes ``?key=`` because
a browser's ``EventSource`` cannot send headers. Key lookups go through a ``ReadCache``: each
answer is remembered for ``cache_s`` per replica (so a revoked key stops working within that
time), requests for one key share a lookup, and the store is read on a worker thread, never on
the replica's event loop.

The rate limit is a token bucket per key per replica: ``rate_per_s`` tokens a second, up to
``burst``; with N replicas a key gets up to N times that (Serve spreads requests over them).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from serve.cache import ReadCache
from serve.errors import ApiError
from serve.store import ApiKey, JobStore

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
        record = await self._keys.get(key, lambda: asyncio.to_thread(self.store.verify_key, key))
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
