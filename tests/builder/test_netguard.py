"""The SSRF guard: address categories, URL vetting and the guarded resolver."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.error

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from builder.netguard import (
    BlockedAddressError,
    GuardedResolver,
    UrlRejected,
    blocked_category,
    check_url,
    is_blocked,
    open_guarded,
    vet_url,
)
from builder.reasons import Reason
from tests.builder.engines.test_request_deadline import DripServer, drip_body, drip_headers

BLOCKED = {
    "127.0.0.1": "loopback",
    "127.255.255.254": "loopback",
    "10.0.0.1": "private",
    "172.16.5.4": "private",
    "172.31.255.255": "private",
    "192.168.1.1": "private",
    "169.254.169.254": "link-local",
    "0.0.0.0": "unspecified",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "240.0.0.1": "reserved",
    "255.255.255.255": "reserved",
    "100.64.0.1": "shared (carrier-grade NAT)",
    "192.0.2.10": "private",
    "198.18.0.1": "private",
    "::1": "loopback",
    "::": "unspecified",
    "fe80::1": "link-local",
    "fe80::1%eth0": "link-local",
    "fec0::1": "site-local",
    "feff:ffff::1": "site-local",
    "fc00::1": "private",
    "fd12:3456::1": "private",
    "ff02::1": "multicast",
    "2001:db8::1": "private",
    "::ffff:127.0.0.1": "loopback (embedded in ::ffff:7f00:1)",
    "::ffff:10.0.0.1": "private (embedded in ::ffff:a00:1)",
    "::ffff:169.254.169.254": "link-local (embedded in ::ffff:a9fe:a9fe)",
    "2002:7f00:1::": "loopback (embedded in 2002:7f00:1::)",
    "2002:c0a8:101::1": "private (embedded in 2002:c0a8:101::1)",
    "64:ff9b::a00:1": "private (embedded in 64:ff9b::a00:1)",
}

PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "172.32.0.1", "192.169.0.1", "100.128.0.1",
          "2606:4700:4700::1111", "2a00:1450:4001:80b::200e", "::ffff:8.8.8.8",
          "2002:808:808::1", "64:ff9b::808:808"]


@pytest.mark.parametrize("addr,category", sorted(BLOCKED.items()))
def test_blocked_addresses(addr: str, category: str) -> None:
    assert blocked_category(addr) == category
    assert is_blocked(addr)


@pytest.mark.parametrize("addr", ["192.0.0.192", "192.0.0.8", "192.0.0.255", "64:ff9b:1::a",
                                  "100::1", "3fff::1", "5f00::1", "::ffff:192.0.0.192"])
def test_special_purpose_ranges_are_blocked_whatever_the_python(addr: str) -> None:
    """Python 3.11.7's ``ipaddress`` takes 192.0.0.192 (a cloud's metadata address) for a
    global address, and no version knows 3fff::/20 or 5f00::/16."""
    assert is_blocked(addr)
    assert check_url(f"http://[{addr}]/" if ":" in addr else f"http://{addr}/")[0] \
        == Reason.BLOCKED_ADDRESS


@pytest.mark.parametrize("addr", PUBLIC)
def test_public_addresses(addr: str) -> None:
    assert blocked_category(addr) is None
    assert not is_blocked(addr)


@pytest.mark.parametrize("url,reason", [
    ("", Reason.INVALID_URL),
    ("not a url", Reason.INVALID_URL),
    ("/relative/path.jpg", Reason.INVALID_URL),
    ("//example.com/a.jpg", Reason.INVALID_URL),
    ("http://", Reason.INVALID_URL),
    ("https:///path-only", Reason.INVALID_URL),
    ("http://[::1", Reason.INVALID_URL),
    ("http://example.com:99999/", Reason.INVALID_URL),
    ("http://exa mple.com/", Reason.INVALID_URL),
    ("http://127.1/", Reason.INVALID_URL),
    ("http://2130706433/", Reason.INVALID_URL),
    ("http://0x7f.0.0.1/", Reason.INVALID_URL),
    # Not addresses, and not names either: a client that takes one for an address looks it
    # up with no check of what it resolves to.
    ("http://127.0.0.1.1/", Reason.INVALID_URL),
    ("http://999.1.1.1/", Reason.INVALID_URL),
    ("http://08.0.0.1/", Reason.INVALID_URL),
    ("http://1.2.3.4.5./", Reason.INVALID_URL),
    ("ftp://example.com/a.jpg", Reason.UNSUPPORTED_SCHEME),
    ("file:///etc/passwd", Reason.UNSUPPORTED_SCHEME),
    ("gopher://example.com/", Reason.UNSUPPORTED_SCHEME),
    ("ws://example.com/", Reason.UNSUPPORTED_SCHEME),
    ("data:image/png;base64,AAAA", Reason.UNSUPPORTED_SCHEME),
    ("http://127.0.0.1/a.jpg", Reason.BLOCKED_ADDRESS),
    ("http://127.0.0.1:8080/a.jpg", Reason.BLOCKED_ADDRESS),
    ("https://[::1]/a.jpg", Reason.BLOCKED_ADDRESS),
    ("http://[::ffff:192.168.0.1]/a.jpg", Reason.BLOCKED_ADDRESS),
    ("http://[fec0::1]/a.jpg", Reason.BLOCKED_ADDRESS),
    ("http://user:pass@10.0.0.5/a.jpg", Reason.BLOCKED_ADDRESS),
    ("HTTP://169.254.169.254/latest/", Reason.BLOCKED_ADDRESS),
    ("http://127.0.0.1./a.jpg", Reason.BLOCKED_ADDRESS),
    ("http://１２７.０.０.１/a.jpg", Reason.BLOCKED_ADDRESS),  # fullwidth digits, IDNA-mapped
])
def test_rejected_urls(url: str, reason: Reason) -> None:
    verdict = check_url(url)
    assert verdict is not None and verdict[0] == reason, verdict
    with pytest.raises(UrlRejected) as info:
        vet_url(url)
    assert info.value.reason == reason and info.value.detail


@pytest.mark.parametrize("url", [
    "http://example.com/a.jpg",
    "https://EXAMPLE.com:8443/a b.jpg?x=1#frag",
    "http://bücher.example/bild.jpg",
    "http://例え.テスト/画像.png",
    "http://8.8.8.8/a.jpg",
    "http://[2606:4700:4700::1111]/a.jpg",
    "http://163.com/a.jpg",
    "http://under_score.example.com/a.jpg",
])
def test_accepted_urls(url: str) -> None:
    assert check_url(url) is None
    assert vet_url(url).scheme in ("http", "https")


def test_private_networks_lift_only_the_address_check() -> None:
    assert check_url("http://127.0.0.1/a.jpg", allow_private_networks=True) is None
    assert check_url("http://[::1]/a.jpg", allow_private_networks=True) is None
    assert check_url("ftp://127.0.0.1/a.jpg", allow_private_networks=True)[0] \
        == Reason.UNSUPPORTED_SCHEME  # type: ignore[index]
    assert check_url("http://127.1/", allow_private_networks=True)[0] \
        == Reason.INVALID_URL  # type: ignore[index]


def test_unicode_host_is_idna_encoded() -> None:
    assert vet_url("http://bücher.example/x").raw_host == "xn--bcher-kva.example"


class FixedResolver(AbstractResolver):
    """A resolver answering from a table (stands in for DNS, which tests must not use)."""

    def __init__(self, table: dict[str, list[str]]):
        self.table = table
        self.closed = False

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if host not in self.table:
            raise OSError(None, f"no such host {host}")
        return [ResolveResult(hostname=host, host=addr, port=port,
                              family=socket.AF_INET6 if ":" in addr else socket.AF_INET,
                              proto=0, flags=0) for addr in self.table[host]]

    async def close(self) -> None:
        self.closed = True


TABLE = {
    "public.test": ["93.184.216.34"],
    "internal.test": ["10.0.0.7", "127.0.0.1"],
    "mixed.test": ["192.168.0.9", "93.184.216.34", "::1"],
    "rebind.test": ["::ffff:169.254.169.254"],
}


def _resolve(host: str, allow: bool = False) -> list[str]:
    async def main() -> list[str]:
        resolver = GuardedResolver(allow_private_networks=allow, inner=FixedResolver(TABLE))
        return [r["host"] for r in await resolver.resolve(host, 80)]

    return asyncio.run(main())


def test_resolver_passes_public_answers() -> None:
    assert _resolve("public.test") == ["93.184.216.34"]


def test_resolver_drops_blocked_answers() -> None:
    assert _resolve("mixed.test") == ["93.184.216.34"]


@pytest.mark.parametrize("host", ["internal.test", "rebind.test"])
def test_resolver_refuses_hosts_with_only_blocked_answers(host: str) -> None:
    with pytest.raises(BlockedAddressError) as info:
        _resolve(host)
    assert host in info.value.detail
    assert isinstance(info.value, OSError)  # so aiohttp wraps it as a DNS failure


def test_resolver_allows_private_when_configured() -> None:
    assert _resolve("internal.test", allow=True) == ["10.0.0.7", "127.0.0.1"]


def test_resolver_passes_dns_failures_through() -> None:
    with pytest.raises(OSError) as info:
        _resolve("missing.test")
    assert not isinstance(info.value, BlockedAddressError)


def test_resolver_default_inner_resolves_localhost_and_blocks_it() -> None:
    async def main() -> None:
        resolver = GuardedResolver()
        try:
            with pytest.raises(BlockedAddressError):
                await resolver.resolve("localhost", 80)
        finally:
            await resolver.close()
        open_resolver = GuardedResolver(allow_private_networks=True)
        answers = await open_resolver.resolve("localhost", 80)
        assert answers and all(is_blocked(a["host"]) for a in answers)
        await open_resolver.close()

    asyncio.run(main())


def test_resolver_close_closes_inner() -> None:
    inner = FixedResolver(TABLE)
    asyncio.run(GuardedResolver(inner=inner).close())
    assert inner.closed


def test_open_guarded_gives_up_on_dripped_headers_at_its_timeout() -> None:
    with DripServer(drip_headers) as srv:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            open_guarded(srv.url, timeout_s=0.5, allow_private_networks=True)
        assert time.monotonic() - start < 1.5


def test_open_guarded_gives_up_on_a_name_that_takes_too_long_to_resolve(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The system resolver has no timeout to give it: a lookup that hangs (a dead DNS server)
    ends at the request's deadline, and a later lookup is not held up by it."""
    import threading

    real = socket.getaddrinfo
    release = threading.Event()

    def slow(host, *args, **kwargs):
        if host == "slow.test":
            release.wait(10)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    try:
        start = time.monotonic()
        with pytest.raises((TimeoutError, urllib.error.URLError)) as info:
            open_guarded("http://slow.test/a.json", timeout_s=0.5)
        assert time.monotonic() - start < 1.5
        reason = getattr(info.value, "reason", info.value)
        assert isinstance(reason, TimeoutError) and "slow.test" in str(reason)
        with DripServer(drip_body) as srv:
            with open_guarded(srv.url, timeout_s=2.0, allow_private_networks=True) as resp:
                assert resp.status == 200
    finally:
        release.set()


def test_the_body_of_an_open_guarded_response_is_read_by_the_same_deadline() -> None:
    """The time spent before the answer counts: the body read gets only what is left."""
    with DripServer(drip_body) as srv:
        start = time.monotonic()
        with open_guarded(srv.url, timeout_s=1.0, allow_private_networks=True) as resp:
            assert resp.status == 200
            time.sleep(0.6)
            with pytest.raises(TimeoutError):
                resp.read(65536)
        assert time.monotonic() - start < 2.0
