"""Host politeness profiles, and the operator contact a public crawl's User-Agent must carry.

A profile sets, for one host, how many requests may be in flight, the gap between request
starts, a bandwidth cap on bodies, and the standard thumbnail widths it serves. Built-in profiles
(``BUILTIN_PROFILES``) encode sites' published robot policies; ``download.hosts`` in the spec
overrides them field by field and adds others (a host name, or ``*.example.org`` for a domain and
its subdomains). A field no profile sets falls back to the download-wide setting. A built-in
profile only makes the crawl politer (never more concurrency than
``download.per_host_concurrency``, never a shorter delay than ``download.per_host_delay_s``); a
value set in ``download.hosts`` stands as written, so a host you run can be crawled harder than
the rest.

Wikimedia (upload.wikimedia.org): at most 2 concurrent downloads and 25 Mbps, and thumbnails only
at the standard widths 120, 250, 330, 500, 960, 1280, 1920, 3840 (other widths are refused): a
``/thumb/.../<width>px-<name>`` URL is rewritten to the next standard width up (the largest
when it asks for more).

The contact: Wikimedia (since August 2025) and other sites refuse clients whose User-Agent does
not name the operator. ``user_agent(cfg)`` adds ``download.contact`` to the User-Agent;
``contact_problem(spec)`` says how to set one when a spec crawls the public web without it (the
sandbox and URL lists on loopback or private addresses need none).
"""

from __future__ import annotations

import bisect
import ipaddress
import re
import urllib.parse
from dataclasses import dataclass, replace
from typing import Iterable, Optional

from yarl import URL

from builder.spec import CONTACT_RE, DatasetSpec, DownloadSpec, HostProfileSpec, host_key

WIKIMEDIA_THUMB_WIDTHS = (120, 250, 330, 500, 960, 1280, 1920, 3840)
WIKIMEDIA_MAX_BYTES_PER_S = 25_000_000 / 8
"""25 Mbps, Wikimedia's robot policy for upload.wikimedia.org."""

BUILTIN_PROFILES: dict[str, HostProfileSpec] = {
    "upload.wikimedia.org": HostProfileSpec(concurrency=2,
                                            max_bytes_per_s=WIKIMEDIA_MAX_BYTES_PER_S,
                                            thumb_widths=list(WIKIMEDIA_THUMB_WIDTHS)),
}
"""Per-host rules from sites' published robot policies."""

PUBLIC_ENGINES = frozenset({"duckduckgo", "bing", "wikimedia", "openverse", "google", "baidu"})
"""Sources whose results are on the public web."""

DEFAULT_USER_AGENT = DownloadSpec.model_fields["user_agent"].default

_THUMB = re.compile(r"^(?P<pre>(?:[a-z0-9]+-)*?)(?P<width>\d{1,6})px-(?P<rest>.+)$")
"""A thumbnail's name: a width of more digits than any image has is left as it is (int() of
a 5,000-digit one raised, and the image was rejected as a connection error)."""


@dataclass(frozen=True)
class HostProfile:
    """The rules in force for one host (every field resolved)."""

    concurrency: int
    delay_s: float
    max_bytes_per_s: Optional[float]
    thumb_widths: tuple[int, ...]

    def thumb_url(self, url: URL) -> URL:
        """``url`` with a non-standard thumbnail width raised to the next standard one."""
        if not self.thumb_widths or "/thumb/" not in url.raw_path:
            return url
        head, _, name = url.raw_path.rpartition("/")
        m = _THUMB.match(name)
        if m is None:
            return url
        width = int(m["width"])
        if width in self.thumb_widths:
            return url
        i = bisect.bisect_left(self.thumb_widths, width)
        standard = self.thumb_widths[min(i, len(self.thumb_widths) - 1)]
        return url.with_path(f"{head}/{m['pre']}{standard}px-{m['rest']}", encoded=True)


class HostProfiles:
    """The profile of each host: built-ins, overridden by ``download.hosts``.

    ``share``: how many downloaders of one job fetch at once (the job's workers). A host's
    limits hold for the job: each downloader gets its share of the concurrency (at least 1) and
    of the bandwidth, and waits ``share`` times the delay between starts."""

    def __init__(self, cfg: DownloadSpec, share: int = 1):
        self.cfg = cfg
        self.share = max(1, share)
        rules = {host.lower(): spec for host, spec in BUILTIN_PROFILES.items()}
        for host, spec in cfg.hosts.items():
            key = host.lower()
            base = rules.get(key)
            if base is not None:
                spec = base.model_copy(update=spec.model_dump(exclude_none=True))
            rules[key] = spec
        self._rules = rules
        self._user = {host.lower(): spec for host, spec in cfg.hosts.items()}
        self._wildcards = any(host.startswith("*.") for host in rules)
        self._base = HostProfile(cfg.per_host_concurrency, cfg.per_host_delay_s, None, ())
        self.default = self._shared(self._base)
        self._cache: dict[str, HostProfile] = {}

    def for_host(self, host: str) -> HostProfile:
        """The profile of ``host`` (only hosts with a profile of their own are cached, so a
        crawl over millions of hosts keeps a small table)."""
        found = self._cache.get(host)
        if found is None:
            resolved = self._resolve(host_key(host))
            if resolved is self._base:
                return self.default
            found = self._cache[host] = self._shared(resolved)
        return found

    def _shared(self, profile: HostProfile) -> HostProfile:
        if self.share == 1:
            return profile
        rate = profile.max_bytes_per_s
        return replace(profile, concurrency=max(1, -(-profile.concurrency // self.share)),
                       delay_s=profile.delay_s * self.share,
                       max_bytes_per_s=rate / self.share if rate is not None else None)

    def _resolve(self, host: str) -> HostProfile:
        key = host
        spec = self._rules.get(key)
        if spec is None and self._wildcards:
            parts = host.split(".")
            for i in range(len(parts)):
                key = "*." + ".".join(parts[i:])
                spec = self._rules.get(key)
                if spec is not None:
                    break
        if spec is None:
            return self._base
        d = self._base
        own = self._user.get(key)
        concurrency = min(d.concurrency, spec.concurrency or d.concurrency)
        delay = max(d.delay_s, spec.delay_s or 0.0)
        if own is not None and own.concurrency is not None:
            concurrency = own.concurrency
        if own is not None and own.delay_s is not None:
            delay = own.delay_s
        return replace(d, concurrency=concurrency, delay_s=delay,
                       max_bytes_per_s=spec.max_bytes_per_s,
                       thumb_widths=tuple(spec.thumb_widths or ()))


# ---- the operator contact ---------------------------------------------------------------------


def faster_than_published(host: str, profile: HostProfileSpec
                          ) -> list[tuple[str, float, float]]:
    """The fields of ``profile`` for ``host`` less polite than its built-in profile (a site's
    published robot policy): (field, the profile's value, the published one); none for a
    host without one."""
    builtin = BUILTIN_PROFILES.get(host)
    if builtin is None:
        return []
    out = []
    for name, sign in (("concurrency", 1), ("max_bytes_per_s", 1), ("delay_s", -1)):
        mine, theirs = getattr(profile, name), getattr(builtin, name)
        if mine is not None and theirs is not None and sign * (mine - theirs) > 0:
            out.append((name, mine, theirs))
    return out


def user_agent(cfg: DownloadSpec) -> str:
    """The User-Agent sent: ``download.user_agent`` with ``download.contact`` added inside its
    comment (``PixCrawler/0.1 (+https://...; ops@example.org)``) unless already there."""
    ua = cfg.user_agent.strip()
    contact = cfg.contact
    if not contact or contact in ua:
        return ua
    if ua.endswith(")") and "(" in ua:
        return f"{ua[:-1]}; {contact})"
    return f"{ua} ({contact})"


def has_contact(cfg: DownloadSpec) -> bool:
    """Whether the User-Agent names the operator: ``download.contact`` is set, or
    ``download.user_agent`` is not the default one and holds an email or a URL."""
    if cfg.contact:
        return True
    ua = cfg.user_agent.strip()
    return ua != DEFAULT_USER_AGENT and CONTACT_RE.search(ua) is not None


def _private_host(url: str) -> bool:
    try:
        host = (urllib.parse.urlsplit(url.strip()).hostname or "").lower()
    except ValueError:
        return True  # it will be rejected as invalid_url; no request goes out
    if not host:
        return True
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_private or ip.is_loopback or ip.is_link_local


def first_public_url(urls: Iterable[str]) -> Optional[str]:
    """The first URL whose host is not loopback, private or ``localhost`` (None if none)."""
    return next((u for u in urls if not _private_host(u)), None)


CONTACT_SAMPLE_ROWS = 1000
"""Rows of a URL list read to judge whether it crawls the public web."""


def contact_problem(spec: DatasetSpec) -> Optional[str]:
    """Why this spec needs a contact in its User-Agent and has none, or None.

    Needed when a source searches the public web, or a URL list (a ``urllist`` file, a class's
    ``urls``) holds a URL whose host is not a loopback / private address or ``localhost``. A
    URL list is judged by its first ``CONTACT_SAMPLE_ROWS`` rows: it is never read whole here.
    """
    if has_contact(spec.download):
        return None
    why = None
    public = sorted({s.engine for s in spec.sources if s.engine in PUBLIC_ENGINES})
    if public:
        why = f"sources {', '.join(public)} crawl the public web"
    else:
        from builder.errors import SourceError
        from builder.listsource import head_rows

        for c in spec.classes.values():
            url = first_public_url(c.urls)
            if url:
                why = f"class urls include {url[:120]}"
                break
        for src in spec.sources:
            if why or src.engine != "urllist" or not src.path:
                continue
            try:
                rows = head_rows(src.path, CONTACT_SAMPLE_ROWS, url_column=src.url_column,
                                 label_column=src.label_column)
            except SourceError:
                continue  # the job reports an unreadable list itself
            url = first_public_url(row.url for row in rows)
            if url:
                why = f"the URL list {src.path} holds {url[:120]}"
    if why is None:
        return None
    return (f"{why}, and the User-Agent names no operator: sites such as Wikimedia refuse "
            "crawlers without a contact. Set download.contact to your email or a URL "
            "(download: {contact: you@example.org}), or put one in download.user_agent.")


__all__ = ["BUILTIN_PROFILES", "HostProfile", "HostProfiles", "PUBLIC_ENGINES",
           "WIKIMEDIA_THUMB_WIDTHS", "contact_problem", "first_public_url", "has_contact",
           "user_agent"]
