"""robots.txt: the per-origin rules the fetcher obeys, fetched once per origin and cached.

Rules, per origin (scheme + host + port), matching our user-agent token ``PixCrawler``, with RFC
9309 semantics through ``protego`` (Scrapy's parser): ``*`` and ``$`` wildcards, and the longest
matching rule wins (an ``Allow`` on a tie):

* 2xx: the file is parsed and its rules apply. A ``Crawl-delay`` (seconds, fractions allowed) in
  the group that applies to us is exposed as ``RobotsPolicy.crawl_delay``; a value that is not a
  number ("²") is ignored and the rest of the file still applies, one too large for a float is
  infinite (the fetcher caps it). Rules match the URL's path and query only.
* 401 / 403: everything is disallowed (the site refuses to tell us).
* any other 4xx but 429 (404, 410, ...): no rules, everything is allowed.
* 5xx, 429, a timeout, a connection failure, a blocked address or too many redirects: the file
  is *unreachable*, and RFC 9309 (2.3.1.4) says to assume complete disallow. It is asked once
  more after ``UNREACHABLE_RETRY_S``; if it still cannot be read, everything is disallowed
  (``RobotsPolicy.unreachable``: the fetcher rejects the origin's images as
  ``robots_unreachable``, or ``connection_error`` when there was no answer at all; both are
  transient reasons ``retry-failed`` tries again). The verdict is
  cached like any other, so a broken server is not asked again for each image.

Each origin's answer is kept ``ORIGIN_MAX_AGE_S`` (24 hours, as RFC 9309 2.4 asks) and then
read again, so a job that runs for days sees a site that opts out meanwhile.

The group that applies to us is the one naming our product token (groups naming it are merged, as
RFC 9309 asks), else the ``*`` group(s). A ``User-agent`` line names the product token it starts
with (letters, ``_`` and ``-``: ``PixCrawler/1.0`` names ``PixCrawler``), compared without case
and whole, as RFC 9309 2.2.1 and Google's parser do: ``pix`` is another crawler's group, though
protego alone would match it as a prefix of ours (``_product_tokens``). ``RobotsPolicy.group``
names the group for the rights ledger. Lines of that group other than the standard ones
(``Content-Signal``, ``Content-Usage``, ...) are kept in ``RobotsPolicy.extensions`` for
``builder.signals``; such lines before any group apply to every agent.

Concurrent first requests to an origin share one robots.txt fetch: the cache holds the in-flight
future, not just finished results (``OriginCache``, also used for the other per-origin files).

``optout_directive`` reads the ``X-Robots-Tag`` response header for the AI/index opt-outs.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import re
import time
import urllib.parse
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import (Any, AsyncIterator, Awaitable, Callable, Generic, Iterable, Iterator, Optional,
                    TypeVar, Union)

from protego import Protego
# protego's own reading of a line (its aliases, misspellings and colon-less forms), so that the
# groups named in the ledger are the ones protego decides by (pyproject pins protego 0.7.x).
from protego._protego import _ALL_DIRECTIVES, _extract_directive
from yarl import URL

ROBOTS_UA = "PixCrawler"
"""The product token robots.txt groups and X-Robots-Tag prefixes are matched against."""

MAX_ROBOTS_BYTES = 512 * 1024
"""robots.txt bytes parsed at most (RFC 9309 asks crawlers to parse at least 500 KiB)."""

INLINE_PARSE_BYTES = 32 * 1024
"""A robots.txt (or ai.txt) longer than this is parsed in a thread, off the fetching event
loop: 512 KiB of wildcard rules take about 0.2 s, which every download of the loop waited."""

MATCH_CPU_S = 0.1
MATCH_CPU_PER_URL_S = 0.002
"""The CPU that matching URLs against one origin's rules may take: ``MATCH_CPU_S`` and
``MATCH_CPU_PER_URL_S`` for each URL matched so far, in all. A real file costs microseconds a
URL; one of thousands of wildcard rules, with long paths, tens of milliseconds each on the
fetching event loop, and past the budget its origin's later URLs are not matched (refused, not
known). A budget per URL alone let a file stay just under it for every image."""

RobotsFetch = Callable[[URL], Awaitable[tuple[int, bytes]]]
"""Fetches a robots.txt URL: (HTTP status, body). Status 0 means no answer (unreachable)."""
UNREACHABLE_RETRY_S = 1.0
"""How long after an unreachable answer robots.txt is asked once more."""
ORIGIN_MAX_AGE_S = 24 * 3600.0
"""How long an origin's robots.txt (and its other opt-out files) is used once read."""
ORIGIN_CACHE_BYTES = 128 << 20
"""The memory one ``OriginCache`` may keep, as ``cache_weight`` estimates it; past it the
origins used longest ago are forgotten (and read again should they come back). Without it
every origin a job met was kept for its 24 hours: an origin serving 512 KiB of wildcard rules
as robots.txt, ai.txt and tdmrep.json kept about 32 MB, and a list of images on thousands of
subdomains of one such server filled a worker's memory."""
PARSED_BYTES_PER_BYTE = 40
"""What a parsed rule file keeps per byte of its text, at most: 11-14 for plain paths, about
40 for wildcard rules (measured with ``tracemalloc`` around ``RobotsPolicy.from_response``)."""
ENTRY_BYTES = 8 << 10
"""What an origin's entry keeps beside its files' rules (a file of a few lines, a 404)."""


MAX_RELOADS = 2
"""How often an origin's long rule files may be read again after they were dropped for room
(``OriginCache``), each within ``DROP_MEMORY_S`` of the drop before; past it the origin is
refused as not known (too costly) until ``DROP_MEMORY_S`` after its last drop."""
DROP_MEMORY_S = 600.0
"""How long ``OriginCache`` remembers that it dropped an origin's long files."""
DROPPED_TEXT = "dropped for room too often: read again ten minutes after its last drop"
"""Why an origin refused for ``MAX_RELOADS`` is, as its ledger and a page's check say."""
MAX_DROPPED = 65536
"""The origins whose drops ``OriginCache`` counts (the latest)."""


def cache_weight(text_bytes: int) -> int:
    """The memory an origin's cached value is taken to keep, for ``text_bytes`` of rule files
    (``RobotsPolicy.size``, ``signals.OriginSignals.size``)."""
    return ENTRY_BYTES + PARSED_BYTES_PER_BYTE * max(0, text_bytes)


HEAVY_WEIGHT = cache_weight(4 * INLINE_PARSE_BYTES)
"""What an origin's value weighs past which its drops are counted (``MAX_RELOADS``): 128 KiB
of rule text (a large real robots.txt is tens of KiB; reading it again is cheap)."""

_USER_AGENT_FIELDS = frozenset({"user-agent", "useragent", "user agent"})
_SITE_WIDE_FIELDS = frozenset({"sitemap", "sitemaps", "site-map", "host"})
"""Fields that belong to no group, and do not end one (as protego reads them)."""
_CRAWL_DELAY_FIELDS = frozenset({"crawl-delay", "crawl delay"})
_KNOWN_FIELDS = _ALL_DIRECTIVES
"""Every field protego reads, misspellings included; any other field of our group is an
extension (``Content-Signal``, ``Content-Usage``, ...)."""
_PATH_BASE = "http://robots.invalid"
"""What a path is prefixed with for protego, which parses a URL: a path starting with '//' must
not be read as an authority."""


class RobotsPolicy:
    """The robots.txt rules of one origin, decided from how its robots.txt answered."""

    __slots__ = ("allow_all", "disallow_all", "status", "_parser", "_groups", "crawl_delay",
                 "group", "extensions", "costly", "_cost", "size", "dropped")

    def __init__(self, status: int, parser: Optional[Protego] = None,
                 groups: Optional[list["_Group"]] = None, *, allow_all: bool = False,
                 disallow_all: bool = False, user_agent: str = ROBOTS_UA):
        self.status = status
        self.allow_all = allow_all
        self.disallow_all = disallow_all
        self._parser = parser
        self._groups = groups or []
        group = _select(self._groups, user_agent)
        self.group: str = group.name if group is not None else ""
        self.crawl_delay: float = group.crawl_delay if group is not None else 0.0
        self.extensions: dict[str, list[str]] = _extensions(self._groups, group)
        self._cost = MatchCost()
        self.size = 0
        """The bytes of the file parsed (``from_response``)."""
        self.costly = False
        """Matching has cost more than ``MATCH_CPU_S`` allows: ``allowed`` says no (not known)."""
        self.dropped = False
        """The file was dropped for room too often to be read again now (``unkept``)."""

    @classmethod
    def from_response(cls, status: int, body: bytes, user_agent: str = ROBOTS_UA) -> "RobotsPolicy":
        """The policy for a robots.txt that answered ``status`` with ``body`` (see module doc)."""
        if 200 <= status < 300:
            # a BOM (files saved on Windows) would glue itself to the first key and lose its group
            text = body[:MAX_ROBOTS_BYTES].decode("utf-8", errors="replace").removeprefix("\ufeff")
            policy = cls(status, Protego.parse(_product_tokens(text, user_agent)), _groups(text),
                         user_agent=user_agent)
            policy.size = min(len(body), MAX_ROBOTS_BYTES)
            return policy
        if status in (401, 403) or unreachable(status):
            return cls(status, disallow_all=True)
        return cls(status, allow_all=True)

    @classmethod
    def unkept(cls) -> "RobotsPolicy":
        """The policy of an origin whose long file was read and dropped for room too often
        (``OriginCache``): nothing is allowed, as not known (``costly``, ``dropped``)."""
        policy = cls(200, disallow_all=True)
        policy.costly = policy.dropped = True
        return policy

    @property
    def unreachable(self) -> bool:
        """robots.txt could not be read (everything is disallowed until it can)."""
        return unreachable(self.status)

    def allowed(self, url: Union[str, URL], user_agent: str = ROBOTS_UA) -> bool:
        """True when ``url`` (on this policy's origin) may be fetched by ``user_agent``.

        Only the path and query are matched; a URL that does not parse is disallowed, the
        polite answer.
        """
        if self.disallow_all:
            return False
        if self.allow_all or self._parser is None:
            return True
        if self.costly:
            return False
        target = _path_and_query(url)
        if target is None:
            return False
        started = time.thread_time()
        allowed = self._parser.can_fetch(_PATH_BASE + target, user_agent)
        self.costly = self._cost.over(time.thread_time() - started)
        return allowed


class MatchCost:
    """The CPU matching URLs against an origin's rules has taken, against its budget
    (``MATCH_CPU_S``)."""

    __slots__ = ("spent", "matched")

    def __init__(self) -> None:
        self.spent = 0.0
        self.matched = 0

    def over(self, spent: float) -> bool:
        """Add one URL's matching, ``spent`` seconds; whether the budget is now spent."""
        self.spent += spent
        self.matched += 1
        return self.spent > MATCH_CPU_S + MATCH_CPU_PER_URL_S * self.matched


def unreachable(status: int) -> bool:
    """Whether a robots.txt answer means the file is unreachable (RFC 9309 2.3.1.4): a server
    error, 429 (read as one, as the major crawlers do), or no answer (status 0)."""
    return status == 0 or status == 429 or status >= 500


def answer_text(status: int) -> str:
    """How a ledger or a detail names an answer: ``HTTP 503``, or ``no answer`` (status 0)."""
    return f"HTTP {status}" if status else "no answer"


class _Group:
    """One merged robots.txt group: its user-agent tokens and the lines protego does not read."""

    __slots__ = ("agents", "crawl_delay", "extensions")

    def __init__(self) -> None:
        self.agents: list[str] = []
        self.crawl_delay = 0.0
        self.extensions: dict[str, list[str]] = {}

    @property
    def name(self) -> str:
        return ", ".join(self.agents)


def _directives(text: str) -> Iterator[tuple[str, Optional[tuple[str, str]]]]:
    """Each line of ``text`` and its (field, value) as protego reads it (None for a blank,
    comment or unreadable line): protego decides and ``_groups`` names the group, so both
    must read every line alike, misspelled and colon-less fields included."""
    for line in text.splitlines():
        hash_pos = line.find("#")
        content = (line if hash_pos == -1 else line[:hash_pos]).strip()
        yield line, (_extract_directive(content) if content else None)


def _groups(text: str) -> list[_Group]:
    """The file's groups in order (RFC 9309: consecutive user-agent lines open one group; a
    user-agent line after a rule opens the next). Lines before any group go to a group with no
    agents (returned first), which ``_extensions`` applies to everyone."""
    preamble = _Group()
    groups = [preamble]
    current: Optional[_Group] = None
    last_was_agent = False
    delays: dict[int, bool] = {}
    for _, parsed in _directives(text):
        if parsed is None:
            continue
        key, value = parsed
        if key in _USER_AGENT_FIELDS:
            if current is None or not last_was_agent:
                current = _Group()
                groups.append(current)
            token = _product_token(value).lower()
            if token:
                current.agents.append(token)
            last_was_agent = True
            continue
        if key in _SITE_WIDE_FIELDS:
            continue
        last_was_agent = False
        target = current if current is not None else preamble
        if key in _CRAWL_DELAY_FIELDS:
            if current is not None and id(current) not in delays:
                delay = _delay(value)
                if delay is not None:
                    current.crawl_delay = delay
                    delays[id(current)] = True
        elif key not in _KNOWN_FIELDS and value:
            target.extensions.setdefault(key, []).append(value)
    return groups


def _delay(value: str) -> Optional[float]:
    """A Crawl-delay in seconds; None when it is not a non-negative number."""
    try:
        delay = float(value)
    except ValueError:
        return None
    if math.isnan(delay) or delay < 0:
        return None
    return delay


def _product_token(value: str) -> str:
    """The product token a ``User-agent`` value starts with (``PixCrawler/1.0``: PixCrawler;
    ``*`` for a value that starts with one)."""
    if value.startswith("*"):
        return "*"
    return re.match(r"[A-Za-z_-]*", value)[0]  # type: ignore[index]


def _product_tokens(text: str, user_agent: str) -> str:
    """``text`` for protego: each ``User-agent`` line (``_directives``) names the product
    token its value starts with, every token but ours and ``*`` renamed so that protego,
    which matches a token as a prefix of ours (``pix`` for ``PixCrawler``), cannot take it
    for ours. Other lines are left as they are."""
    ours = user_agent.strip().lower()
    out = []
    for line, parsed in _directives(text):
        if parsed is None or parsed[0] not in _USER_AGENT_FIELDS:
            out.append(line)
            continue
        name = _product_token(parsed[1])
        out.append("User-agent: " + (name if name == "*" or (name and name.lower() == ours)
                                     else f"other-{name or 'none'}"))
    return "\n".join(out)


def _score(agent: str, user_agent: str) -> int:
    """How well a group's agent token matches ``user_agent``: the whole product token, any
    case, scores its length; ``*`` scores 1; anything else 0 (``_product_tokens``)."""
    if agent == "*":
        return 1
    return len(agent) if agent == user_agent.strip().lower() else 0


def _select(groups: list[_Group], user_agent: str) -> Optional[_Group]:
    """The groups that apply to ``user_agent`` merged into one, or None when none does."""
    best, chosen = 0, []
    for group in groups:
        score = max((_score(a, user_agent) for a in group.agents), default=0)
        if score > best:
            best, chosen = score, [group]
        elif score and score == best:
            chosen.append(group)
    if not chosen:
        return None
    if len(chosen) == 1:
        return chosen[0]
    merged = _Group()
    # (each agent once, in one pass: a test per agent of those kept was quadratic, 2.4 s for
    # a 512 KiB file of two groups of 16,000 agents)
    merged.agents = list(dict.fromkeys(a for group in chosen for a in group.agents))
    for group in chosen:
        merged.crawl_delay = merged.crawl_delay or group.crawl_delay
        for key, values in group.extensions.items():
            merged.extensions.setdefault(key, []).extend(values)
    return merged


def _extensions(groups: list[_Group], group: Optional[_Group]) -> dict[str, list[str]]:
    """The non-standard lines that apply to us: those before any group, then our group's."""
    out: dict[str, list[str]] = {}
    sources = ([groups[0]] if groups else []) + ([group] if group is not None else [])
    for source in sources:
        for key, values in source.extensions.items():
            out.setdefault(key, []).extend(values)
    return out


def _path_and_query(url: Union[str, URL]) -> Optional[str]:
    """What robots rules are matched against: the raw path and query of ``url`` (None when
    ``url`` does not parse)."""
    if isinstance(url, URL):
        return url.raw_path_qs or "/"
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return None
    path = parts.path or "/"
    return f"{path}?{parts.query}" if parts.query else path


OPTOUT_DIRECTIVES = frozenset({"noai", "noimageai", "noml", "noindex", "noimageindex", "none"})
"""X-Robots-Tag directives that keep an image out of a dataset (``none`` is ``noindex,
nofollow``)."""

# Directives that carry a value after a colon; a token before a colon that is not one of these
# is a user-agent prefix ("googlebot: noindex").
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview",
                                "max-video-preview", "indexifembedded"})


def optout_directive(header_values: Iterable[str], user_agent: str = ROBOTS_UA) -> Optional[str]:
    """The first opt-out directive in ``X-Robots-Tag`` header values that applies to us, or None.

    Each value is a comma-separated list of directives, optionally prefixed by a user agent
    ("pixcrawler: noai, noimageai"); a prefix applies to the directives after it in the same value
    until the next prefix. Generic directives (no prefix), ones for ``*`` and ones for our token
    (case-insensitive) apply; ones addressed to other crawlers do not. Directives separated by
    spaces instead of commas ("noai noimageai", as some sites write them) are read each.
    """
    ours = user_agent.lower()
    for value in header_values:
        agent: Optional[str] = None
        for token in value.split(","):
            token = token.strip().lower()
            if not token:
                continue
            name, colon, rest = token.partition(":")
            name = name.strip()
            if colon and name and name not in _VALUED_DIRECTIVES and " " not in name:
                agent = name
                token = rest.strip()
            if agent is not None and agent != "*" and agent != ours:
                continue  # another crawler's
            words = token.split()
            directive, colon, setting = token.partition(":")
            if colon and directive.strip() in _VALUED_DIRECTIVES:
                words = setting.split()[1:]  # past its value ("max-image-preview: none")
            for word in words:
                if word in OPTOUT_DIRECTIVES:
                    return word if agent is None else f"{agent}: {word}"
    return None


def origin_of(url: URL) -> str:
    """The robots.txt cache key: scheme://host:port (lower-case host, explicit port)."""
    return f"{url.scheme}://{url.raw_host}:{url.port}"


T = TypeVar("T")


def text_size(value: object) -> int:
    """The bytes of rule files a cached value was parsed from (its ``size``; 0 for none)."""
    size = getattr(value, "size", 0)
    return size if isinstance(size, int) else 0


class OriginCache(Generic[T]):
    """One value per origin, loaded through ``load(url)`` and kept ``max_age_s``: concurrent
    first requests share the load (the cache holds the in-flight task), later ones get the
    cached value until it is that old, and the next request loads it again. The values kept
    weigh at most ``max_bytes`` together (``cache_weight`` of ``text_size``): past it, those
    used longest ago are dropped (the last one loaded always stays). An origin whose long
    files were dropped more than ``MAX_RELOADS`` times is not read again: ``unkept(url)``
    answers for it (an origin's files taking turns with others' would be read and parsed
    again for every image)."""

    def __init__(self, load: Callable[[URL], Awaitable[T]],
                 max_age_s: float = ORIGIN_MAX_AGE_S,
                 clock: Callable[[], float] = time.monotonic,
                 max_bytes: int = ORIGIN_CACHE_BYTES,
                 unkept: Optional[Callable[[URL], T]] = None):
        self._load_fn = load
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._unkept = unkept
        self._done: OrderedDict[str, tuple[float, T, int]] = OrderedDict()
        self._pending: dict[str, asyncio.Task[T]] = {}
        self._dropped: OrderedDict[str, tuple[int, float]] = OrderedDict()
        """Per origin, how often its long files were dropped in a row, each within
        ``DROP_MEMORY_S`` of the one before, and when last (the last ``MAX_DROPPED``)."""
        self.fetches = 0
        self.weight = 0
        """What the values kept weigh now (``cache_weight``)."""
        self.evicted = 0

    def cached(self, url: URL, max_age_s: Optional[float] = None) -> Optional[T]:
        """The value of ``url``'s origin if it is known and not older than ``max_age_s``
        (the cache's own by default; no await)."""
        origin = origin_of(url)
        hit = self._done.get(origin)
        limit = self.max_age_s if max_age_s is None else max_age_s
        if hit is None or self._clock() - hit[0] > limit:
            return None
        self._done.move_to_end(origin)
        return hit[1]

    async def get(self, url: URL, max_age_s: Optional[float] = None) -> T:
        """The value of ``url``'s origin, loaded again when it is unknown or older than
        ``max_age_s`` (the cache's own by default)."""
        origin = origin_of(url)
        known = self.cached(url, max_age_s)
        if known is not None:
            return known
        drops, last = self._dropped.get(origin, (0, 0.0))
        if self._unkept is not None and drops > MAX_RELOADS and \
                self._clock() - last <= DROP_MEMORY_S:
            return self._unkept(url)
        task = self._pending.get(origin)
        if task is None:
            task = asyncio.ensure_future(self._load(origin, url))
            self._pending[origin] = task
        # shield: one waiter being cancelled must not cancel the load the others share.
        return await asyncio.shield(task)

    async def _load(self, origin: str, url: URL) -> T:
        self.fetches += 1
        try:
            value = await self._load_fn(url)
        finally:
            self._pending.pop(origin, None)
        self._keep(origin, value)
        return value

    def keep(self, url: URL, value: T) -> None:
        """Cache ``value`` as the value of ``url``'s origin, loaded now (elsewhere)."""
        self._keep(origin_of(url), value)

    def _keep(self, origin: str, value: T) -> None:
        old = self._done.pop(origin, None)
        if old is not None:
            self.weight -= old[2]
        weight = cache_weight(text_size(value))
        self._done[origin] = (self._clock(), value, weight)
        self.weight += weight
        while self.weight > self.max_bytes and len(self._done) > 1:
            gone, (_, _, dropped) = self._done.popitem(last=False)
            self.weight -= dropped
            self.evicted += 1
            if dropped > HEAVY_WEIGHT:
                now = self._clock()
                drops, last = self._dropped.pop(gone, (0, 0.0))
                self._dropped[gone] = (drops + 1 if now - last <= DROP_MEMORY_S else 1, now)
                if len(self._dropped) > MAX_DROPPED:
                    self._dropped.popitem(last=False)

    async def close(self) -> None:
        """Cancel loads still in flight."""
        for task in list(self._pending.values()):
            task.cancel()
        for task in list(self._pending.values()):
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._pending.clear()


def origin_file(url: URL, path: str) -> URL:
    """The URL of a per-origin file (``/robots.txt``, ``/ai.txt``, ...) of ``url``'s origin."""
    return url.with_path(path, encoded=True).with_query(None).with_fragment(None)


Answer = TypeVar("Answer", bound=tuple)
"""An answer whose first item is its HTTP status (0 for none)."""


async def read_twice_if_unreachable(fetch: Callable[[URL], Awaitable[Answer]],
                                    url: URL) -> Answer:
    """``fetch(url)``, asked once more after ``UNREACHABLE_RETRY_S`` when the answer is
    unreachable (robots.txt, the other per-origin opt-out files, an image's page)."""
    answer = await fetch(url)
    if unreachable(answer[0]):
        await asyncio.sleep(UNREACHABLE_RETRY_S)
        answer = await fetch(url)
    return answer


_PARSER = ThreadPoolExecutor(1, thread_name_prefix="pixcrawler-rules")
"""Where long rule files are parsed: a thread of their own, not the loop's default executor,
which aiohttp's resolver looks names up on (many long files would delay every download's)."""


def _new_parser() -> None:
    # A forked child (worker 0 forks the others) inherits a pool whose thread it does not
    # have: one that had parsed before the fork would take work and never run it.
    global _PARSER
    _PARSER = ThreadPoolExecutor(1, thread_name_prefix="pixcrawler-rules")


os.register_at_fork(after_in_child=_new_parser)


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in the rule files' parsing thread (``_PARSER``)."""
    return await asyncio.get_running_loop().run_in_executor(_PARSER, fn, *args)


LARGE_RULE_LOADS = 4
"""Origin loads that may hold long rule files parsed at once, per fetcher (``RulesGate``)."""


class RulesGate:
    """At most ``slots`` tasks at a time parse long rule files (over ``INLINE_PARSE_BYTES``)
    and hold what they parsed until it is cached. A slot is held for CPU work only: the files
    are read before it is taken, and nothing under it waits for the network or another load.
    40 origins loading at once, each with 512 KiB of wildcard rules in robots.txt, ai.txt and
    tdmrep.json, held 1.4 GB of parsed rules while they waited for each other's files."""

    def __init__(self, slots: int = LARGE_RULE_LOADS):
        self._slots = asyncio.Semaphore(slots)
        self.held = 0
        self.most_held = 0
        """The most slots held at once (for tests and stats)."""

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._slots:
            self.held += 1
            self.most_held = max(self.most_held, self.held)
            try:
                yield
            finally:
                self.held -= 1


async def parsed(status: int, body: bytes, user_agent: str = ROBOTS_UA,
                 gate: Optional[RulesGate] = None) -> RobotsPolicy:
    """``RobotsPolicy.from_response``, off the event loop for a long file
    (``INLINE_PARSE_BYTES``), under one of ``gate``'s slots if given."""
    if len(body) <= INLINE_PARSE_BYTES:
        return RobotsPolicy.from_response(status, body, user_agent)
    if gate is None:
        return await off_loop(RobotsPolicy.from_response, status, body, user_agent)
    async with gate.slot():
        return await off_loop(RobotsPolicy.from_response, status, body, user_agent)


class RobotsCache(OriginCache[RobotsPolicy]):
    """robots.txt policies per origin, each fetched once through ``fetch``.

    ``fetch`` is the fetcher's own robots.txt download (same session, SSRF guard, politeness),
    so this class holds only the caching and the rules.
    """

    def __init__(self, fetch: RobotsFetch, user_agent: str = ROBOTS_UA,
                 gate: Optional[RulesGate] = None):
        async def load(url: URL) -> RobotsPolicy:
            status, body = await self.read(url)
            return await parsed(status, body, user_agent, gate)

        super().__init__(load, unkept=lambda url: RobotsPolicy.unkept())
        self._fetch = fetch
        self._user_agent = user_agent
        self._reading: dict[str, asyncio.Task[tuple[int, bytes]]] = {}
        self._closed = False

    async def read(self, url: URL) -> tuple[int, bytes]:
        """The answer of ``url``'s origin's robots.txt (asked once more when unreachable):
        one read, shared by whoever asks while it runs (this cache's load, an origin's
        signals)."""
        if self._closed:
            raise RuntimeError("this robots.txt cache is closed")
        origin = origin_of(url)
        task = self._reading.get(origin)
        if task is None:
            task = asyncio.ensure_future(
                read_twice_if_unreachable(self._fetch, origin_file(url, "/robots.txt")))
            self._reading[origin] = task
            task.add_done_callback(functools.partial(self._read_done, origin))
        return await asyncio.shield(task)

    def pending(self, url: URL) -> bool:
        """Whether a load of ``url``'s origin's policy is under way."""
        return origin_of(url) in self._pending

    def _read_done(self, origin: str, task: asyncio.Task[tuple[int, bytes]]) -> None:
        if self._reading.get(origin) is task:
            del self._reading[origin]
        if not task.cancelled():
            task.exception()  # (retrieved: its awaiters may all have been cancelled)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._reading.values()):
            task.cancel()
        await asyncio.gather(*self._reading.values(), return_exceptions=True)
        self._reading.clear()
        await super().close()

    async def policy(self, url: URL, max_age_s: Optional[float] = None) -> RobotsPolicy:
        """The policy of ``url``'s origin, fetching its robots.txt on first use (and again
        once it is older than ``max_age_s``)."""
        return await self.get(url, max_age_s)

    async def allowed(self, url: URL) -> bool:
        """True when robots.txt of ``url``'s origin lets our user agent fetch it."""
        policy = await self.policy(url)
        return policy.allowed(url, self._user_agent)
