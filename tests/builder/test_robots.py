"""robots.txt policies, the per-origin cache, and X-Robots-Tag opt-outs."""

from __future__ import annotations

import asyncio

import pytest
from yarl import URL

from builder.robots import ROBOTS_UA, RobotsCache, RobotsPolicy, optout_directive, origin_of

RULES = b"""
User-agent: *
Disallow: /

User-agent: PixCrawler
Allow: /private/ok.jpg
Disallow: /private/
Crawl-delay: 2
"""


def test_rules_for_our_agent() -> None:
    policy = RobotsPolicy.from_response(200, RULES)
    assert policy.allowed("http://h/img.jpg")
    assert not policy.allowed("http://h/private/a.jpg")
    assert policy.allowed("http://h/private/ok.jpg")
    assert policy.crawl_delay == 2.0
    assert not policy.allowed("http://h/img.jpg", "SomeOtherBot")


def test_star_group_applies_when_we_are_not_named() -> None:
    policy = RobotsPolicy.from_response(200, b"User-agent: *\nDisallow: /no/\n")
    assert not policy.allowed("http://h/no/x.jpg")
    assert policy.allowed("http://h/yes/x.jpg")
    assert policy.crawl_delay == 0.0


def test_agent_match_is_case_insensitive() -> None:
    policy = RobotsPolicy.from_response(200, b"User-agent: pixcrawler\nDisallow: /\n")
    assert not policy.allowed("http://h/x.jpg")


@pytest.mark.parametrize("status,allowed", [
    (404, True), (410, True), (400, True), (401, False), (403, False),
    (500, False), (503, False), (429, False), (0, False),  # unreachable: RFC 9309 2.3.1.4
])
def test_status_rules(status: int, allowed: bool) -> None:
    policy = RobotsPolicy.from_response(status, b"User-agent: *\nDisallow: /\n")
    assert policy.allowed("http://h/x.jpg") is allowed


def test_garbage_and_empty_files_allow() -> None:
    assert RobotsPolicy.from_response(200, b"").allowed("http://h/x")
    assert RobotsPolicy.from_response(200, b"\xff\xfe<html>oops</html>").allowed("http://h/x")


@pytest.mark.parametrize("line", [
    "Crawl-delay: \u00b2",          # superscript two: isdigit() but not a number
    "Crawl-delay: %C2%B2",           # the same, percent-encoded
    "Crawl-delay: -3",
    "Crawl-delay: nan",
    "Request-rate: \u00b9/5",
    "Request-rate: 1/\u2075",
    "Request-rate: 1/" + "9" * 5000,
])
def test_numbers_the_parser_cannot_convert_are_ignored(line: str) -> None:
    body = f"User-agent: *\n{line}\nDisallow: /private/\n".encode()
    policy = RobotsPolicy.from_response(200, body)
    assert policy.crawl_delay == 0.0
    assert not policy.allowed("http://h/private/x.jpg")
    assert policy.allowed("http://h/x.jpg")


def test_ignored_number_keeps_the_group_structure() -> None:
    # A Crawl-delay line closes a group's user-agent list; the ignored one must too.
    body = "User-agent: otherbot\nCrawl-delay: \u00b2\nUser-agent: PixCrawler\nDisallow: /\n"
    policy = RobotsPolicy.from_response(200, body.encode())
    assert not policy.allowed("http://h/x.jpg")
    assert policy.allowed("http://h/x.jpg", "otherbot")


@pytest.mark.parametrize("digits", [400, 5000])
def test_huge_crawl_delay_is_infinite_not_an_overflow(digits: int) -> None:
    body = b"User-agent: *\nCrawl-delay: " + b"9" * digits + b"\nDisallow: /private/\n"
    policy = RobotsPolicy.from_response(200, body)
    assert policy.crawl_delay == float("inf")
    assert not policy.allowed("http://h/private/x.jpg")


def test_fractional_crawl_delay() -> None:
    policy = RobotsPolicy.from_response(200, b"User-agent: pixcrawler\nCrawl-delay: 0.5\n")
    assert policy.crawl_delay == 0.5


# The three answers urllib.robotparser (Python 3.11) gets wrong, which RFC 9309 settles.
@pytest.mark.parametrize("rules,path,allowed", [
    ("Disallow: /*.jpg$", "/a/b.jpg", False),           # wildcard and end anchor
    ("Disallow: /*.jpg$", "/a/b.jpg?size=2", True),     # ... the anchor is the end
    ("Disallow: /\nAllow: /public", "/public/x.jpg", True),     # the longest match wins
    ("Disallow: /\nAllow: /public", "/other/x.jpg", False),
    ("Disallow: /wp-admin/\nAllow: /wp-admin/admin-ajax.php", "/wp-admin/admin-ajax.php",
     True),                                              # WordPress's exception
    ("Disallow: /wp-admin/\nAllow: /wp-admin/admin-ajax.php", "/wp-admin/x.jpg", False),
])
def test_rfc9309_matching(rules: str, path: str, allowed: bool) -> None:
    policy = RobotsPolicy.from_response(200, f"User-agent: *\n{rules}\n".encode())
    assert policy.allowed("http://h" + path) is allowed
    assert policy.allowed(URL("http://h" + path)) is allowed


def test_group_is_named_and_merged() -> None:
    body = (b"User-agent: *\nDisallow: /\n\nUser-agent: PixCrawler\nUser-agent: other\n"
            b"Content-Signal: ai-train=no\n\nUser-agent: pixcrawler\nContent-Usage: train-ai=n\n"
            b"Crawl-delay: 1\n")
    policy = RobotsPolicy.from_response(200, body)
    assert policy.group == "pixcrawler, other"
    assert policy.extensions == {"content-signal": ["ai-train=no"],
                                 "content-usage": ["train-ai=n"]}
    assert policy.crawl_delay == 1.0 and policy.allowed("http://h/x.jpg")
    star = RobotsPolicy.from_response(200, b"Content-Signal: search=yes\nUser-agent: *\n"
                                           b"Content-Signal: ai-train=no\n")
    assert star.group == "*"
    assert star.extensions == {"content-signal": ["search=yes", "ai-train=no"]}
    assert RobotsPolicy.from_response(200, b"User-agent: otherbot\nDisallow: /\n").group == ""


def test_only_path_and_query_are_matched() -> None:
    policy = RobotsPolicy.from_response(200, b"User-agent: *\nDisallow: /private\n")
    for url in ("http://u%5B@h/ok", "http://u%5D@h/ok?q=%5B"):
        assert policy.allowed(url)
        assert policy.allowed(URL(url))
    assert not policy.allowed("http://u%5B@h/private/x.jpg")
    assert not policy.allowed(URL("http://u%5B@h/private/x.jpg"))
    # "//x[" is a path here, not an authority (urllib.robotparser raised on it).
    assert policy.allowed("http://h//x%5B/a.jpg")
    assert policy.allowed(URL("http://h//x%5B/a.jpg"))
    assert not policy.allowed("http://h/private//x%5B/a.jpg")


def test_cache_keeps_a_policy_with_unconvertible_numbers() -> None:
    body = "User-agent: *\nCrawl-delay: \u00b2\nDisallow: /x\n".encode()
    source = CountingRobotsSource({"http://a.test:80": (200, body)})

    async def main() -> list[bool]:
        cache = RobotsCache(source)
        return [await cache.allowed(URL("http://a.test/x/1.jpg")),
                await cache.allowed(URL("http://u%5B@a.test/y/2.jpg"))]

    assert asyncio.run(main()) == [False, True]
    assert len(source.calls) == 1


def test_origin_key() -> None:
    assert origin_of(URL("http://Example.com/a")) == "http://example.com:80"
    assert origin_of(URL("https://example.com/a")) == "https://example.com:443"
    assert origin_of(URL("http://example.com:8080/a")) == "http://example.com:8080"


class CountingRobotsSource:
    """A robots.txt source for the cache: serves fixed answers per origin, slowly, and counts."""

    def __init__(self, answers: dict[str, tuple[int, bytes]]):
        self.answers = answers
        self.calls: list[str] = []

    async def __call__(self, url: URL) -> tuple[int, bytes]:
        self.calls.append(str(url))
        await asyncio.sleep(0.05)
        return self.answers.get(origin_of(url), (404, b""))


def test_cache_fetches_once_per_origin_for_concurrent_requests() -> None:
    source = CountingRobotsSource({"http://a.test:80": (200, b"User-agent: *\nDisallow: /x\n")})

    async def main() -> list[bool]:
        cache = RobotsCache(source)
        urls = [URL(f"http://a.test/{'x' if i % 2 else 'y'}/{i}.jpg") for i in range(30)]
        urls += [URL(f"http://b.test/x/{i}.jpg") for i in range(10)]
        verdicts = await asyncio.gather(*(cache.allowed(u) for u in urls))
        assert cache.cached(URL("http://a.test/anything")) is not None
        assert await cache.allowed(URL("http://a.test/y/again.jpg"))
        assert cache.fetches == 2
        return list(verdicts)

    verdicts = asyncio.run(main())
    assert sorted(source.calls) == ["http://a.test/robots.txt", "http://b.test/robots.txt"]
    assert verdicts[:30] == [i % 2 == 0 for i in range(30)]
    assert all(verdicts[30:])


def test_cache_keys_by_scheme_and_port() -> None:
    source = CountingRobotsSource({})

    async def main() -> None:
        cache = RobotsCache(source)
        for url in ("http://a.test/1", "https://a.test/1", "http://a.test:81/1",
                    "http://a.test/2?q=1"):
            await cache.allowed(URL(url))

    asyncio.run(main())
    assert source.calls == ["http://a.test/robots.txt", "https://a.test/robots.txt",
                            "http://a.test:81/robots.txt"]


def test_cancelled_waiter_does_not_cancel_the_shared_fetch() -> None:
    source = CountingRobotsSource({})

    async def main() -> bool:
        cache = RobotsCache(source)
        first = asyncio.ensure_future(cache.allowed(URL("http://a.test/1")))
        second = asyncio.ensure_future(cache.allowed(URL("http://a.test/2")))
        await asyncio.sleep(0.01)
        first.cancel()
        return await second

    assert asyncio.run(main()) is True
    assert len(source.calls) == 1


@pytest.mark.parametrize("values,expected", [
    (["noai"], "noai"),
    (["NoImageAI, nofollow"], "noimageai"),
    (["noindex"], "noindex"),
    (["noml"], "noml"),
    (["otherbot: noai, pixcrawler: NoML"], "pixcrawler: noml"),
    (["nofollow, noimageindex"], "noimageindex"),
    (["pixcrawler: noai"], "pixcrawler: noai"),
    (["PixCrawler: noindex, nofollow"], "pixcrawler: noindex"),
    (["*: noimageai"], "*: noimageai"),
    (["googlebot: nofollow", "noai"], "noai"),
    (["googlebot: noindex, pixcrawler: noai"], "pixcrawler: noai"),
    (["googlebot: noindex"], None),
    (["otherbot: noai, noimageindex"], None),
    (["nofollow, noarchive"], None),
    (["max-image-preview: large, nosnippet"], None),
    (["unavailable_after: Friday, 25-Jun-10 15:00:00 PST"], None),
    (["all"], None),
    (["none"], "none"),  # noindex, nofollow
    (["noai noimageai"], "noai"),  # spaces where commas belong
    (["index, follow noimageai"], "noimageai"),
    (["PixCrawler: nofollow NoImageAI"], "pixcrawler: noimageai"),
    (["otherbot: noai noimageai"], None),
    (["max-image-preview: none"], None),  # a value, not the directive
    (["googlebot: max-image-preview: none, noarchive"], None),
    (["max-image-preview:large noai"], "noai"),
    (["unavailable_after: 25 Jun 2010 15:00:00 PST"], None),
    (["googlebot: none"], None),
    ([""], None),
    ([], None),
])
def test_x_robots_tag(values: list[str], expected: object) -> None:
    assert optout_directive(values, ROBOTS_UA) == expected


def test_a_byte_order_mark_does_not_lose_the_first_group():
    """A robots.txt (or ai.txt) saved with a BOM: its first line still opens the group."""
    policy = RobotsPolicy.from_response(200, b"\xef\xbb\xbfUser-agent: *\nDisallow: /\n")
    assert policy.group == "*" and not policy.allowed("/x.jpg")


def test_an_origins_answer_is_read_again_after_a_day():
    """RFC 9309 2.4: a cached robots.txt should not be used for more than 24 hours. The cache
    kept every answer for the fetcher's life, so a job running for days never saw a site that
    opted out meanwhile."""
    from builder.robots import ORIGIN_MAX_AGE_S, OriginCache

    now = [0.0]
    loads: list[str] = []

    async def load(url: URL) -> str:
        loads.append(str(url))
        return f"answer {len(loads)}"

    cache: OriginCache[str] = OriginCache(load, clock=lambda: now[0])
    url = URL("https://example.com/a.jpg")

    async def scenario() -> list[object]:
        seen: list[object] = [await cache.get(url)]
        now[0] = ORIGIN_MAX_AGE_S - 1
        seen += [cache.cached(url), await cache.get(URL("https://example.com/b.jpg"))]
        now[0] = ORIGIN_MAX_AGE_S + 1
        seen += [cache.cached(url), await cache.get(url), cache.cached(url)]
        return seen

    assert asyncio.run(scenario()) == ["answer 1", "answer 1", "answer 1", None, "answer 2",
                                       "answer 2"]
    assert len(loads) == 2


@pytest.mark.parametrize("body, path, allowed, group", [
    # another crawler's token that starts like ours is not ours (protego matched it)
    ("User-agent: pix\nAllow: /\n\nUser-agent: *\nDisallow: /\n", "/a.jpg", False, "*"),
    ("User-agent: PixCraw\nDisallow: /\n", "/a.jpg", True, ""),
    # a version after the token still names us (protego missed it)
    ("User-agent: PixCrawler/1.0\nDisallow: /\n\nUser-agent: *\nAllow: /\n", "/a.jpg", False,
     "pixcrawler"),
    ("User-agent: pixcrawler\nDisallow: /private\n", "/private/a.jpg", False, "pixcrawler"),
    ("User-agent: PIXCRAWLER # us\nDisallow: /private\n", "/a.jpg", True, "pixcrawler"),
    ("User-agent: PixCrawlerBot\nDisallow: /\n", "/a.jpg", True, ""),
    ("User-agent: Mozilla/5.0 (compatible; PixCrawler/1.0)\nDisallow: /\n", "/a.jpg", True, ""),
    ("User-agent: *\nDisallow: /x\n", "/x/a.jpg", False, "*"),
])
def test_a_group_names_a_whole_product_token(body, path, allowed, group):
    """RFC 9309 2.2.1: the group is the one whose product token is ours, matched without case
    and whole."""
    policy = RobotsPolicy.from_response(200, body.encode())
    assert policy.allowed(f"https://example.com{path}") is allowed
    assert policy.group == group


@pytest.mark.parametrize("body, allowed, group", [
    # an empty User-agent value must not swallow the line after it
    ("User-agent: PixCrawler\nUser-agent:   \nDisallow: /\n", False, "pixcrawler"),
    ("User-agent:\nUser-agent: PixCrawler\nDisallow: /\n", False, "pixcrawler"),
    # lines ending in CR alone are lines too (protego and the groups split them alike)
    ("User-agent: *\rAllow: /\r\rUser-agent: pix\rDisallow: /\r", True, "*"),
    ("User-agent: PixCrawler/1.0\r\nDisallow: /\r\n\r\nUser-agent: *\r\nAllow: /\r\n", False,
     "pixcrawler"),
    ("\ufeffUser-Agent:\tPixCrawler\t# us\nDisallow: /\n", False, "pixcrawler"),
    ("user agent: PixCrawler\nDisallow: /\n", False, "pixcrawler"),
    ("User-agent:*\nDisallow: /\n", False, "*"),
    # lines as protego reads them, for the decision as for the ledger: without a colon,
    # misspelled, site-wide fields that end no group, extensions that end one
    ("User-agent PixCrawler\nDisallow: /\n", False, "pixcrawler"),
    ("User  agent PixCrawler\nDissallow: /\n", False, "pixcrawler"),
    ("User-agent: PixCrawler\nAllow /\nUser-agent: other\nDisallow: /\n", True, "pixcrawler"),
    ("User-agent: PixCrawler\nSitemaps: http://x/s\nUser-agent: other\nDisallow: /\n", False,
     "pixcrawler, other"),
    ("User-agent: PixCrawler\nUser-agent-note: hi\nUser-agent: other\nDisallow: /\n", True,
     "pixcrawler"),
])
def test_the_decision_and_the_ledger_read_the_same_group(body, allowed, group):
    """protego decides and ``_groups`` names the group (and reads its Content-Signal): the
    rewrite for protego once disagreed with ``_groups`` on empty values and CR line ends."""
    policy = RobotsPolicy.from_response(200, body.encode())
    assert policy.allowed("https://example.com/a.jpg") is allowed
    assert policy.group == group


def test_an_origins_signals_are_built_from_a_robots_txt_read_lately():
    """A robots.txt read 23 hours earlier (for a page's check) went into signals kept 24
    hours more."""
    from builder.robots import OriginCache

    now = [0.0]
    loads: list[int] = []

    async def load(url: URL) -> int:
        loads.append(1)
        return len(loads)

    cache: OriginCache[int] = OriginCache(load, clock=lambda: now[0])
    url = URL("https://example.com/a.jpg")

    async def scenario() -> list[object]:
        first = await cache.get(url)
        now[0] = 61.0
        return [first, cache.cached(url), cache.cached(url, 60.0),
                await cache.get(url, 60.0), cache.cached(url)]

    assert asyncio.run(scenario()) == [1, 1, None, 2, 2]


def test_the_opt_outs_of_the_group_protego_applies_are_the_ones_read():
    """``Sitemaps:`` ends no group for protego, and ended one for the ledger: protego applied
    the next group's rules to us while the ledger read only our own group, and its
    ``ai-train=no`` was lost."""
    policy = RobotsPolicy.from_response(200, b"User-agent: PixCrawler\nSitemaps: http://x/s\n"
                                             b"User-agent: other\nDisallow: /private\n"
                                             b"Content-Signal: ai-train=no\n")
    assert not policy.allowed("https://example.com/private/a.jpg")
    assert policy.extensions == {"content-signal": ["ai-train=no"]}
    spaced = RobotsPolicy.from_response(200, b"User-agent: *\nAllow: /\nContent-Signal: "
                                             b"ai-train=yes\n\nUser  agent PixCrawler\n"
                                             b"Disallow: /private\nContent-Signal: ai-train=no\n")
    assert not spaced.allowed("https://example.com/private/a.jpg")
    assert spaced.group == "pixcrawler"
    assert spaced.extensions == {"content-signal": ["ai-train=no"]}


class _Sized:
    def __init__(self, name: str, size: int):
        self.name, self.size = name, size


def test_the_origins_kept_weigh_at_most_the_caches_bytes_the_last_used_first_to_go():
    """Every origin's rules were kept for 24 hours: a list of images on thousands of
    subdomains of a server of 512 KiB rule files (about 32 MB an origin, parsed) filled a
    worker's memory. The cache now keeps what ``cache_weight`` says fits ``max_bytes``,
    dropping the origin used longest ago, and loads a dropped one again when it comes back."""
    from builder.robots import OriginCache, cache_weight

    sizes = {"a": 100, "b": 100, "c": 100, "huge": 10_000}
    loads: list[str] = []

    async def load(url: URL) -> _Sized:
        loads.append(url.host)
        return _Sized(url.host, sizes[url.host])

    cache: OriginCache[_Sized] = OriginCache(load, max_bytes=2 * cache_weight(100))

    def at(host: str) -> URL:
        return URL(f"https://{host}/x.jpg")

    async def scenario() -> list[object]:
        await cache.get(at("a"))
        await cache.get(at("b"))
        seen: list[object] = [cache.cached(at("a")).name]  # a: used last now
        await cache.get(at("c"))  # b, the one used longest ago, goes
        seen += [cache.cached(at("b")), cache.cached(at("a")).name, cache.weight]
        await cache.get(at("huge"))  # over the bytes alone: kept, everything else dropped
        seen += [cache.cached(at("a")), cache.cached(at("c")), cache.cached(at("huge")).name]
        seen.append((await cache.get(at("b"))).name)
        return seen

    assert asyncio.run(scenario()) == ["a", None, "a", 2 * cache_weight(100), None, None,
                                       "huge", "b"]
    assert loads == ["a", "b", "c", "huge", "b"]
    assert cache.weight == cache_weight(100) and cache.evicted == 4


def test_at_most_the_gates_slots_are_held_at_once_and_a_cancelled_wait_takes_none():
    from builder.robots import RulesGate

    async def parse(gate: RulesGate) -> None:
        async with gate.slot():
            await asyncio.sleep(0.01)

    async def main() -> tuple[int, int]:
        gate = RulesGate(slots=2)
        tasks = [asyncio.ensure_future(parse(gate)) for _ in range(6)]
        await asyncio.sleep(0)
        tasks[-1].cancel()  # waiting for a slot
        await asyncio.gather(*tasks, return_exceptions=True)
        return gate.most_held, gate._slots._value

    assert asyncio.run(main()) == (2, 2)


def test_an_origin_whose_long_files_were_dropped_too_often_is_not_read_again_for_a_while():
    """Origins of long files taking turns were each read and parsed again for every image
    once the cache dropped them for room. After ``MAX_RELOADS`` reads, each within
    ``DROP_MEMORY_S`` of the last drop, the origin is answered by ``unkept`` (refused as not
    known) until ``DROP_MEMORY_S`` after its last drop; an origin of shorter files is read
    again freely."""
    from builder.robots import (DROP_MEMORY_S, INLINE_PARSE_BYTES, MAX_RELOADS, OriginCache,
                                cache_weight)

    long_bytes = 4 * INLINE_PARSE_BYTES + 1
    loads: list[str] = []
    now = [0.0]

    async def load(url: URL) -> _Sized:
        loads.append(url.host)
        return _Sized(url.host, long_bytes if url.host.startswith("long") else 10)

    cache: OriginCache[object] = OriginCache(load, max_bytes=cache_weight(long_bytes),
                                             clock=lambda: now[0], unkept=lambda url: "unkept")

    async def rounds(n: int) -> list[object]:
        seen = []
        for _ in range(n):
            for host in ("long-a", "long-b", "short"):
                value = await cache.get(URL(f"https://{host}/x.jpg"))
                seen.append(value if isinstance(value, str) else value.name)
                now[0] += 1.0
        return seen

    seen = asyncio.run(rounds(MAX_RELOADS + 3))
    assert loads.count("long-a") == loads.count("long-b") == MAX_RELOADS + 1
    assert seen[-3:] == ["unkept", "unkept", "short"]
    # dropped for the long ones each round (read again each time), kept once they are not
    assert loads.count("short") == MAX_RELOADS + 1 and seen[2::3] == ["short"] * (MAX_RELOADS + 3)
    now[0] += DROP_MEMORY_S + 1
    assert asyncio.run(rounds(1))[:2] == ["long-a", "long-b"]  # read again after a while


def test_a_shared_robots_read_left_by_its_waiters_leaves_no_unread_error_and_ends_with_close():
    """A read all of whose waiters were cancelled (a fetcher closing) failed later with
    nobody to take its error (asyncio logs "Task exception was never retrieved"); a read
    asked for after the cache closed ran on against a closed session."""
    import gc

    url = URL("https://example.com/a.jpg")
    reported: list[dict] = []

    async def fetch(robots_url: URL) -> tuple[int, bytes]:
        await asyncio.sleep(0.05)
        raise OSError("the network is gone")

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx))
        cache = RobotsCache(fetch)
        waiter = asyncio.ensure_future(cache.read(url))
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.sleep(0.1)
        gc.collect()
        await cache.close()
        with pytest.raises(RuntimeError, match="closed"):
            await cache.read(url)

    asyncio.run(main())
    assert reported == []
