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

The search engines' own requests (a synchronous client, as the engines are) go through
``open_guarded``: the same URL vetting on the first URL and on every redirect hop, and a socket
factory that applies the same address check to every address a host name resolves to, so again
the address that was checked is the address connected to. It speaks only http and https (no
``file:``, ``ftp:`` or ``data:`` handler exists in it), ignores proxy settings in the environment
(as the fetcher does), and never carries credentials (``Authorization``, ``Cookie``) across a
redirect to another origin. The whole request (every hop's connect, TLS handshake, status line and
headers, and the body read from the returned response) ends within about ``timeout_s``: the socket
waits at most the time left before each receive, so a server dripping bytes cannot hold it.

``allow_private_networks=True`` (``download.allow_private_networks``) lifts the address checks;
the scheme check always applies.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import socket
import threading
import time
import urllib.error
import urllib.request
from functools import lru_cache
from typing import Any, Mapping, Optional, Union

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from builder.reasons import Reason

ALLOWED_SCHEMES = frozenset({"http", "https"})

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

_SHARED_V4 = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, not global
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:%")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: embeds an IPv4
_SPECIAL_PURPOSE = tuple(ipaddress.ip_network(n) for n in (
    "192.0.0.0/24", "64:ff9b:1::/48", "100::/64", "3fff::/20", "5f00::/16"))
"""IANA special-purpose ranges that are not globally reachable, refused whatever the Python:
``ipaddress`` learned them late (3.11.7 takes 192.0.0.192, a cloud metadata address, for a
global one) or not at all (3fff::/20, documentation since 2024; 5f00::/16, SRv6)."""
_DIGITS_AND_DOTS = frozenset("0123456789.")


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
    if any(ip.version == net.version and ip in net for net in _SPECIAL_PURPOSE):
        return "special-purpose, not globally routable"
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
    if ":" in host:
        return True, "malformed IPv6 literal"
    if host[0].isdigit():
        try:
            legacy = socket.inet_aton(host)
        except OSError:
            if _DIGITS_AND_DOTS.issuperset(host):
                # "127.0.0.1.1", "08.0.0.1": no name is all digits (a top-level domain is
                # never numeric), and a client that takes it for an address would look it
                # up unchecked.
                return True, "non-canonical IPv4 literal"
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
        if category.startswith(("non-canonical", "malformed")):
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


# ---- the engines' synchronous client ---------------------------------------------------------

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
"""Headers that never follow a redirect to another origin."""


def same_origin(a: Union[str, URL], b: Union[str, URL]) -> bool:
    """Whether two URLs share scheme, host and port (default ports filled in); False when
    either cannot be parsed."""
    try:
        x, y = URL(str(a)), URL(str(b))
        return (x.scheme.lower(), (x.host or "").lower(), x.port) == \
            (y.scheme.lower(), (y.host or "").lower(), y.port)
    except (ValueError, TypeError):
        return False


def _time_left(deadline: float) -> float:
    """Seconds until ``deadline`` (a ``time.monotonic`` time); ``TimeoutError`` once past it."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out: the request ran past its time limit")
    return left


def _addresses(host: str, port: int, deadline: float) -> list[Any]:
    """``socket.getaddrinfo`` for a stream socket to ``host``, given up at ``deadline``.

    The system resolver has no timeout of its own to pass, so a name is looked up in a daemon
    thread and waited for as long as the request has left; a lookup given up on finishes in the
    background (bounded by the resolver's own retries) and its answer is dropped."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    else:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    answer: list[Any] = []
    failure: list[OSError] = []
    done = threading.Event()

    def look_up() -> None:
        try:
            answer.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=look_up, name="pixcrawler-dns", daemon=True).start()
    if not done.wait(_time_left(deadline)):
        raise TimeoutError(f"timed out resolving {host}: the request ran past its time limit")
    if failure:
        raise failure[0]
    return answer


def _vetted_socket(address: tuple[str, int], timeout: Any = None,
                   source_address: Optional[tuple[str, int]] = None, *,
                   allow_private_networks: bool, deadline: float) -> socket.socket:
    """``socket.create_connection`` that skips blocked addresses of every DNS answer; raises
    ``BlockedAddressError`` when no address is left.

    Each connect, and then the TLS handshake and the request's send, wait at most the time left
    before ``deadline`` (which stands in for http.client's per-operation ``timeout``)."""
    host, port = address
    refused: list[str] = []
    error: Optional[OSError] = None
    for family, kind, proto, _name, sockaddr in _addresses(host, port, deadline):
        category = None if allow_private_networks else blocked_category(sockaddr[0])
        if category is not None:
            refused.append(f"{sockaddr[0]} ({category})")
            continue
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(_time_left(deadline))
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            sock.settimeout(_time_left(deadline))
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock
    if error is not None:
        raise error
    raise BlockedAddressError(host, f"{host} resolves only to blocked addresses: "
                                    + ", ".join(refused))


class _DeadlineReader(io.RawIOBase):
    """A socket's raw reader that gives up at ``deadline``: before each receive the socket's
    timeout is set to the time left, so a server sending a byte now and then cannot stretch a
    read past it (``TimeoutError``)."""

    def __init__(self, sock: socket.socket, deadline: float):
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)  # holds the socket open until closed
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> Optional[int]:
        self._sock.settimeout(_time_left(self._deadline))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    """An ``HTTPResponse`` whose status line, headers and body are all read by ``deadline``."""

    def __init__(self, sock: socket.socket, debuglevel: int = 0, method: Optional[str] = None,
                 url: Optional[str] = None, *, deadline: float):
        super().__init__(sock, debuglevel, method, url)
        self.fp.close()  # the plain reader http.client made; the socket stays open
        self.fp = io.BufferedReader(_DeadlineReader(sock, deadline))


def _connection_class(base: type, allow_private_networks: bool, deadline: float) -> Any:
    """A factory of ``base`` connections (http.client) whose sockets come from
    ``_vetted_socket`` and whose responses are read by ``deadline``."""

    def make(host: str, **kwargs: Any) -> http.client.HTTPConnection:
        conn = base(host, **kwargs)
        conn._create_connection = functools.partial(  # type: ignore[attr-defined]
            _vetted_socket, allow_private_networks=allow_private_networks, deadline=deadline)
        conn.response_class = functools.partial(_DeadlineResponse, deadline=deadline)
        return conn

    return make


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, allow_private_networks: bool, deadline: float):
        super().__init__()
        self._connection = _connection_class(http.client.HTTPConnection, allow_private_networks,
                                             deadline)

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection, req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, allow_private_networks: bool, deadline: float):
        super().__init__()
        self._connection = _connection_class(http.client.HTTPSConnection, allow_private_networks,
                                             deadline)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection, req, context=self._context)


def _opener(allow_private_networks: bool, deadline: float) -> urllib.request.OpenerDirector:
    """http and https only, no proxies from the environment, no automatic redirects (any
    answer outside 2xx raises ``urllib.error.HTTPError``), everything done by ``deadline``."""
    opener = urllib.request.OpenerDirector()
    for handler in (_GuardedHTTPHandler(allow_private_networks, deadline),
                    _GuardedHTTPSHandler(allow_private_networks, deadline),
                    urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor(),
                    urllib.request.UnknownHandler()):
        opener.add_handler(handler)
    return opener


def open_guarded(url: str, *, headers: Optional[Mapping[str, str]] = None,
                 timeout_s: float = 15.0, allow_private_networks: bool = False,
                 max_redirects: int = 5, data: Optional[bytes] = None) -> Any:
    """GET ``url`` (POST ``data`` where given; a redirect is then followed with a GET, as for
    a 303) through the SSRF guard and return the open 2xx response (a context manager; read it
    with a bound).

    Every hop is vetted with ``vet_url`` and connected through ``_vetted_socket``. The whole
    request, redirects and the reads of the returned response included, has ``timeout_s``:
    a connect or read past it raises ``TimeoutError`` (wrapped in ``URLError`` when it happens
    while connecting or sending). Raises
    ``UrlRejected`` for a URL or hop the guard refuses and for more than ``max_redirects``
    redirects, ``urllib.error.HTTPError`` for any other answer outside 2xx (its body unread),
    and ``urllib.error.URLError`` / ``OSError`` / ``http.client.HTTPException`` when the
    request fails (``URLError.reason`` is a ``BlockedAddressError`` when the host resolves only
    to blocked addresses).
    """
    deadline = time.monotonic() + timeout_s
    current = vet_url(url, allow_private_networks=allow_private_networks)
    sent = dict(headers or {})
    opener = _opener(allow_private_networks, deadline)
    for _hop in range(max_redirects + 1):
        request = urllib.request.Request(str(current), data=data, headers=sent)
        try:
            return opener.open(request, timeout=timeout_s)
        except urllib.error.HTTPError as exc:
            location = exc.headers.get("Location") if exc.headers is not None else None
            if exc.code not in REDIRECT_STATUSES or not location:
                raise
            exc.close()
        try:
            target = current.join(URL(location))
        except ValueError as exc:
            raise UrlRejected(Reason.INVALID_URL,
                              f"bad redirect Location {location[:200]!r}: {exc}") from None
        target = vet_url(target, allow_private_networks=allow_private_networks)
        if not same_origin(target, current):
            sent = {k: v for k, v in sent.items() if k.lower() not in CREDENTIAL_HEADERS}
        current, data = target, None
    raise UrlRejected(Reason.TOO_MANY_REDIRECTS,
                      f"more than {max_redirects} redirects (last to {str(current)[:200]})")
