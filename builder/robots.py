"""robots.txt: the per-origin rules the fetcher obeys, fetched once per origin and cached.

Rules, per origin (scheme + host + port), matching our user-agent token ``PixCrawler``
(``urllib.robotparser`` semantics for the file's contents):

* 2xx: the file is parsed and its rules apply. As in ``urllib.robotparser``, the first matching
  line of the group wins (not RFC 9309's longest match). A ``Crawl-delay`` (whole seconds) for
  us or ``*`` is exposed as ``RobotsPolicy.crawl_delay``; a ``Crawl-delay`` or ``Request-rate``
  the parser cannot convert ("²") is ignored, the rest of the file still applies. Rules match the
  URL's path and query only.
* 401 / 403: everything is disallowed (the site refuses to tell us, as ``urllib.robotparser``).
* any other 4xx (404, 410, ...): no rules, everything is allowed.
* 5xx, a timeout, a connection failure, a blocked address or too many redirects: everything is
  allowed. A server too broken to answer for robots.txt is judged by its image responses instead;
  this keeps one flaky robots.txt from rejecting a whole site. The verdict is cached for the
  fetcher's lifetime like any other, so a broken server is not asked again for each image.

Concurrent first requests to an origin share one robots.txt fetch: the cache holds the in-flight
future, not just finished results.

``optout_directive`` reads the ``X-Robots-Tag`` response header for the AI/index opt-outs.
"""

from __future__ import annotations

import asyncio
import math
import urllib.parse
import urllib.robotparser
from typing import Awaitable, Callable, Iterable, Optional, Union

from yarl import URL

ROBOTS_UA = "PixCrawler"
"""The product token robots.txt groups and X-Robots-Tag prefixes are matched against."""

MAX_ROBOTS_BYTES = 512 * 1024
"""robots.txt bytes parsed at most (RFC 9309 asks crawlers to parse at least 500 KiB)."""

RobotsFetch = Callable[[URL], Awaitable[tuple[int, bytes]]]
"""Fetches a robots.txt URL: (HTTP status, body). Status 0 means no answer (unreachable)."""


class RobotsPolicy:
    """The robots.txt rules of one origin, decided from how its robots.txt answered."""

    __slots__ = ("allow_all", "disallow_all", "status", "_parser", "crawl_delay")

    def __init__(self, status: int, parser: Optional[urllib.robotparser.RobotFileParser] = None,
                 *, allow_all: bool = False, disallow_all: bool = False,
                 user_agent: str = ROBOTS_UA):
        self.status = status
        self.allow_all = allow_all
        self.disallow_all = disallow_all
        self._parser = parser
        delay = parser.crawl_delay(user_agent) if parser is not None else None
        try:
            self.crawl_delay: float = float(delay) if delay else 0.0
        except OverflowError:  # more digits than a float holds
            self.crawl_delay = math.inf

    @classmethod
    def from_response(cls, status: int, body: bytes, user_agent: str = ROBOTS_UA) -> "RobotsPolicy":
        """The policy for a robots.txt that answered ``status`` with ``body`` (see module doc)."""
        if 200 <= status < 300:
            parser = urllib.robotparser.RobotFileParser()
            text = body[:MAX_ROBOTS_BYTES].decode("utf-8", errors="replace")
            parser.parse(_defuse_numbers(text.splitlines()))
            return cls(status, parser, user_agent=user_agent)
        if status in (401, 403):
            return cls(status, disallow_all=True)
        return cls(status, allow_all=True)

    def allowed(self, url: Union[str, URL], user_agent: str = ROBOTS_UA) -> bool:
        """True when ``url`` (on this policy's origin) may be fetched by ``user_agent``.

        Only the path and query are matched; a path ``urllib.robotparser`` cannot parse (after
        it unquotes ``//x%5B`` into a broken authority) is disallowed, the polite answer.
        """
        if self.disallow_all:
            return False
        if self.allow_all or self._parser is None:
            return True
        target = _path_and_query(url)
        if target is None:
            return False
        try:
            return self._parser.can_fetch(user_agent, target)
        except ValueError:
            return False


_NUMERIC_DIRECTIVES = frozenset({"crawl-delay", "request-rate"})


def _defuse_numbers(lines: list[str]) -> list[str]:
    """``lines`` with each Crawl-delay / Request-rate value ``urllib.robotparser`` would crash on
    replaced by one it ignores.

    The parser checks ``str.isdigit()`` and then calls ``int()``, which refuses superscripts
    ("²", also as ``%C2%B2``) and more than 4300 digits. The directive line itself is kept so
    the parser's group state machine sees the same lines.
    """
    out = []
    for line in lines:
        key, colon, value = line.split("#", 1)[0].partition(":")
        key = key.strip().lower()
        if colon and key in _NUMERIC_DIRECTIVES:
            numbers = urllib.parse.unquote(value.strip()).split("/")
            if not all(_int_safe(number) for number in numbers):
                line = f"{key}: ignored"
        out.append(line)
    return out


def _int_safe(text: str) -> bool:
    """False when ``text.strip().isdigit()`` holds but ``int(text)`` would raise."""
    text = text.strip()
    if not text.isdigit():
        return True
    try:
        int(text)
    except ValueError:
        return False
    return True


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


OPTOUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
"""X-Robots-Tag directives that keep an image out of a dataset."""

# Directives that carry a value after a colon; a token before a colon that is not one of these
# is a user-agent prefix ("googlebot: noindex").
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview",
                                "max-video-preview", "indexifembedded"})


def optout_directive(header_values: Iterable[str], user_agent: str = ROBOTS_UA) -> Optional[str]:
    """The first opt-out directive in ``X-Robots-Tag`` header values that applies to us, or None.

    Each value is a comma-separated list of directives, optionally prefixed by a user agent
    ("pixcrawler: noai, noimageai"); a prefix applies to the directives after it in the same value
    until the next prefix. Generic directives (no prefix), ones for ``*`` and ones for our token
    (case-insensitive) apply; ones addressed to other crawlers do not.
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
            if token in OPTOUT_DIRECTIVES and (agent is None or agent == "*" or agent == ours):
                return token if agent is None else f"{agent}: {token}"
    return None


def origin_of(url: URL) -> str:
    """The robots.txt cache key: scheme://host:port (lower-case host, explicit port)."""
    return f"{url.scheme}://{url.raw_host}:{url.port}"


class RobotsCache:
    """robots.txt policies per origin, each fetched once through ``fetch``.

    ``fetch`` is the fetcher's own robots.txt download (same session, SSRF guard, politeness),
    so this class holds only the caching and the rules.
    """

    def __init__(self, fetch: RobotsFetch, user_agent: str = ROBOTS_UA):
        self._fetch = fetch
        self._user_agent = user_agent
        self._done: dict[str, RobotsPolicy] = {}
        self._pending: dict[str, asyncio.Task[RobotsPolicy]] = {}
        self.fetches = 0

    def cached(self, url: URL) -> Optional[RobotsPolicy]:
        """The policy of ``url``'s origin if it is already known (no await)."""
        return self._done.get(origin_of(url))

    async def policy(self, url: URL) -> RobotsPolicy:
        """The policy of ``url``'s origin, fetching its robots.txt on first use."""
        origin = origin_of(url)
        done = self._done.get(origin)
        if done is not None:
            return done
        task = self._pending.get(origin)
        if task is None:
            task = asyncio.ensure_future(self._load(origin, url))
            self._pending[origin] = task
        # shield: one waiter being cancelled must not cancel the fetch the others share.
        return await asyncio.shield(task)

    async def allowed(self, url: URL) -> bool:
        """True when robots.txt of ``url``'s origin lets our user agent fetch it."""
        policy = await self.policy(url)
        return policy.allowed(url, self._user_agent)

    async def _load(self, origin: str, url: URL) -> RobotsPolicy:
        self.fetches += 1
        try:
            status, body = await self._fetch(url.with_path("/robots.txt", encoded=True)
                                             .with_query(None).with_fragment(None))
            policy = RobotsPolicy.from_response(status, body, self._user_agent)
        finally:
            self._pending.pop(origin, None)
        self._done[origin] = policy
        return policy

    async def close(self) -> None:
        """Cancel robots.txt fetches still in flight."""
        for task in list(self._pending.values()):
            task.cancel()
        for task in list(self._pending.values()):
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._pending.clear()
