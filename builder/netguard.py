"""The SSRF guard: which URLs the fetcher may request, and which addresses it may connect to.

A crawler fed URLs from the open web must not be steered into the network it runs in (cloud
metadata at 169.254.169.254, an admin page on 127.0.0.1, a database on 10.0.0.5). Two checks:

* ``vet_url`` / ``check_url`` look at a URL before any request: only http/https, a host present,
  and a literal IP host must be a public address.
* ``GuardedResolver`` is the aiohttp resolver of the fetcher's session: every DNS answer is
  checked *inside* the connector, so the address that was checked is the address connected to
  (no time-of-check/time-of-use gap, no DNS rebinding between a check and the connect). aiohttp
  never calls the resolver for literal IP hosts, which is why ``vet_url`` checks those itself;
  the fetcher calls it on every redirect hop.

``allow_private_networks=True`` (``download.allow_private_networks``) lifts the address checks;
the scheme check always applies.
"""

from __future__ import annotations

import ipaddress
import socket
from functools import lru_cache
from typing import Optional, Union

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from builder.reasons import Reason

ALLOWED_SCHEMES = frozenset({"http", "https"})

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

_SHARED_V4 = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, not global
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:%")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: embeds an IPv4


class UrlRejected(ValueError):
    """A URL the fetcher must not request; ``reason`` is the record's rejection reason."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class BlockedAddressError(OSError):
    """Raised by ``GuardedResolver`` when every address a host resolves to is blocked.

    An ``OSError`` so that aiohttp's connector wraps it like any DNS failure
    (``ClientConnectorDNSError.os_error`` is this exception).
    """

    def __init__(self, host: str, detail: str):
        super().__init__(None, detail)
        self.host = host
        self.detail = detail


def blocked_category(addr: Union[str, IPAddress]) -> Optional[str]:
    """Why ``addr`` is off limits ("loopback", "private", ...), or None for a public address.

    IPv4-mapped (``::ffff:a.b.c.d``), 6to4 (``2002::/16``) and NAT64 (``64:ff9b::/96``) IPv6
    addresses are judged by the IPv4 address they carry.
    """
    ip = ipaddress.ip_address(addr.split("%", 1)[0]) if isinstance(addr, str) else addr
    if isinstance(ip, ipaddress.IPv6Address):
        embedded: Optional[ipaddress.IPv4Address] = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = blocked_category(embedded)
            return f"{inner} (embedded in {ip})" if inner else None
    if ip.is_loopback:
        return "loopback"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_link_local:
        return "link-local"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local"  # fec0::/10: deprecated (RFC 3879) but still routed inside some sites
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED_V4:
        return "shared (carrier-grade NAT)"
    if not ip.is_global:
        return "not globally routable"
    return None


def is_blocked(addr: Union[str, IPAddress]) -> bool:
    """True when the fetcher must not connect to ``addr`` (unless private networks are allowed)."""
    return blocked_category(addr) is not None


@lru_cache(maxsize=4096)
def _literal_host_verdict(host: str) -> tuple[bool, Optional[str]]:
    """(is an IP literal, blocked category) for a URL host; cached, hosts repeat a lot."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    else:
        return True, blocked_category(ip)
    if host[0].isdigit():
        try:
            legacy = socket.inet_aton(host)
        except OSError:
            return False, None
        # "127.1", "2130706433", "0x7f.1": socket maps these onto an address; refuse the form.
        return True, f"non-canonical IPv4 literal for {socket.inet_ntoa(legacy)}"
    return False, None


def vet_url(url: Union[str, URL], *, allow_private_networks: bool = False) -> URL:
    """The parsed URL when the fetcher may request it; raises ``UrlRejected`` otherwise."""
    if isinstance(url, URL):
        parsed = url
    else:
        try:
            parsed = URL(url)
        except (ValueError, TypeError) as exc:
            raise UrlRejected(Reason.INVALID_URL, f"unparsable URL: {exc}") from None
    scheme = parsed.scheme
    if not scheme:
        raise UrlRejected(Reason.INVALID_URL, "not an absolute URL (no scheme)")
    if scheme not in ALLOWED_SCHEMES:
        raise UrlRejected(Reason.UNSUPPORTED_SCHEME, f"scheme {scheme!r} (only http/https)")
    try:
        host = parsed.raw_host
        parsed.port  # noqa: B018 - raises on an out-of-range port
    except (ValueError, UnicodeError) as exc:
        raise UrlRejected(Reason.INVALID_URL, f"bad host or port: {exc}") from None
    if not host:
        raise UrlRejected(Reason.INVALID_URL, "URL has no host")
    if not _HOST_CHARS.issuperset(host):
        raise UrlRejected(Reason.INVALID_URL, f"host {host!r} has characters no host name has")
    is_literal, category = _literal_host_verdict(host.rstrip(".") or host)
    if is_literal and category is not None:
        if category.startswith("non-canonical"):
            raise UrlRejected(Reason.INVALID_URL, f"{host}: {category}")
        if not allow_private_networks:
            raise UrlRejected(Reason.BLOCKED_ADDRESS, f"{host} is a {category} address")
    return parsed


def check_url(url: str, *, allow_private_networks: bool = False) -> Optional[tuple[Reason, str]]:
    """None when the URL may be requested, else (reason, detail). Never raises."""
    try:
        vet_url(url, allow_private_networks=allow_private_networks)
    except UrlRejected as exc:
        return exc.reason, exc.detail
    return None


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that drops blocked addresses from every DNS answer.

    Wraps aiohttp's ``DefaultResolver``. If no address survives, raises ``BlockedAddressError``
    so the connection is never attempted. The connector caches the filtered answer, so the DNS
    cache only ever holds checked addresses.
    """

    def __init__(self, *, allow_private_networks: bool = False,
                 inner: Optional[AbstractResolver] = None):
        self._inner = inner if inner is not None else DefaultResolver()
        self._allow_private = allow_private_networks

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self._allow_private:
            return results
        kept = []
        refused = []
        for result in results:
            category = blocked_category(result["host"])
            if category is None:
                kept.append(result)
            else:
                refused.append(f"{result['host']} ({category})")
        if not kept:
            raise BlockedAddressError(host, f"{host} resolves only to blocked addresses: "
                                            + ", ".join(refused))
        return kept

    async def close(self) -> None:
        await self._inner.close()
