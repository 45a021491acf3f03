"""The polite async image fetcher: one aiohttp session, per-host politeness, retries, limits.

A ``Fetcher`` turns records into records with bytes (or rejected ones): it never raises for a
sample-level problem (bad URL, bad server, not an image). Per request, in order:

1. the SSRF guard vets the URL (scheme, host, literal IP; ``builder.netguard``); a thumbnail
   URL of a host with standard widths is rewritten to one (``builder.profiles``);
2. the origin's opt-outs are consulted: robots.txt, /.well-known/tdmrep.json and /ai.txt, each
   fetched once per origin and cached (``builder.robots``, ``builder.signals``); their entries
   start the record's rights ledger (``Record.rights``) and a refusal rejects it;
3. a per-host slot (``per_host_concurrency``, or the host's profile), a global slot
   (``concurrency``) and the host's start delay (``per_host_delay_s`` or the profile's, raised by
   a robots ``Crawl-delay`` and by ``Retry-After``) are taken;
4. one GET without automatic redirects: a redirect goes back to step 1 with the new URL (so every
   hop is vetted and checked against robots), at most ``max_redirects`` times, loops refused;
5. 5xx, 429, timeouts and connection errors are retried ``retries`` more times with exponential
   backoff and jitter (``Retry-After`` honoured on 429/503, capped at ``max_retry_after_s``);
6. a 2xx response's opt-out headers are checked (X-Robots-Tag, tdm-reservation, Content-Usage),
   its body read with a byte cap (``max_bytes``: refused up front from Content-Length, else
   aborted while streaming) and within the fetcher's byte budget (``max_bytes_in_flight``, see
   ``ByteBudget``), its format sniffed from the magic number and its embedded XMP
   ``plus:DataMining`` read (before any resize could drop it); under a host's bandwidth cap
   the host's next request waits until the bytes are paid for;
7. with ``signals.page_meta``, the image's page is fetched (once per page) for its TDMRep and
   robots meta tags and the image's alt text; a page that cannot be read (a server error, 429,
   no answer, 401, 403, 451) leaves its opt-out unknown and rejects the image
   (``optout_unreachable``).

Host names resolve through ``GuardedResolver`` inside aiohttp's connector, so the address that
was checked is the address connected to. Per-host state is keyed by host name (all ports and
schemes of a host share one politeness budget); robots.txt by origin (scheme, host, port).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
import zlib
from collections import OrderedDict, deque
from typing import Any, Awaitable, Callable, Optional, TypeVar, Union

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from builder import signals as sig
from builder.formats import sniff_format
from builder.netguard import (
    REDIRECT_STATUSES,
    BlockedAddressError,
    GuardedResolver,
    UrlRejected,
    vet_url,
)
from builder.profiles import HostProfiles, user_agent
from builder.reasons import Reason
from builder.records import Record
from builder.rights import UNREACHABLE, UNREADABLE, Signal, first_refusal
from builder.robots import (DROPPED_TEXT, INLINE_PARSE_BYTES, MAX_ROBOTS_BYTES, ROBOTS_UA,
                            OriginCache, RobotsCache, RobotsPolicy, RulesGate, answer_text,
                            off_loop, origin_file, read_twice_if_unreachable, unreachable)
from builder.spec import DownloadSpec, host_key
from builder.text import well_formed
from builder.urls import without_secrets

T = TypeVar("T")

MAX_ROBOTS_REDIRECTS = 5
"""Redirects followed for robots.txt (RFC 9309 asks for at least five)."""
SMALL_FILE_TIMEOUTS = 2
"""A robots.txt, tdmrep.json, ai.txt or page gets this many ``download.timeout_s`` for all its
hops together (waits for a turn on a host excluded): one request's worth each, six hops of a
slow answer held an origin's images for a minute and a half."""
MAX_CRAWL_DELAY_S = 10.0
"""A robots.txt ``Crawl-delay`` above this is taken as this (some sites ask for hours)."""
GAP_FIRST = 0.5
"""Seconds between a host's requests after its first 429 or 503 (``_Host.slow_down``)."""
GAP_MOST = 30.0
"""The longest such gap (and no longer than ``download.max_retry_after_s``)."""
GAP_FORGET_S = 60.0
"""A gap no new 429 or 503 has renewed for this long is over."""
DNS_CACHE_TTL_S = 300
_ACCEPT = "image/avif,image/webp,image/png,image/jpeg,image/gif,image/*;q=0.8,*/*;q=0.5"
_HOST_SWEEP_AT = 4096
BUDGET_STEP = 256 * 1024
"""A body without Content-Length first reserves this much, then doubles its reservation."""
_PAGE_CACHE = 4096
"""Pages whose facts are kept (``signals.page_meta``): images of one page usually come together."""
UNKNOWN_PAGE_TTL_S = 60.0
"""How long a page that could not be read stays so for the images found on it: then the next
one asks again (a page down for a moment must not reject its images for the rest of the job)."""
PAGE_WALLS = frozenset({401, 403, 451})
"""Page answers that refuse as unreadable: a login, a bot wall or a legal block is no consent,
and the page's opt-out cannot be known (robots.txt answering 401 or 403 disallows everything
too)."""
_REFUSED = -1
"""``_fetch_small``'s status for a page whose URL or address the SSRF guard refuses."""
_GUARD_REFUSES = "the SSRF guard refuses an address on the way"

REFUSED_ORIGIN_S = 60.0
"""How long an origin the SSRF guard refused stays refused without being asked again."""
FRESH_ROBOTS_S = 60.0
"""How old a robots.txt read for another purpose may be when an origin's signals are built
from it (they are kept ``ORIGIN_MAX_AGE_S`` from then)."""

log = logging.getLogger("pixcrawler.fetch")


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None.

    A date in the past gives 0; an unparsable value (including "inf" and "nan", which
    ``float`` would take) gives None.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


class _Failure(Exception):
    """A retryable outcome of one attempt (5xx, 429, timeout, connection error)."""

    def __init__(self, reason: Reason, detail: str, retry_after: Optional[float] = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


class _Deadline:
    """The time one image's fetch has left (``download.deadline_s``). Its requests, retries
    and redirects, and the waits between them, spend it; its waits for a turn on a host or
    for a free connection (``Fetcher._acquire``) do not, since they say how busy the job is,
    not how slow the image's servers are."""

    __slots__ = ("end",)

    def __init__(self, seconds: float):
        self.end = asyncio.get_running_loop().time() + seconds

    def left(self) -> float:
        return self.end - asyncio.get_running_loop().time()

    async def excluding(self, aw: Awaitable[T]) -> T:
        """``aw``'s result; the time it took spends none of the deadline."""
        started = asyncio.get_running_loop().time()
        try:
            return await aw
        finally:
            self.end += asyncio.get_running_loop().time() - started

    def timeout(self, per_request: float) -> aiohttp.ClientTimeout:
        """A request's timeout: ``per_request``, or what is left where that is shorter."""
        return aiohttp.ClientTimeout(total=max(min(self.left(), per_request), 0.001))


class ByteBudget:
    """The bytes of response bodies in flight in one fetcher, kept under ``limit``.

    A body reserves its Content-Length before reading it, or, without one, reserves
    ``BUDGET_STEP`` and doubles its reservation as it streams. A reservation that does not fit
    waits, first come first served. Nothing deadlocks: the oldest body being read is granted
    whatever it asks, even over the limit or more than the limit (one body may always proceed),
    so it finishes and hands its bytes back; the next oldest then gets the same right. Reserved
    bytes therefore stay under ``limit`` plus one body (at most ``max_bytes``).

    ``open`` registers a body and ``close`` returns all its bytes; ``reserve`` adds to a body's
    reservation, waiting when it must.

    A body read and kept (``Fetcher(hold_bodies=True)``) stays registered until its caller
    releases it, so the oldest body may be one that is read and waiting for its caller; then
    only the caller can make room. ``on_wait``, if set, is called whenever a reservation has to
    wait, so that the caller hands on what it holds, and a caller collecting bodies hands each
    one on at once while ``has_waiters`` (the worker validates them and releases them).
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.waits = 0
        self.on_wait: Optional[Callable[[], None]] = None
        self._bodies: OrderedDict[int, int] = OrderedDict()  # body -> bytes, oldest first
        self._waiters: deque[tuple[int, int, asyncio.Future[None]]] = deque()
        self._next = 0

    def open(self) -> int:
        self._next += 1
        self._bodies[self._next] = 0
        return self._next

    def close(self, body: int) -> None:
        self.used -= self._bodies.pop(body, 0)
        self._wake()

    @property
    def has_waiters(self) -> bool:
        """Whether a reservation is waiting for room."""
        return bool(self._waiters)

    async def reserve(self, body: int, n: int, timeout: Optional[float] = None) -> None:
        """Add ``n`` bytes to ``body``'s reservation, waiting for room when it must: at most
        ``timeout`` seconds, then ``asyncio.TimeoutError`` (the body's own deadline)."""
        if self._grantable(body, n, queue_empty=not self._waiters):
            self._grant(body, n)
            return
        self.waits += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (body, n, future)
        self._waiters.append(entry)
        try:
            if self.on_wait is not None:
                self.on_wait()
            await (future if timeout is None else asyncio.wait_for(future, timeout))
        except (asyncio.CancelledError, asyncio.TimeoutError):
            if (not future.done() or future.cancelled()) and entry in self._waiters:
                self._waiters.remove(entry)
            raise  # a grant that raced the cancel stays on the body; close() returns it

    def _oldest(self) -> Optional[int]:
        return next(iter(self._bodies), None)

    def _grantable(self, body: int, n: int, *, queue_empty: bool) -> bool:
        return body == self._oldest() or (queue_empty and self.used + n <= self.limit)

    def _grant(self, body: int, n: int) -> None:
        self._bodies[body] += n
        self.used += n

    def _wake(self) -> None:
        while self._waiters:
            body, n, future = self._waiters[0]
            if future.done() or body not in self._bodies:
                self._waiters.popleft()
            elif self._grantable(body, n, queue_empty=True):
                self._waiters.popleft()
                self._grant(body, n)
                future.set_result(None)
            else:
                break
        oldest = self._oldest()
        for entry in self._waiters:
            if entry[0] == oldest and not entry[2].done():
                self._waiters.remove(entry)
                self._grant(oldest, entry[1])
                entry[2].set_result(None)
                break


class _Host:
    """Politeness state of one host: its slots, when its last request started (and the delay
    it was given), until when a Retry-After holds every request, the gap its rate limiting
    asked for, and (with a bandwidth cap) when the bytes read so far are paid for."""

    __slots__ = ("sem", "last_start", "delay", "held_until", "gap", "slowed_at", "users",
                 "paid_until")

    def __init__(self, concurrency: int):
        self.sem = asyncio.Semaphore(concurrency)
        self.last_start = -math.inf
        self.delay = 0.0
        self.held_until = 0.0
        self.gap = 0.0
        self.slowed_at = -math.inf
        self.users = 0
        self.paid_until = 0.0

    def turn(self, delay: float, now: float) -> float:
        """When the host's next request may start: ``delay`` (or the gap, while it lasts)
        after the last one started, and not before a Retry-After hold ends nor (with a
        bandwidth cap) the bytes read so far are paid for. Worked out when a request would
        start, so a gap that has eased meanwhile counts as eased."""
        gap = self.gap if now - self.slowed_at < GAP_FORGET_S else 0.0
        return max(self.last_start + max(delay, gap), self.held_until, self.paid_until)

    def slow_down(self, now: float, most: float) -> None:
        """A 429 or 503 to a first request for a URL: space the host's requests twice as far
        apart (``GAP_FIRST`` at first, at most ``most`` seconds), once per gap (the answers of
        a burst sent together count once). A host that says it is rate limiting or overloaded
        gets its requests one at a time at that pace, with or without a Retry-After; a URL
        that keeps failing on its own retries does not slow its host."""
        if now - self.slowed_at >= self.gap:
            self.gap = min(max(2 * self.gap, GAP_FIRST), most)
            self.slowed_at = now

    def ease(self) -> None:
        """A success: the gap shrinks by a quarter, and goes once it is small."""
        self.gap = self.gap * 0.75 if self.gap > GAP_FIRST / 16 else 0.0


def _origin_signals(cfg: DownloadSpec, robots: Optional[RobotsPolicy],
                    tdmrep: Optional[tuple[int, bytes]],
                    ai_txt: Optional[tuple[int, bytes]]) -> sig.OriginSignals:
    """An origin's signals from its robots.txt policy and the answers of its tdmrep.json and
    ai.txt (each None where the spec does not honour it); CPU work only."""
    tdm = sig.parse_tdmrep(*tdmrep) if tdmrep is not None else None
    ai = None
    if ai_txt is not None:
        status, body = ai_txt
        # A 401/403 here is no statement about AI use: only an unreachable file refuses.
        ai = RobotsPolicy.from_response(
            status if 200 <= status < 300 or unreachable(status) else 404, body)
    return sig.OriginSignals(cfg, robots, tdm, ai)


class Fetcher:
    """Downloads image records politely. Create it inside a running event loop; use as
    ``async with Fetcher(cfg) as f: await f.fetch_many(records)``.

    ``stats`` counts requests (every HTTP request sent, robots.txt and the other per-origin
    files included), retries, body bytes kept, robots.txt fetches, other opt-out files fetched
    (tdmrep.json, ai.txt: ``signal_fetches``), pages fetched, accepted/rejected records,
    responses ``by_status`` and rejections ``by_reason``; ``body_bytes_peak`` is the most bytes
    that bodies being read held at once (measured, the final copy of each body included) and
    ``budget_waits`` how often a body waited for the byte budget.

    ``resolver`` replaces the DNS resolver inside the SSRF guard (a hosts map, a DNS-over-HTTPS
    client); every answer is still checked.

    ``host_share``: how many downloaders of the job fetch at once; each keeps its share of
    every host's limits (``HostProfiles``), robots.txt's Crawl-delay included.

    ``hold_bodies``: a body's share of the byte budget is kept after it is read, until the
    caller ``release``s the record (once the image is validated), so the budget bounds the bytes
    read and not yet validated, not only those being read. The caller must then validate as
    results arrive (``fetch_many(on_result=...)``), or a unit waiting on its own bodies stalls.
    """

    def __init__(self, cfg: DownloadSpec, *, resolver: Optional[AbstractResolver] = None,
                 hold_bodies: bool = False, host_share: int = 1):
        self.cfg = cfg
        self.hold_bodies = hold_bodies
        self._holds: dict[int, int] = {}
        self.stats: dict[str, Any] = {
            "requests": 0, "retries": 0, "bytes": 0, "robots_fetches": 0, "signal_fetches": 0,
            "page_fetches": 0, "fetched": 0, "rejected": 0, "by_status": {}, "by_reason": {},
            "body_bytes_peak": 0, "budget_waits": 0,
        }
        self.budget = ByteBudget(cfg.max_bytes_in_flight)
        self._body_bytes = 0  # bytes held right now by bodies being read
        self._resolver = resolver
        self._profiles = HostProfiles(cfg, host_share)
        self._origins: OriginCache[Union[sig.OriginSignals, UrlRejected]] = OriginCache(
            self._load_origin,
            unkept=lambda url: sig.OriginSignals.unkept(cfg, f"its files: {DROPPED_TEXT}"))
        self._origin_signals = sig.origin_active(cfg)
        self._response_signals = sig.ResponseSignals(cfg)
        self._pages: OrderedDict[str, tuple[float, asyncio.Future[sig.PageFacts]]] = \
            OrderedDict()
        self._session: Optional[aiohttp.ClientSession] = None
        self._global = asyncio.Semaphore(cfg.concurrency)
        self._hosts: dict[str, _Host] = {}
        self._rules_gate = RulesGate()
        self._robots = RobotsCache(self._fetch_robots, ROBOTS_UA, self._rules_gate)
        self._headers = {"User-Agent": user_agent(cfg), "Accept": _ACCEPT,
                         "Accept-Encoding": "identity"}
        self._closed = False
        self._next_sweep = 0.0

    async def __aenter__(self) -> "Fetcher":
        self._ensure_session()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session and its connections; the fetcher cannot be used afterwards."""
        self._closed = True
        for _, page in self._pages.values():
            page.cancel()
        await self._origins.close()
        await self._robots.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            if self._closed:
                raise RuntimeError("this Fetcher is closed; create a new one")
            connector = aiohttp.TCPConnector(
                limit=self.cfg.concurrency,
                ttl_dns_cache=DNS_CACHE_TTL_S,
                resolver=GuardedResolver(allow_private_networks=self.cfg.allow_private_networks,
                                         inner=self._resolver),
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
                headers=self._headers,
                cookie_jar=aiohttp.DummyCookieJar(),
                # Bytes are counted and capped as they arrive on the wire; a compressed body is
                # not expanded (we ask for identity, and a gzip bomb stays a small rejection).
                auto_decompress=False,
                trust_env=False,
            )
        return self._session

    # ---- public API -------------------------------------------------------------------------

    async def fetch(self, record: Record) -> Record:
        """Fetch one record's URL into ``record.data`` or reject it. Never raises for a
        sample-level problem; returns the same record."""
        return await self._fetch_timed(record, None)

    async def fetch_many(self, records: list[Record], *,
                         on_result: Optional[Callable[[Record], None]] = None,
                         before: Optional[Callable[[], Awaitable[None]]] = None
                         ) -> list[Record]:
        """Fetch all records concurrently; returns them in the given order.

        ``on_result``, if given, is called with each record as soon as it is decided (fetched
        or rejected), so a caller can start validating while the rest download; it must not
        block (hand heavy work to a pool). ``before``, if given, is awaited before each
        download starts (the worker's ``HeldBudget.turn``).

        Records are grouped by host and each host gets at most ``per_host_concurrency``
        workers, so a slow or rate-limited host never holds up the others and no record waits
        in a semaphore queue of thousands (each such hand-off costs an event-loop round trip).
        """
        by_host: dict[str, deque[tuple[Record, URL]]] = {}
        allow_private = self.cfg.allow_private_networks
        for record in records:
            try:
                url = vet_url(record.candidate.url, allow_private_networks=allow_private)
            except UrlRejected as exc:
                record.reject(exc.reason, exc.detail)
                self._count(record)
                if on_result is not None:
                    on_result(record)
                continue
            key = host_key(url.raw_host or "")
            queue = by_host.get(key)
            if queue is None:
                queue = by_host[key] = deque()
            queue.append((record, url))

        async def host_worker(queue: deque[tuple[Record, URL]]) -> None:
            while queue:
                record, url = queue.popleft()
                if before is not None:
                    await before()
                await self._fetch_timed(record, url)
                if on_result is not None:
                    on_result(record)

        profiles = self._profiles
        await asyncio.gather(*(host_worker(queue) for host, queue in by_host.items()
                               for _ in range(min(profiles.for_host(host).concurrency,
                                                  len(queue)))))
        return list(records)

    async def origin_ledger(self, url: str) -> tuple[Signal, ...]:
        """The origin-level ledger entries of ``url`` as its origin answers now (robots.txt,
        tdmrep.json, ai.txt; each read once per origin). Raises ``UrlRejected`` for a URL the
        SSRF guard refuses. ``pixcrawler recheck`` uses this."""
        vetted = vet_url(url, allow_private_networks=self.cfg.allow_private_networks)
        if not self._origin_signals:
            return ()
        return (await self._origin(vetted)).ledger(vetted)

    # ---- one record ---------------------------------------------------------------------------

    async def _fetch_timed(self, record: Record, url: Optional[URL]) -> Record:
        started = time.perf_counter()
        try:
            if url is None:
                url = vet_url(record.candidate.url,
                              allow_private_networks=self.cfg.allow_private_networks)
            await self._fetch(record, url)
        except UrlRejected as exc:
            record.reject(exc.reason, exc.detail)
        except Exception as exc:  # noqa: BLE001 - one record must never take down the batch
            log.warning("unexpected %s fetching %r", type(exc).__name__,
                        without_secrets(record.candidate.url)[:200], exc_info=True)
            record.reject(Reason.CONNECTION_ERROR,
                          f"unexpected {type(exc).__name__} while fetching: {exc}")
        record.fetch_ms = (time.perf_counter() - started) * 1000.0
        self._count(record)
        return record

    def _count(self, record: Record) -> None:
        stats = self.stats
        if record.rejected:
            stats["rejected"] += 1
            by_reason = stats["by_reason"]
            by_reason[record.reason] = by_reason.get(record.reason, 0) + 1
        else:
            stats["fetched"] += 1

    async def _fetch(self, record: Record, url: URL) -> None:
        """Follow ``url`` through redirects (each hop vetted and robots-checked) into
        ``record``. Raises ``UrlRejected`` for a hop the SSRF guard refuses."""
        cfg = self.cfg
        seen: Optional[set[str]] = None
        deadline = _Deadline(cfg.deadline_s)
        url = self._profiles.for_host(url.raw_host or "").thumb_url(url)
        for _hop in range(cfg.max_redirects + 1):
            if deadline.left() <= 0:
                record.reject(Reason.TIMEOUT, self._past_deadline(url))
                return
            url_s = str(url)
            delay = self._profiles.for_host(url.raw_host or "").delay_s
            if self._origin_signals:
                # The origin's files are bounded on their own (SMALL_FILE_TIMEOUTS), and are
                # often another image's load, waited for: they spend none of this one's time.
                crawl_delay = await deadline.excluding(self._origin_check(record, url))
                if record.rejected:
                    return
                crawl_delay *= self._profiles.share
                if crawl_delay > delay:
                    delay = min(crawl_delay, MAX_CRAWL_DELAY_S * self._profiles.share)
            location = await self._get_with_retries(url, delay, record, deadline)
            if location is None:
                if not record.rejected:
                    record.final_url = url_s
                    if cfg.signals.page_meta and record.candidate.page_url:
                        await self._page_check(record)
                return
            try:
                target = url.join(URL(location))
            except ValueError as exc:
                raise UrlRejected(Reason.INVALID_URL, f"bad redirect Location {location!r}: "
                                                      f"{exc}") from None
            url = vet_url(target, allow_private_networks=cfg.allow_private_networks)
            if seen is None:
                seen = {url_s}
            if str(url) in seen:
                record.reject(Reason.TOO_MANY_REDIRECTS, f"redirect loop back to {url}")
                return
            seen.add(str(url))
        record.reject(Reason.TOO_MANY_REDIRECTS,
                      f"more than {cfg.max_redirects} redirects (last to {url})")

    async def _get_with_retries(self, url: URL, delay: float, record: Record,
                                deadline: _Deadline) -> Optional[str]:
        """GET ``url`` with retries. Returns a redirect's Location, or None when ``record`` is
        finished (filled or rejected)."""
        cfg = self.cfg
        attempt = 0
        rights = record.rights
        while True:
            try:
                return await self._attempt(url, delay, record, deadline, first=attempt == 0)
            except _Failure as failure:
                # A 2xx's header entries are in the ledger before its body is read: a body
                # that failed leaves them to the response that is kept, or to none.
                record.rights = rights
                if deadline.left() <= 0:
                    record.reject(Reason.TIMEOUT, f"{self._past_deadline(url)} (last try: "
                                                  f"{failure.detail})")
                    return None
                if attempt >= cfg.retries:
                    tries = attempt + 1
                    record.reject(failure.reason, f"{failure.detail} ({tries} "
                                                  f"{'try' if tries == 1 else 'tries'})")
                    return None
                wait = cfg.backoff_s * (2 ** attempt) * (0.5 + random.random())
                if failure.retry_after is not None:
                    honoured = min(failure.retry_after, cfg.max_retry_after_s)
                    wait = max(wait, honoured)
                    self._hold_host(url, honoured)
                if wait >= deadline.left():  # no time would be left for the retry
                    record.reject(Reason.TIMEOUT, f"{self._past_deadline(url)} (last try: "
                                                  f"{failure.detail}; the next was "
                                                  f"{wait:.1f} s away)")
                    return None
                attempt += 1
                self.stats["retries"] += 1
                await asyncio.sleep(wait)

    def _past_deadline(self, url: URL) -> str:
        return (f"no whole answer within download.deadline_s {self.cfg.deadline_s:g} s, "
                f"redirects and retries included (at {str(url)[:200]})")

    async def _attempt(self, url: URL, delay: float, record: Record, deadline: _Deadline,
                       first: bool = True) -> Optional[str]:
        """One GET (``first``: not a retry of this URL). Returns a redirect Location, None
        when the record is finished; raises ``_Failure`` for a retryable outcome."""
        session = self._ensure_session()
        if deadline.left() <= 0:
            raise _Failure(Reason.TIMEOUT, "no time left for another request")
        host = await deadline.excluding(self._acquire(url, delay))
        timeout = deadline.timeout(self.cfg.timeout_s)
        try:
            self.stats["requests"] += 1
            async with session.get(url, allow_redirects=False, timeout=timeout) as resp:
                status = resp.status
                record.http_status = status
                by_status = self.stats["by_status"]
                by_status[status] = by_status.get(status, 0) + 1
                if 200 <= status < 300:
                    host.ease()
                    await self._accept_body(resp, record)
                    self._pay_bandwidth(host, url, record)
                    return None
                if status in REDIRECT_STATUSES:
                    location = resp.headers.get("Location")
                    if location:
                        return location
                    record.reject(Reason.HTTP_CLIENT_ERROR, f"HTTP {status} without Location")
                    return None
                if status == 429 or status >= 500:
                    if status in (429, 503) and first:
                        host.slow_down(asyncio.get_running_loop().time(),
                                       min(self.cfg.max_retry_after_s, GAP_MOST))
                    retry_after = None
                    if status in (429, 503):
                        retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                    reason = Reason.RATE_LIMITED if status == 429 else Reason.HTTP_SERVER_ERROR
                    raise _Failure(reason, f"HTTP {status}", retry_after)
                record.reject(Reason.HTTP_CLIENT_ERROR, f"HTTP {status}")
                return None
        except asyncio.TimeoutError:
            raise _Failure(Reason.TIMEOUT, f"no complete answer within {timeout.total:g} s") \
                from None
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, BlockedAddressError):
                raise UrlRejected(Reason.BLOCKED_ADDRESS, exc.os_error.detail) from None
            raise _Failure(Reason.CONNECTION_ERROR, f"DNS lookup failed: {exc.os_error}") \
                from None
        except aiohttp.ClientSSLError as exc:
            # A certificate or TLS failure will not fix itself on a retry.
            record.reject(Reason.CONNECTION_ERROR, f"TLS failure: {exc}")
            return None
        except aiohttp.InvalidURL as exc:
            raise UrlRejected(Reason.INVALID_URL, f"aiohttp refused the URL: {exc}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _Failure(Reason.CONNECTION_ERROR, f"{type(exc).__name__}: {exc}") from None
        finally:
            self._release(host)

    async def _accept_body(self, resp: aiohttp.ClientResponse, record: Record) -> None:
        """Read a 2xx body under the byte cap, apply opt-outs and the format sniff."""
        cfg = self.cfg
        read = self._response_signals
        if read.active and self._refused(record, read(resp.headers)):
            return
        cap = cfg.max_bytes
        length = resp.content_length
        if length is not None and length > cap:
            resp.close()
            record.reject(Reason.TOO_MANY_BYTES,
                          f"Content-Length {length} is over max_bytes {cap}")
            return
        data, body = await self._read_body(resp, length)
        if data is None:
            record.reject(Reason.TOO_MANY_BYTES,
                          f"body passed max_bytes {cap} while streaming (aborted)")
            return
        if body is not None:
            earlier = self._holds.pop(id(record), None)  # a body kept before a retry
            if earlier is not None:
                self.budget.close(earlier)
            self._holds[id(record)] = body
        content_type = resp.headers.get("Content-Type", "")
        fmt = sniff_format(data)
        if fmt is None:
            shown = data[:16]
            record.reject(Reason.NOT_AN_IMAGE, f"bytes start {shown!r} ({len(data)} bytes, "
                                               f"Content-Type {content_type or 'none'!r})")
            return
        if cfg.signals.xmp_datamining and self._refused(record, sig.embedded_signals(data, fmt)):
            return
        self.stats["bytes"] += len(data)
        record.data = data
        record.content_type = content_type
        record.format = fmt

    async def _read_body(self, resp: aiohttp.ClientResponse,
                         length: Optional[int]) -> tuple[Optional[bytes], Optional[int]]:
        """The body within the byte budget (reserving ``length`` up front, else growing the
        reservation as it streams), and its budget entry when ``hold_bodies`` keeps it; no body
        when it passes ``max_bytes`` (the response is closed). aiohttp stops reading at
        Content-Length, so a body with one never outgrows it."""
        cap = self.cfg.max_bytes
        budget = self.budget
        body = budget.open()
        chunks: list[bytes] = []
        total = 0
        held = False
        try:
            reserved = length if length is not None else min(BUDGET_STEP, cap)
            await budget.reserve(body, reserved, self.cfg.timeout_s)
            async for chunk in resp.content.iter_any():
                if total + len(chunk) > cap:
                    resp.close()
                    return None, None
                if total + len(chunk) > reserved:
                    grow = min(max(total + len(chunk), 2 * reserved), cap) - reserved
                    await budget.reserve(body, grow, self.cfg.timeout_s)
                    reserved += grow
                chunks.append(chunk)
                total += len(chunk)
                self._held(len(chunk))
            self._held(total)  # the joined copy, while the chunks still exist
            data = b"".join(chunks)
            self._held(-total)
            held = self.hold_bodies
            return data, (body if held else None)
        finally:
            self._held(-total)
            self.stats["budget_waits"] = budget.waits
            if not held:
                budget.close(body)

    def release(self, record: Record) -> None:
        """Give back the budget a held body of ``record`` keeps (``hold_bodies``); no-op
        otherwise."""
        body = self._holds.pop(id(record), None)
        if body is not None:
            self.budget.close(body)

    def _held(self, delta: int) -> None:
        self._body_bytes += delta
        if self._body_bytes > self.stats["body_bytes_peak"]:
            self.stats["body_bytes_peak"] = self._body_bytes

    # ---- politeness ---------------------------------------------------------------------------

    async def _acquire(self, url: URL, delay: float) -> _Host:
        """Take a slot on ``url``'s host, wait for the host's turn (``_Host.turn``), then take
        a global slot; the turn is checked again once it is held, as another request may have
        taken it meanwhile. A host that asks for patience holds no global slot while it
        waits, so other hosts go on, and its requests start spaced however long the global
        slots kept them."""
        key = host_key(url.raw_host or "")
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = _Host(self._profiles.for_host(key).concurrency)
        host.users += 1
        try:
            await host.sem.acquire()
            try:
                loop = asyncio.get_running_loop()
                while True:
                    while (wait := host.turn(delay, loop.time()) - loop.time()) > 0:
                        await asyncio.sleep(wait)
                    await self._global.acquire()
                    if host.turn(delay, loop.time()) <= loop.time():
                        break
                    self._global.release()
                host.last_start, host.delay = loop.time(), delay
            except BaseException:
                host.sem.release()
                raise
        except BaseException:
            host.users -= 1
            raise
        return host

    def _release(self, host: _Host) -> None:
        self._global.release()
        host.sem.release()
        host.users -= 1
        if host.users == 0 and len(self._hosts) > _HOST_SWEEP_AT:
            self._sweep_hosts()

    def _sweep_hosts(self) -> None:
        """Forget idle hosts whose next start is past, so a long crawl's host table stays small
        (at most once a second: a sweep walks the whole table)."""
        now = asyncio.get_running_loop().time()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        for key in [k for k, h in self._hosts.items()
                    if h.users == 0 and h.turn(h.delay, now) <= now
                    and (not h.gap or now - h.slowed_at >= GAP_FORGET_S)]:
            del self._hosts[key]

    def _hold_host(self, url: URL, seconds: float) -> None:
        """Hold every request to the host for ``seconds`` (a Retry-After applies to the host),
        those already waiting for their turn too."""
        host = self._hosts.get(host_key(url.raw_host or ""))
        if host is not None:
            until = asyncio.get_running_loop().time() + seconds
            host.held_until = max(host.held_until, until)

    def _pay_bandwidth(self, host: _Host, url: URL, record: Record) -> None:
        """Under a host's bandwidth cap, the host's next request starts once the body's bytes
        are paid for (``_Host.turn``), so its bytes leave at no more than ``max_bytes_per_s``
        on average. The request itself ends at once: it used to sleep out the payment holding
        a global slot, which held back the other hosts."""
        rate = self._profiles.for_host(url.raw_host or "").max_bytes_per_s
        size = len(record.data or b"")
        if rate is None or not size:
            return
        now = asyncio.get_running_loop().time()
        host.paid_until = max(host.paid_until, now) + size / rate

    # ---- opt-out signals (builder.signals; the record's rights ledger) ---------------------

    async def _origin_check(self, record: Record, url: URL) -> float:
        """Start ``record``'s ledger with the origin's entries for ``url`` (rejecting it on a
        refusal); returns the origin's robots.txt Crawl-delay."""
        origin = await self._origin(url)
        self._refused(record, origin.ledger(url), url)
        return origin.crawl_delay

    async def _origin(self, url: URL) -> sig.OriginSignals:
        """The signals of ``url``'s origin (read once per origin); raises ``UrlRejected`` where
        the SSRF guard refuses the origin itself. That refusal is kept as the origin's answer
        for ``REFUSED_ORIGIN_S``, so its next images ask nothing meanwhile (and a name that
        resolved to a private address for a moment is asked again after it)."""
        origin = self._origins.cached(url)
        if isinstance(origin, UrlRejected):  # kept less long than an answer
            origin = self._origins.cached(url, REFUSED_ORIGIN_S) or \
                await self._origins.get(url, REFUSED_ORIGIN_S)
        elif origin is None:
            origin = await self._origins.get(url)
        if isinstance(origin, UrlRejected):
            raise UrlRejected(origin.reason, origin.detail)
        return origin

    def _refused(self, record: Record, signals: tuple[Signal, ...],
                 origin_of: Optional[URL] = None) -> bool:
        """Add ``signals`` to the ledger (or start it over with the origin entries of
        ``origin_of``: a redirect's new origin); on a refusal reject the record, naming the
        signal, and return True."""
        record.rights = signals if origin_of is not None else record.rights + signals
        refusal = first_refusal(signals)
        if refusal is None:
            return False
        if refusal.name == "robots_txt" and refusal.value in UNREADABLE:
            record.reject(Reason.ROBOTS_UNREACHABLE if refusal.value == UNREACHABLE
                          else Reason.CONNECTION_ERROR,
                          f"robots.txt of {origin_of or record.candidate.url} could not be read, "
                          f"so nothing there is fetched ({refusal.source})")
        elif refusal.value in UNREADABLE:
            record.reject(Reason.OPTOUT_UNREACHABLE,
                          f"{refusal.name}: {refusal.source} could not be read for "
                          f"{origin_of or record.candidate.url}, so whether it opts out is not "
                          "known and the image is not kept")
        elif refusal.name == "robots_txt":
            record.reject(Reason.ROBOTS_DISALLOWED,
                          f"robots.txt disallows {origin_of or record.candidate.url} "
                          f"({refusal.source})")
        else:
            record.reject(Reason.OPTED_OUT, refusal.describe())
        return True

    async def _load_origin(self, url: URL) -> Union[sig.OriginSignals, UrlRejected]:
        """Read an origin's robots.txt, tdmrep.json and ai.txt (those the spec honours), at
        once. A robots.txt that cannot be read disallows everything (``builder.robots``); so
        does a tdmrep.json or ai.txt that answers a server error or 429, or gives no answer,
        twice a second apart (``optout_unreachable``: whether it opts out is not known). One
        that answers another 4xx, or that does not parse, counts as absent. An origin the SSRF
        guard refuses gives its refusal (``_origin`` raises it).

        The files are read first; where one is long, they are parsed and the signals built
        under a slot of the fetcher's ``RulesGate`` (robots.txt's policy, new or taken from
        its cache there, is cached for the page checks), so that no parsed file is held while
        waiting for the network or for a slot."""
        cfg = self.cfg
        robots_on = sig.needs_robots(cfg)

        async def robots_read() -> Optional[tuple[int, bytes]]:
            # Read lately (a page's check may have just read it), so that the origin's
            # signals, kept ORIGIN_MAX_AGE_S from now, are no older than that.
            if not robots_on or self._robots.cached(url, FRESH_ROBOTS_S) is not None:
                return None
            if self._robots.pending(url):  # a page's check loads it: parsed once, cached
                await self._robots.get(url, FRESH_ROBOTS_S)
                return None
            answer = await self._robots.read(url)  # (shared with a page check's load)
            if len(answer[1]) <= INLINE_PARSE_BYTES and \
                    self._robots.cached(url, FRESH_ROBOTS_S) is None:
                self._robots_from(url, answer)  # (cached at once, for the pages)
            return answer

        async def read(on: bool, path: str) -> Optional[tuple[int, bytes]]:
            return await self._fetch_signal_file(url, path) if on else None

        got = await asyncio.gather(robots_read(), read(cfg.signals.tdmrep, sig.TDMREP_PATH),
                                   read(cfg.signals.ai_txt, sig.AI_TXT_PATH),
                                   return_exceptions=True)
        refused = next((g for g in got if isinstance(g, UrlRejected)), None)
        if refused is not None:
            return refused
        for answer in got:
            if isinstance(answer, BaseException):
                raise answer
        robots_answer, tdmrep, ai_txt = got
        while True:
            known = self._robots.cached(url, FRESH_ROBOTS_S) if robots_on else None
            if robots_on and known is None and robots_answer is None:
                try:  # dropped for room since it was found: read it (then it is in hand)
                    robots_answer = await robots_read()
                except UrlRejected as exc:
                    return exc
                continue
            sizes = [len(a[1]) for a in (robots_answer, tdmrep, ai_txt) if a is not None]
            if (known is None or known.size <= INLINE_PARSE_BYTES) and \
                    all(size <= INLINE_PARSE_BYTES for size in sizes):
                robots = known if known is not None else self._robots_from(url, robots_answer)
                return _origin_signals(cfg, robots, tdmrep, ai_txt)
            del known  # (not held while waiting for a slot)
            async with self._rules_gate.slot():
                known = self._robots.cached(url, FRESH_ROBOTS_S) if robots_on else None
                if robots_on and known is None and robots_answer is None:
                    continue
                if robots_on and known is None:
                    assert robots_answer is not None
                    known = await off_loop(RobotsPolicy.from_response, *robots_answer)
                    self._robots.keep(url, known)
                return await off_loop(_origin_signals, cfg, known, tdmrep, ai_txt)

    def _robots_from(self, url: URL, answer: Optional[tuple[int, bytes]]
                     ) -> Optional[RobotsPolicy]:
        """robots.txt's policy from a short ``answer`` (None: not honoured), cached."""
        if answer is None:
            return None
        policy = RobotsPolicy.from_response(*answer)
        self._robots.keep(url, policy)
        return policy

    async def _fetch_signal_file(self, url: URL, path: str) -> tuple[int, bytes]:
        """(status, body) of an origin's opt-out file, asked once more when it is unreachable
        (as robots.txt is)."""
        return await read_twice_if_unreachable(self._fetch_signal_once, origin_file(url, path))

    async def _fetch_signal_once(self, url: URL) -> tuple[int, bytes]:
        self.stats["signal_fetches"] += 1
        status, body, _ = await self._fetch_small(url)
        return status, body

    async def _page_check(self, record: Record) -> None:
        """``signals.page_meta``: the page's meta-tag entries join the ledger (a refusal
        rejects), and the image's alt text on the page becomes its caption. A page that could
        not be read leaves its opt-out unknown, and the image is not kept
        (``optout_unreachable``); such an answer is kept ``UNKNOWN_PAGE_TTL_S``, then the page
        is asked again."""
        page_url = record.candidate.page_url
        entry = self._pages.get(page_url)
        now = time.monotonic()
        if entry is not None and entry[1].done() and not entry[1].cancelled() \
                and entry[1].result().unknown and now - entry[0] >= UNKNOWN_PAGE_TTL_S:
            entry = None
        if entry is None:
            entry = (now, asyncio.ensure_future(self._load_page(page_url)))
            self._pages[page_url] = entry
            while len(self._pages) > _PAGE_CACHE:
                self._pages.popitem(last=False)
        else:
            self._pages.move_to_end(page_url)
        facts = await asyncio.shield(entry[1])
        if facts.unknown:
            record.rights += facts.signals
            record.reject(Reason.OPTOUT_UNREACHABLE,
                          f"page {page_url[:200]} could not be read ({facts.why}): whether its "
                          "meta tags opt out is not known, so the image is not kept")
            return
        if self._refused(record, facts.signals):
            return
        alt = facts.alts.get(record.final_url) or facts.alts.get(record.candidate.url)
        if alt:
            record.caption = well_formed(alt)

    async def _load_page(self, page_url: str) -> sig.PageFacts:
        """The page's facts. A page that is not read gives entries that say why
        (``signals.unread_page``): one that cannot be reached (a server error or 429, twice a
        second apart, or no answer), that answers 401, 403 or 451, or whose origin's
        robots.txt cannot be read refuses, its opt-out unknown; one that robots.txt disallows,
        that answers another 4xx, or whose address the SSRF guard refuses says nothing."""
        cfg = self.cfg
        try:
            url = vet_url(page_url, allow_private_networks=cfg.allow_private_networks)
        except UrlRejected as exc:
            return sig.unread_page(page_url, cfg, exc.detail)
        if cfg.respect_robots:
            try:
                policy = self._robots.cached(url) or await self._robots.policy(url)
            except UrlRejected:
                return sig.unread_page(page_url, cfg, _GUARD_REFUSES)
            if policy.unreachable:
                return sig.unread_page(page_url, cfg,
                                       f"its robots.txt: {answer_text(policy.status)}",
                                       unknown=True)
            if policy.costly:
                return sig.unread_page(page_url, cfg, "its robots.txt: " + (
                    DROPPED_TEXT if policy.dropped else "its rules cost too much CPU to match"),
                    unknown=True)
            if not policy.allowed(url, ROBOTS_UA):
                return sig.unread_page(page_url, cfg, "robots.txt disallows it")
            del policy  # (not held while the page is read: the cache may drop it for room)
        status, body, content_type = await read_twice_if_unreachable(self._fetch_page_once, url)
        if status == _REFUSED:
            return sig.unread_page(page_url, cfg, _GUARD_REFUSES)
        if not 200 <= status < 300:
            answer = answer_text(status)
            if unreachable(status):
                answer += ", twice"
            return sig.unread_page(page_url, cfg, answer,
                                   unknown=unreachable(status) or status in PAGE_WALLS)
        return sig.parse_page(body, str(url), cfg, content_type)

    async def _fetch_page_once(self, url: URL) -> tuple[int, bytes, str]:
        self.stats["page_fetches"] += 1
        return await self._fetch_small(url, refused=_REFUSED)

    # ---- robots.txt ---------------------------------------------------------------------------

    async def _fetch_robots(self, url: URL) -> tuple[int, bytes]:
        """Download a robots.txt for ``RobotsCache``: (status, body), status 0 when there is no
        usable answer (unreachable, a redirect to a blocked address, too many redirects).
        Raises ``UrlRejected`` when the SSRF guard refuses the origin itself."""
        self.stats["robots_fetches"] += 1
        status, body, _ = await self._fetch_small(url)
        return status, body

    async def _fetch_small(self, url: URL, refused: Optional[int] = None
                           ) -> tuple[int, bytes, str]:
        """GET a small per-origin file (robots.txt, tdmrep.json, ai.txt) or page, following
        redirects: (status, at most ``MAX_ROBOTS_BYTES`` of the body, its ``Content-Type``),
        status 0 when there is no usable answer. Where the SSRF guard refuses a hop (its URL,
        or every address its name resolves to), the status is ``refused`` if given; else the
        first hop raises ``UrlRejected`` (the origin itself is refused: nothing there is
        fetched, and its images are ``blocked_address``, not unreachable) and a later one is
        no usable answer. Raises nothing else."""
        session = self._ensure_session()
        deadline = _Deadline(SMALL_FILE_TIMEOUTS * self.cfg.timeout_s)
        for hop in range(MAX_ROBOTS_REDIRECTS + 1):
            try:
                url = vet_url(url, allow_private_networks=self.cfg.allow_private_networks)
            except UrlRejected as exc:
                return _guard_refused(exc, hop, refused)
            if deadline.left() <= 0:
                return 0, b"", ""
            host = await deadline.excluding(self._acquire(url, self._profiles.default.delay_s))
            try:
                self.stats["requests"] += 1
                async with session.get(url, allow_redirects=False,
                                       timeout=deadline.timeout(self.cfg.timeout_s)) as resp:
                    location = resp.headers.get("Location")
                    if resp.status in REDIRECT_STATUSES and location:
                        url = url.join(URL(location))
                        continue
                    if 300 <= resp.status < 400:  # no Location to follow: no usable answer
                        return 0, b"", ""
                    if not 200 <= resp.status < 300:
                        return resp.status, b"", ""
                    body = _decoded(await _read_truncated(resp, MAX_ROBOTS_BYTES),
                                    resp.headers.get("Content-Encoding", ""))
                    if body is None:
                        return 0, b"", ""
                    return resp.status, body, resp.headers.get("Content-Type", "")
            except aiohttp.ClientConnectorDNSError as exc:
                blocked = exc.os_error
                if not isinstance(blocked, BlockedAddressError):
                    return 0, b"", ""
                return _guard_refused(UrlRejected(Reason.BLOCKED_ADDRESS, blocked.detail), hop,
                                      refused)
            except (asyncio.TimeoutError, aiohttp.ClientError, OSError, ValueError):
                return 0, b"", ""
            finally:
                self._release(host)
        return 0, b"", ""


def _guard_refused(exc: UrlRejected, hop: int, refused: Optional[int]) -> tuple[int, bytes, str]:
    """``Fetcher._fetch_small``'s answer where the SSRF guard refuses hop ``hop``: ``refused``
    where given; else ``exc`` raised for the first hop, no usable answer for a later one."""
    if refused is None and hop == 0:
        raise exc
    return refused or 0, b"", ""


def _decoded(body: bytes, encoding: str) -> Optional[bytes]:
    """A small file's body without its ``Content-Encoding``: the fetcher asks for identity,
    and reads robots.txt and the like as they come, but some servers gzip them anyway (read as
    they came, ``Disallow: /`` was lost). At most ``MAX_ROBOTS_BYTES`` come out of a
    compressed one; None for an encoding this cannot undo (then there is no usable answer)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        return None
    # gzip's header, or deflate as zlib data (RFC 9110) or, from some servers, raw
    for wbits in ((16 + zlib.MAX_WBITS,) if "gzip" in encoding else (zlib.MAX_WBITS,
                                                                    -zlib.MAX_WBITS)):
        try:
            return zlib.decompressobj(wbits).decompress(body, MAX_ROBOTS_BYTES)
        except zlib.error:
            continue
    return None


async def _read_truncated(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most ``limit`` bytes of the body; the rest is not read."""
    chunks = []
    total = 0
    async for chunk in resp.content.iter_any():
        chunks.append(chunk)
        total += len(chunk)
        if total >= limit:
            resp.close()
            break
    return b"".join(chunks)[:limit]


def fetch_all(records: list[Record], cfg: DownloadSpec) -> list[Record]:
    """Fetch ``records`` from synchronous code (runs its own event loop; not inside one)."""

    async def run() -> list[Record]:
        async with Fetcher(cfg) as fetcher:
            return await fetcher.fetch_many(records)

    return asyncio.run(run())


__all__ = ["ByteBudget", "Fetcher", "fetch_all", "parse_retry_after", "REDIRECT_STATUSES"]
