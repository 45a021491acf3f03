"""Opt-out signals and the rights ledger: the parsers, then the fetcher against the sandbox web's
opt-out sites (every signal has a route there: ``builder/sandbox/sites.py``)."""

from __future__ import annotations

import asyncio
import codecs
import io
import os
import random
import signal
import socket
import time
from typing import Any, Awaitable, Callable, Optional

import pyarrow as pa
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import Image, PngImagePlugin
from yarl import URL

from builder.fetch import Fetcher
from builder.reasons import Reason
from builder.records import Candidate, Record
from builder.rights import ALLOW, NONE, REFUSE, RIGHTS_TYPE, RightsTally, Signal, first_refusal
from builder.sandbox import SandboxWeb
from builder.sandbox.sites import ACCEPTED, PAGE_CASES, SIGNAL_CASES
from builder.signals import (OriginSignals, content_signal_verdict, parse_preferences,
                             parse_tdmrep, path_matches, usage_verdict)
from builder.spec import DownloadSpec
from builder.xmp import data_mining, jpeg_with_xmp, xmp_with_data_mining


# ---- parsers ----------------------------------------------------------------------------------


def test_preferences_parse_and_refusals_stick() -> None:
    assert parse_preferences("train-ai=n, search=y") == {"train-ai": "n", "search": "y"}
    assert parse_preferences("search=yes, ai-train=no") == {"search": "y", "ai-train": "n"}
    assert parse_preferences('Train-AI="N";x=1, bogus, =y') == {"train-ai": "n"}
    assert parse_preferences("train-ai=n, train-ai=y") == {"train-ai": "n"}


@pytest.mark.parametrize("prefs,usage,verdict", [
    ({"train-ai": "n"}, "train-ai", REFUSE),
    ({"train-ai": "n"}, "train-genai", REFUSE),
    ({"train-genai": "n", "train-ai": "y"}, "train-genai", REFUSE),
    ({"train-genai": "n", "train-ai": "y"}, "train-ai", ALLOW),   # a classifier dataset
    ({"bots": "n"}, "train-ai", REFUSE),                          # the parent category
    ({"train-ai": "y", "bots": "n"}, "train-ai", ALLOW),          # the most specific decides
    ({"search": "n"}, "train-genai", NONE),
])
def test_usage_follows_the_vocabulary_hierarchy(prefs: dict, usage: str, verdict: str) -> None:
    assert usage_verdict(prefs, usage) == verdict


def test_content_signal_verdict() -> None:
    assert content_signal_verdict({"ai-train": "n", "search": "y"}) == REFUSE
    assert content_signal_verdict({"ai-train": "y"}) == ALLOW
    assert content_signal_verdict({"ai-input": "n"}) == NONE


@pytest.mark.parametrize("pattern,path,matches", [
    ("", "/x", True), ("/a/", "/a/b.jpg", True), ("/a/", "/b/a/", False),
    ("/*.jpg$", "/a/b.jpg", True), ("/*.jpg$", "/a/b.jpg?x", False), ("*", "/x", True),
    ("/reserved/*", "/reserved/x.jpg", True), ("/reserved/*", "/open/x.jpg", False),
])
def test_path_patterns(pattern: str, path: str, matches: bool) -> None:
    assert path_matches(pattern, path) is matches


def test_path_matching_agrees_with_the_rfcs_regular_expression_on_random_patterns() -> None:
    """``*`` as ``.*`` and a final ``$`` as the end, read as a regular expression matched at
    the path's start: the reference, over random patterns and paths of a small alphabet."""
    import random
    import re

    rnd = random.Random(9309)
    for _ in range(20_000):
        pattern = "/" + "".join(rnd.choice("ab*/") for _ in range(rnd.randint(0, 6)))
        pattern += "$" if rnd.random() < 0.4 else ""
        path = "/" + "".join(rnd.choice("ab/") for _ in range(rnd.randint(0, 8)))
        body = pattern[:-1] if pattern.endswith("$") else pattern
        regex = ".*".join(map(re.escape, body.split("*"))) + ("$" if body != pattern else "")
        assert path_matches(pattern, path) is bool(re.match(regex, path)), (pattern, path)


@pytest.mark.timeout(30)
def test_a_pattern_of_many_wildcards_is_matched_without_backtracking() -> None:
    """A site's rule of a dozen ``*``s against a long path (a regular expression of ``.*``s
    would run for hours on the fetching event loop)."""
    pattern = "/" + "*a" * 12 + "*b"
    assert not path_matches(pattern, "/" + "a" * 5_000)
    assert path_matches(pattern, "/" + "a" * 5_000 + "b")
    assert not path_matches(pattern + "$", "/" + "a" * 5_000 + "bc")


def test_tdmrep_file() -> None:
    body = (b'[{"location": "/a/*", "tdm-reservation": 1, "tdm-policy": "https://p/x.json"},'
            b' {"location": "/", "tdm-reservation": "0"}, {"location": "/b", "x": 2}, 7]')
    rules, absent = parse_tdmrep(200, body)
    assert [(r.pattern, r.signal.verdict) for r in rules] == [("/a/", REFUSE), ("", ALLOW)]
    assert rules[0].signal.value == "tdm-reservation=1, tdm-policy=https://p/x.json"
    assert parse_tdmrep(404, b"")[0] == [] and "HTTP 404" in parse_tdmrep(404, b"")[1].source
    assert parse_tdmrep(200, b"<html>soft 404</html>")[0] == []
    assert parse_tdmrep(200, b'{"location": "/", "tdm-reservation": 1}')[0][0].signal.refuses


def test_a_tdmrep_file_with_a_byte_order_mark_is_read() -> None:
    """A file saved with a BOM (as Windows editors do) failed to parse as JSON and read as
    no reservation: the site's images were taken."""
    rules, _ = parse_tdmrep(200, b'\xef\xbb\xbf[{"location": "/", "tdm-reservation": 1}]')
    assert [(r.pattern, r.signal.verdict) for r in rules] == [("", REFUSE)]


def test_a_tdmrep_rule_whose_location_cannot_be_read_is_no_rule():
    """A location that is not a readable URL names no path: that rule is dropped, the others
    stand (it once made every image of the site a connection_error, and recheck crash)."""
    rules, _ = parse_tdmrep(200, b'[{"location": "https://[bad/images/*", "tdm-reservation": 1},'
                                 b' {"location": "https://example.com/r/*", "tdm-reservation": 1}]')
    assert [r.pattern for r in rules] == ["/r/"]
    origin = OriginSignals(DownloadSpec(), None, (rules, Signal("tdmrep", "", "none")), None)
    assert [s.verdict for s in origin.ledger(URL("https://example.com/r/a.jpg"))] == [REFUSE]
    assert [s.verdict for s in origin.ledger(URL("https://example.com/images/a.jpg"))] == [NONE]


def test_rule_paths_and_image_paths_are_compared_with_their_escapes_normalised():
    """RFC 9309 2.2.2: non-ASCII octets are compared percent-encoded, and encoded unreserved
    characters decoded. protego does so for robots.txt's own rules, but Content-Usage lines
    and tdmrep.json locations were matched as written: a site's refusal for /fotos/é/ or
    /%7Ejohn/ never matched its images, which were kept."""
    from builder.robots import RobotsPolicy

    robots = RobotsPolicy.from_response(200, (
        "User-agent: *\nAllow: /\nContent-Usage: /fotos/é/ train-ai=n\n"
        "Content-Usage: /%7Ejohn/ train-ai=n\n").encode())
    tdmrep = parse_tdmrep(200, '[{"location": "/fotos/é/*", "tdm-reservation": 1},'
                               ' {"location": "/%7Ejohn/*", "tdm-reservation": 1}]'.encode())
    origin = OriginSignals(DownloadSpec(), robots, tdmrep, None)
    for url in ("http://h/fotos/%C3%A9/a.jpg", "http://h/fotos/é/a.jpg", "http://h/~john/a.jpg",
                "http://h/%7Ejohn/a.jpg"):
        verdicts = {s.name: s.verdict for s in origin.ledger(URL(url))}
        assert verdicts["content_usage"] == verdicts["tdmrep"] == REFUSE, (url, verdicts)
    verdicts = {s.name: s.verdict for s in origin.ledger(URL("http://h/other/a.jpg"))}
    assert verdicts["tdmrep"] == NONE and verdicts["content_usage"] != REFUSE
    # two spellings of one path are one rule, their preferences merged (not the first kept)
    both = RobotsPolicy.from_response(200, (
        "User-agent: *\nAllow: /\nContent-Usage: /fotos/%C3%A9/ search=y\n"
        "Content-Usage: /fotos/é/ train-ai=n\n").encode())
    ledger = OriginSignals(DownloadSpec(), both, None, None).ledger(
        URL("http://h/fotos/%C3%A9/a.jpg"))
    assert {s.name: s.verdict for s in ledger}["content_usage"] == REFUSE
    # nor do two forms of one pattern: a prefix with or without its "*", or every path
    for lines in (("/a/* search=y", "/a/ train-ai=n"), ("* train-ai=y", "train-ai=n"),
                  ("/ search=y", "* train-ai=n")):
        robots = RobotsPolicy.from_response(200, ("User-agent: *\nAllow: /\n" + "".join(
            f"Content-Usage: {line}\n" for line in lines)).encode())
        ledger = OriginSignals(DownloadSpec(), robots, None, None).ledger(URL("http://h/a/x"))
        assert {s.name: s.verdict for s in ledger}["content_usage"] == REFUSE, lines


def _png_with_xmp(value: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp_with_data_mining(value).decode(), zip=True)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def test_xmp_data_mining_in_each_container() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), (9, 9, 9)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    assert data_mining(jpeg, "jpeg") is None
    marked = jpeg_with_xmp(jpeg, xmp_with_data_mining("DMI-PROHIBITED-GENAIMLTRAINING"))
    assert data_mining(marked, "jpeg") == "DMI-PROHIBITED-GENAIMLTRAINING"
    assert Image.open(io.BytesIO(marked)).size == (80, 60)
    assert data_mining(_png_with_xmp("DMI-ALLOWED"), "png") == "DMI-ALLOWED"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "WEBP", xmp=xmp_with_data_mining("DMI-PROHIBITED"))
    assert data_mining(buf.getvalue(), "webp") == "DMI-PROHIBITED"
    # after a re-encode (what a resize does) the XMP is gone: why it is read from the download
    buf = io.BytesIO()
    Image.open(io.BytesIO(marked)).save(buf, "JPEG")
    assert data_mining(buf.getvalue(), "jpeg") is None


def test_an_opt_out_outranks_a_robots_txt_that_could_not_be_read() -> None:
    """Both refuse, but only the opt-out lasts: the unreadable robots.txt came first in the
    ledger, so recheck counted the image unreachable (and kept it), and the crawl gave it a
    transient reason retry-failed would ask again."""
    from builder.rights import UNREACHABLE, first_refusal
    from builder.robots import RobotsPolicy

    tdmrep = parse_tdmrep(200, b'[{"location": "/", "tdm-reservation": 1}]')
    url = URL("http://h/x.jpg")
    for status in (503, 0):
        ledger = OriginSignals(DownloadSpec(), RobotsPolicy.from_response(status, b""), tdmrep,
                               None).ledger(url)
        assert [s.name for s in ledger if s.refuses] == ["robots_txt", "content_signal",
                                                         "content_usage", "tdmrep"]
        assert first_refusal(ledger).name == "tdmrep"
    alone = OriginSignals(DownloadSpec(), RobotsPolicy.from_response(503, b""), None,
                          None).ledger(url)
    assert first_refusal(alone).value == UNREACHABLE


@pytest.mark.parametrize("status, value", [(503, "unreachable"), (0, "no answer")])
def test_robots_txt_signals_that_could_not_be_read_refuse_without_respect_robots(status, value):
    """With ``respect_robots: false`` robots.txt's own rules do not count, but the
    Content-Signal and Content-Usage lines it carries do: a robots.txt that could not be read
    left them recorded as saying nothing, and the image was kept."""
    from builder.robots import RobotsPolicy

    config = DownloadSpec(respect_robots=False)
    ledger = OriginSignals(config, RobotsPolicy.from_response(status, b""), None,
                           None).ledger(URL("http://h/x.jpg"))
    why = f"HTTP {status}" if status else "no answer"
    assert ledger == (
        Signal("content_signal", value, f"robots.txt lines ({why}: unreachable)", REFUSE),
        Signal("content_usage", value, f"robots.txt lines ({why}: unreachable)", REFUSE))


def test_tally_sums_ledgers() -> None:
    tally = RightsTally()
    tally.add((Signal("robots_txt", "allow", "robots.txt group '*'", ALLOW),
               Signal("tdmrep", "", "/.well-known/tdmrep.json (HTTP 404)")))
    tally.add((Signal("tdmrep", "tdm-reservation=1", "header tdm-reservation", REFUSE),))
    other = RightsTally()
    other.add(())
    tally.merge(other)
    summary = tally.summary()
    assert summary["records"] == 3 and summary["checked"] == 2 and summary["refused"] == 1
    assert summary["signals"]["tdmrep"] == {"checked": 2, "present": 1, "allowed": 0,
                                            "refused": 1}
    assert summary["signals"]["robots_txt"]["allowed"] == 1


def test_a_rights_column_tallies_as_its_ledgers_do_one_by_one() -> None:
    """``add_column`` (how a continuing run counts the published rejects it decides again)
    gives ``add``'s counts; a null ledger (a reject written before rejects kept them) counts
    as a record whose ledger is unknown, and a published summary less it says so."""
    rng = random.Random(3)
    names, verdicts = ["robots_txt", "tdmrep", "x_robots_tag"], [ALLOW, REFUSE, NONE]
    ledgers = [[Signal(rng.choice(names), rng.choice(["", "v"]), "src", rng.choice(verdicts))
                for _ in range(rng.randint(0, 3))] for _ in range(300)]
    one_by_one = RightsTally()
    for ledger in ledgers:
        one_by_one.add(ledger)
    column = pa.chunked_array([pa.array(ledgers[:100], RIGHTS_TYPE),
                               pa.array(ledgers[100:], RIGHTS_TYPE)])
    by_column = RightsTally()
    by_column.add_column(column)
    assert by_column.summary() == one_by_one.summary() and one_by_one.refused_records > 0
    empty = RightsTally()
    empty.add_column(pa.chunked_array([], RIGHTS_TYPE))
    assert empty.summary() == RightsTally().summary()

    published = RightsTally.from_summary(one_by_one.summary())
    assert published.summary() == one_by_one.summary()
    legacy = RightsTally()
    legacy.add_column(pa.array([None, None, []], RIGHTS_TYPE))
    assert (legacy.records, legacy.unrecorded, legacy.with_ledger) == (3, 2, 0)
    published.merge(legacy, -1)
    after = published.summary()
    assert after["records"] == 297 and after["earlier_ledgers"] == 2
    assert RightsTally.from_summary(after).summary() == after
    assert "earlier_ledgers" not in one_by_one.summary()


# ---- the fetcher against the sandbox's opt-out sites -----------------------------------------


@pytest.fixture(scope="module")
def web():
    with SandboxWeb(images_per_class=2) as sandbox:
        yield sandbox


def cfg(**kw: Any) -> DownloadSpec:
    base: dict[str, Any] = dict(timeout_s=5.0, retries=0, allow_private_networks=True)
    base.update(kw)
    return DownloadSpec(**base)


def fetch(urls: list[str], config: DownloadSpec, *, pages: Optional[list[str]] = None,
          resolver: Optional[AbstractResolver] = None) -> tuple[list[Record], dict]:
    pages = pages or [""] * len(urls)

    async def main() -> tuple[list[Record], dict]:
        async with Fetcher(config, resolver=resolver) as fetcher:
            records = [Record(Candidate(url=u, label="x", page_url=p))
                       for u, p in zip(urls, pages)]
            return await fetcher.fetch_many(records), fetcher.stats

    return asyncio.run(main())


def entry(record: Record, name: str, verdict: str) -> Signal:
    found = [s for s in record.rights if s.name == name and s.verdict == verdict]
    assert found, f"no {name}/{verdict} in {record.rights}"
    return found[0]


@pytest.mark.parametrize("case", sorted(SIGNAL_CASES))
def test_each_signal_gives_its_reason_and_ledger_entry(web: SandboxWeb, case: str) -> None:
    expected = SIGNAL_CASES[case]
    [record], _ = fetch([web.signal_urls()[case]], cfg())
    if expected.outcome == ACCEPTED:
        assert not record.rejected, record.detail
        assert record.data is not None
    else:
        assert record.reason == expected.outcome, record.detail
    signal = entry(record, expected.signal, expected.verdict)
    if expected.verdict == REFUSE:
        assert record.detail.startswith("robots.txt disallows" if expected.signal ==
                                        "robots_txt" else f"{expected.signal}:")
        assert signal.source in record.detail
    # every signal checked is in the ledger, each once per source, refusal last
    names = {s.name for s in record.rights}
    if not record.rejected:
        assert {"robots_txt", "content_signal", "content_usage", "tdmrep", "ai_txt",
                "x_robots_tag", "xmp_datamining"} <= names
        assert not any(s.refuses for s in record.rights)


def test_ledger_says_where_each_value_came_from(web: SandboxWeb) -> None:
    urls = web.signal_urls()
    records, _ = fetch([urls["tdmrep_reserved"], urls["tdm_header"], urls["xmp_allowed"],
                        urls["content_signal"]], cfg())
    reserved, header, xmp, content = records
    assert entry(reserved, "tdmrep", REFUSE).source == \
        "/.well-known/tdmrep.json location '/reserved/*'"
    assert "tdm-policy=https://sandbox.invalid/tdm-policy.json" in reserved.detail
    assert entry(header, "tdmrep", REFUSE).source == "header tdm-reservation"
    assert entry(xmp, "xmp_datamining", ALLOW).value == "DMI-ALLOWED"
    assert entry(xmp, "robots_txt", ALLOW).source == "robots.txt group '*'"
    signal = entry(content, "content_signal", REFUSE)
    assert (signal.value, signal.source) == ("search=yes, ai-train=no", "robots.txt group '*'")


def test_origin_files_are_fetched_once_per_origin(web: SandboxWeb) -> None:
    base = web.site_url("tdmrep")
    site = web.site("tdmrep")
    before = list(site.paths)
    urls = [f"{base}/{'reserved' if i % 2 else 'open'}/{i}.jpg" for i in range(24)]
    records, stats = fetch(urls, cfg())
    assert [r.reason for r in records] == [Reason.OPTED_OUT.value if i % 2 else ""
                                           for i in range(24)]
    new = site.paths[len(before):]
    assert [new.count(p) for p in ("/robots.txt", "/.well-known/tdmrep.json", "/ai.txt")] == \
        [1, 1, 1]
    # a refused image is never downloaded
    assert not any(p.startswith("/reserved/") for p in new)
    assert stats["signal_fetches"] == 2 and stats["robots_fetches"] == 1


def test_signals_switched_off_are_neither_read_nor_honoured(web: SandboxWeb) -> None:
    urls = web.signal_urls()
    off = cfg(signals={"tdmrep": False, "content_usage": False, "content_signal": False,
                       "xmp_datamining": False, "ai_txt": False}, respect_optouts=False)
    cases = ["tdmrep_reserved", "tdm_header", "content_signal", "content_usage_robots",
             "content_usage_header", "xmp_prohibited", "ai_txt", "x_robots_tag_noml"]
    records, stats = fetch([urls[c] for c in cases], off)
    assert [r.detail for r in records if r.rejected] == []
    assert {s.name for r in records for s in r.rights} == {"robots_txt"}
    assert stats["signal_fetches"] == 0


def test_train_ai_usage_lets_a_genai_only_refusal_through(web: SandboxWeb) -> None:
    site = web.site("mutable")
    site.headers = {"/genai/": {"Content-Usage": "train-genai=n, train-ai=y"}}
    try:
        url = web.site_url("mutable") + "/genai/x.jpg"
        [genai], _ = fetch([url], cfg())
        [classifier], _ = fetch([url], cfg(signals={"usage": "train-ai"}))
    finally:
        site.headers = {}
    assert genai.reason == Reason.OPTED_OUT.value
    assert genai.detail == "content_usage: train-genai=n, train-ai=y (header Content-Usage)"
    assert not classifier.rejected
    assert entry(classifier, "content_usage", ALLOW).value == "train-genai=n, train-ai=y"


def test_a_redirect_starts_the_ledger_over_on_the_new_origin(web: SandboxWeb) -> None:
    site = web.site("mutable")
    tdmrep = web.site_url("tdmrep")
    site.redirects = {"/go/open.jpg": tdmrep + "/open/r.jpg",
                      "/go/reserved.jpg": tdmrep + "/reserved/r.jpg"}
    try:
        base = web.site_url("mutable")
        (opened, reserved), _ = fetch([base + "/go/open.jpg", base + "/go/reserved.jpg"], cfg())
    finally:
        site.redirects = {}
    assert not opened.rejected and opened.final_url == tdmrep + "/open/r.jpg"
    assert [s.source for s in opened.rights if s.name == "tdmrep"] == \
        ["/.well-known/tdmrep.json location '/'", "header tdm-reservation"]
    assert reserved.reason == Reason.OPTED_OUT.value
    assert entry(reserved, "tdmrep", REFUSE).source == \
        "/.well-known/tdmrep.json location '/reserved/*'"


@pytest.fixture
def quick_retry(monkeypatch):
    from builder import robots as robots_module

    monkeypatch.setattr(robots_module, "UNREACHABLE_RETRY_S", 0.01)


@pytest.mark.parametrize("case", sorted(PAGE_CASES))
def test_page_meta_and_alt_text(web: SandboxWeb, case: str, quick_retry) -> None:
    expected = PAGE_CASES[case]
    url = web.signal_urls(PAGE_CASES)[case]
    page = web.signal_page(case)
    [without], _ = fetch([url], cfg(), pages=[page])
    assert not without.rejected  # the page is not read unless asked for
    [record], stats = fetch([url], cfg(signals={"page_meta": True}), pages=[page])
    signal = entry(record, expected.signal, expected.verdict)
    if expected.outcome == ACCEPTED:
        assert stats["page_fetches"] == 1
        assert not record.rejected and record.caption == "a cat on a sofa"
    elif expected.outcome == Reason.OPTOUT_UNREACHABLE.value:
        assert stats["page_fetches"] == 2  # asked once more a moment later
        assert record.reason == expected.outcome and signal.value == "unreachable"
        assert record.detail == (f"page {page} could not be read (HTTP 503, twice): whether its "
                                 "meta tags opt out is not known, so the image is not kept")
        assert signal.source == f"page {page} (not read: HTTP 503, twice)"
        assert entry(record, "robots_meta", REFUSE).source == signal.source
    else:
        assert stats["page_fetches"] == 1
        assert record.reason == expected.outcome
        assert record.detail.startswith("tdmrep: tdm-reservation=1")
        assert "meta tdm-reservation" in record.detail


PAGE_READS = {
    "disallowed by robots.txt": ("rfc9309-longest", "/private/page", None,
                                 "robots.txt disallows it", False, 0),
    "404": ("mutable", "/page/gone", 404, "HTTP 404", False, 1),
    "410": ("mutable", "/page/gone", 410, "HTTP 410", False, 1),
    "refused scheme": ("", "ftp://example.com/page", None, "scheme 'ftp' (only http/https)",
                       False, 0),
    "401": ("mutable", "/page/login", 401, "HTTP 401", True, 1),
    "403 (a bot wall)": ("mutable", "/page/wall", 403, "HTTP 403", True, 1),
    "451": ("mutable", "/page/legal", 451, "HTTP 451", True, 1),
    "429": ("mutable", "/page/busy", 429, "HTTP 429, twice", True, 2),
}


@pytest.mark.parametrize("case", sorted(PAGE_READS))
def test_a_page_not_read_says_why_and_refuses_only_when_its_opt_out_is_unknown(
        web: SandboxWeb, case: str, quick_retry) -> None:
    """A page that robots.txt disallows, that answers 404 or 410, or whose URL the guard
    refuses is not read, and says nothing: the image is kept. One that answers 401, 403, 451
    (a login, a bot wall, a legal block) or cannot be reached leaves its opt-out unknown: the
    image is not kept. Either way its page entries say why."""
    site, path, status, why, unknown, fetches = PAGE_READS[case]
    url = web.signal_urls(PAGE_CASES)["page_open"]
    page = web.site_url(site) + path if site else path
    if status is not None:
        web.site(site).statuses[path] = status
    try:
        [record], stats = fetch([url], cfg(signals={"page_meta": True}), pages=[page])
    finally:
        web.site("mutable").statuses.clear()
    assert stats["page_fetches"] == fetches and not record.caption
    found = [s for s in record.rights if s.source.startswith("page ")]
    assert [s.name for s in found] == ["tdmrep", "robots_meta"]
    assert {s.source for s in found} == {f"page {page} (not read: {why})"}
    if unknown:
        assert record.reason == Reason.OPTOUT_UNREACHABLE.value
        assert {(s.value, s.verdict) for s in found} == {("unreachable", REFUSE)}
    else:
        assert not record.rejected, record.detail
        assert {(s.value, s.verdict) for s in found} == {("", NONE)}


def test_a_page_whose_robots_txt_cannot_be_read_is_unknown(web: SandboxWeb, quick_retry) -> None:
    site = web.site("mutable")
    site.down = ("/robots.txt",)
    try:
        page = web.site_url("mutable") + "/page"
        [record], stats = fetch([web.signal_urls(PAGE_CASES)["page_open"]],
                                cfg(signals={"page_meta": True}), pages=[page])
    finally:
        site.down = ()
    assert stats["page_fetches"] == 0
    assert record.reason == Reason.OPTOUT_UNREACHABLE.value
    assert record.detail.startswith(f"page {page} could not be read (its robots.txt: HTTP 503)")


def test_an_image_whose_origin_the_guard_refuses_is_blocked_not_unreachable(web) -> None:
    """Its robots.txt was read first, and the guard's refusal taken for no answer: the image
    was rejected as a transient connection_error (retry-failed asked again for ever), after
    its three origin files were each asked twice."""
    async def main() -> tuple[list[Record], dict]:
        async with Fetcher(cfg(allow_private_networks=False),
                           resolver=BlockingResolver()) as fetcher:
            out = []
            for i in range(3):  # one after another: a load in flight is shared anyway
                out += await fetcher.fetch_many(
                    [Record(Candidate(url=f"http://intranet.test/{i}.jpg", label="x"))])
            return out, fetcher.stats

    records, stats = asyncio.run(main())
    assert {r.reason for r in records} == {Reason.BLOCKED_ADDRESS.value}
    assert {r.detail for r in records} == \
        {"intranet.test resolves only to blocked addresses: 10.0.0.1"}
    # the refusal is the origin's answer: its next images ask nothing, for a while
    assert stats["robots_fetches"] == 1 and stats["signal_fetches"] == 2


def test_an_origin_the_guard_refused_is_asked_again_after_a_while(monkeypatch) -> None:
    from builder import fetch as fetch_module

    monkeypatch.setattr(fetch_module, "REFUSED_ORIGIN_S", 0.0)

    async def main() -> dict:
        async with Fetcher(cfg(allow_private_networks=False),
                           resolver=BlockingResolver()) as fetcher:
            for i in range(2):
                await fetcher.fetch_many(
                    [Record(Candidate(url=f"http://intranet.test/{i}.jpg", label="x"))])
            return fetcher.stats

    assert asyncio.run(main())["robots_fetches"] == 2


class BlockingResolver(AbstractResolver):
    """Refuses every name, as the guard refuses one that resolves to a private address."""

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        from builder.netguard import BlockedAddressError

        raise BlockedAddressError(host, f"{host} resolves only to blocked addresses: 10.0.0.1")

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("hop", ["name", "redirect"])
def test_a_page_the_guard_refuses_on_the_way_says_nothing(web: SandboxWeb, hop: str) -> None:
    """A page whose name, or the name a redirect leads to, resolves to an address the SSRF guard
    refuses is not read, as one whose URL it refuses: it was taken for no answer, so its images
    were rejected as transient, and retry-failed asked again for ever."""
    page = "http://intranet.test/page"
    if hop == "redirect":
        web.site("mutable").redirects["/page/moved"] = page
        page = web.site_url("mutable") + "/page/moved"
    try:
        [record], stats = fetch([web.signal_urls(PAGE_CASES)["page_open"]],
                                cfg(signals={"page_meta": True}), pages=[page],
                                resolver=BlockingResolver())
    finally:
        web.site("mutable").redirects.clear()
    assert not record.rejected, record.detail
    assert stats["page_fetches"] == (1 if hop == "redirect" else 0)  # its robots.txt first
    why = "the SSRF guard refuses an address on the way"
    assert {s.source for s in record.rights if s.source.startswith("page ")} == \
        {f"page {page} (not read: {why})"}


def test_the_images_of_a_page_that_is_down_share_one_read(web: SandboxWeb, quick_retry) -> None:
    urls = [web.site_url("main") + f"/sig/page-down/{i}.jpg" for i in range(5)]
    page = web.signal_page("page_unreachable")
    records, stats = fetch(urls, cfg(signals={"page_meta": True}), pages=[page] * 5)
    assert stats["page_fetches"] == 2
    assert {r.reason for r in records} == {Reason.OPTOUT_UNREACHABLE.value}


def test_a_page_that_could_not_be_read_is_asked_again_later(web: SandboxWeb, quick_retry,
                                                             monkeypatch) -> None:
    from builder import fetch as fetch_module

    monkeypatch.setattr(fetch_module, "UNKNOWN_PAGE_TTL_S", 0.0)
    site = web.site("mutable")
    page = web.site_url("mutable") + "/page/flaky"
    url = web.signal_urls(PAGE_CASES)["page_open"]

    async def main() -> tuple[Record, Record, dict]:
        async with Fetcher(cfg(signals={"page_meta": True})) as fetcher:
            site.statuses["/page/flaky"] = 503
            first = Record(Candidate(url=url, label="x", page_url=page))
            await fetcher.fetch_many([first])
            site.statuses.clear()
            second = Record(Candidate(url=url, label="x", page_url=page))
            await fetcher.fetch_many([second])
            return first, second, fetcher.stats

    try:
        first, second, stats = asyncio.run(main())
    finally:
        site.statuses.clear()
    assert first.reason == Reason.OPTOUT_UNREACHABLE.value
    assert not second.rejected and stats["page_fetches"] == 3


def test_without_respect_robots_an_unreadable_robots_txt_leaves_its_signals_unknown(
        web: SandboxWeb, quick_retry) -> None:
    site = web.site("mutable")
    site.down = ("/robots.txt",)
    try:
        url = web.site_url("mutable") + "/x.jpg"
        [record], _ = fetch([url], cfg(respect_robots=False))
        [kept], _ = fetch([url], cfg(respect_robots=False,
                                     signals={"content_signal": False, "content_usage": False}))
    finally:
        site.down = ()
    assert record.reason == Reason.OPTOUT_UNREACHABLE.value
    assert record.detail.startswith("content_signal: robots.txt lines (HTTP 503: unreachable) "
                                    f"could not be read for {url}")
    assert not kept.rejected, kept.detail


# ---- host profiles ----------------------------------------------------------------------------


class HostsResolver(AbstractResolver):
    """Resolves the names in ``hosts`` to the addresses given (like /etc/hosts); everything
    else fails."""

    def __init__(self, hosts: dict[str, str]):
        self.hosts = hosts

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if host not in self.hosts:
            raise OSError(f"{host} is not in the test's hosts map")
        return [ResolveResult(hostname=host, host=self.hosts[host], port=port,
                              family=socket.AF_INET, proto=0, flags=socket.AI_NUMERICHOST)]

    async def close(self) -> None:
        pass


WIKIMEDIA = HostsResolver({"upload.wikimedia.org": "127.0.0.1"})


def wikimedia_urls(web: SandboxWeb, n: int, width: int = 250) -> list[str]:
    port = web.site_url("wikimedia").rsplit(":", 1)[1]
    return [f"http://upload.wikimedia.org:{port}/wikipedia/commons/thumb/a/ab/F{i}.jpg/"
            f"{width}px-F{i}.jpg" for i in range(n)]


def test_wikimedia_profile_caps_concurrency_at_two(web: SandboxWeb) -> None:
    site = web.site("wikimedia")
    site.max_in_flight = 0
    records, _ = fetch(wikimedia_urls(web, 12), cfg(per_host_concurrency=16),
                       resolver=WIKIMEDIA)
    assert not any(r.rejected for r in records), [r.detail for r in records]
    assert site.max_in_flight == 2
    # the same host with the cap lifted in the spec: the sandbox sees more at once
    site.max_in_flight = 0
    records, _ = fetch(wikimedia_urls(web, 12, 500), cfg(
        per_host_concurrency=16, hosts={"upload.wikimedia.org": {"concurrency": 6}}),
        resolver=WIKIMEDIA)
    assert not any(r.rejected for r in records)
    assert site.max_in_flight > 2


def test_wikimedia_thumbnail_widths_are_made_standard(web: SandboxWeb) -> None:
    site = web.site("wikimedia")
    before = len(site.paths)
    [record], _ = fetch(wikimedia_urls(web, 1, 317), cfg(), resolver=WIKIMEDIA)
    assert not record.rejected, record.detail
    assert record.final_url.endswith("/330px-F0.jpg")
    assert site.paths[before:][-1].endswith("/330px-F0.jpg")
    # without the profile the sandbox refuses the width, as Wikimedia does
    [refused], _ = fetch(wikimedia_urls(web, 1, 317),
                         cfg(hosts={"upload.wikimedia.org": {"thumb_widths": [317]}}),
                         resolver=WIKIMEDIA)
    assert refused.reason == Reason.HTTP_CLIENT_ERROR.value


def test_bandwidth_cap_spaces_a_hosts_bodies(web: SandboxWeb) -> None:
    urls = wikimedia_urls(web, 6, 960)
    fast_start = time.perf_counter()
    fast, _ = fetch(urls, cfg(), resolver=WIKIMEDIA)
    fast_s = time.perf_counter() - fast_start
    size = sum(len(r.data or b"") for r in fast)
    rate = size / 1.0  # all six bodies in about a second
    slow_start = time.perf_counter()
    slow, _ = fetch(urls, cfg(hosts={"upload.wikimedia.org": {"max_bytes_per_s": rate}}),
                    resolver=WIKIMEDIA)
    slow_s = time.perf_counter() - slow_start
    assert not any(r.rejected for r in fast + slow)
    # The sixth body starts once the first four or five are paid for (two at a time).
    assert slow_s >= 0.6 and slow_s > fast_s + 0.3, (fast_s, slow_s)


def test_a_capped_host_paying_for_its_bytes_holds_back_no_other_host(web: SandboxWeb) -> None:
    """A request to a bandwidth-capped host slept out its payment holding one of the global
    slots; with one slot every other host waited for it. Its host's next request waits now."""
    capped = wikimedia_urls(web, 1, 960)
    [probe], _ = fetch(capped, cfg(), resolver=WIKIMEDIA)
    rate = len(probe.data or b"") / 3.0  # the body takes 3 s to pay for
    other = web.class_image_urls(web.classes[0])[:3]
    start = time.perf_counter()
    records, _ = fetch(capped + other, cfg(concurrency=1, hosts={"upload.wikimedia.org": {
        "max_bytes_per_s": rate}}), resolver=WIKIMEDIA)
    took = time.perf_counter() - start
    assert not any(r.rejected for r in records), [r.detail for r in records]
    assert took < 2.0, took


def test_card_sums_up_the_rights():
    from builder.card import render_card

    tally = RightsTally(["robots_txt", "tdmrep"])
    tally.add((Signal("robots_txt", "allow", "robots.txt group '*'", ALLOW),
               Signal("tdmrep", "tdm-reservation=1", "header tdm-reservation", REFUSE)))
    card = render_card("d", "", {"rights": tally.summary()}, "")
    section = card.split("## Rights and opt-outs\n\n", 1)[1].split("\n## ", 1)[0]
    assert "Signals checked and honoured: `robots_txt`, `tdmrep`." in section
    assert "| `tdmrep` | TDMRep" in section and section.count("| 1 |") >= 1
    assert "pixcrawler recheck" in section
    assert "_No opt-out signal was recorded._" in render_card("d", "", {}, "")


def test_header_entries_are_read_once_per_distinct_header_set():
    from multidict import CIMultiDict

    from builder.signals import ResponseSignals

    read = ResponseSignals(DownloadSpec())
    first = read(CIMultiDict({"tdm-reservation": "0", "X-Robots-Tag": "noarchive"}))
    again = read(CIMultiDict({"TDM-Reservation": "0", "x-robots-tag": "noarchive"}))
    assert again is first
    assert [s.verdict for s in first] == [NONE, ALLOW, NONE]
    refused = read(CIMultiDict({"tdm-reservation": "1", "X-Robots-Tag": "noarchive"}))
    assert refused is not first and refused[1].refuses
    assert not ResponseSignals(DownloadSpec(respect_optouts=False, signals={
        "tdmrep": False, "content_usage": False})).active


def test_a_header_set_too_long_to_keep_is_read_each_time():
    """The entries are kept per distinct set of header values: a host sending a hundred 8 KB
    headers, a little different with each image, pinned about 1 GB of them."""
    from multidict import CIMultiDict

    from builder.signals import ResponseSignals

    read = ResponseSignals(DownloadSpec())
    for i in range(5):
        long = CIMultiDict([("X-Robots-Tag", f"noarchive {i} " + "x" * 8000)] * 3)
        assert read(long)[0].value.startswith("noarchive")
    assert read._seen == {}
    read(CIMultiDict({"X-Robots-Tag": "noarchive"}))
    assert len(read._seen) == 1


@pytest.mark.parametrize("values", [["0", "1"], ["1", "0"], ["0, 1"], ["x", "1"]])
def test_a_reservation_among_repeated_tdm_headers_refuses(values):
    """Repeated ``tdm-reservation`` headers (or one a proxy joined with commas): any that
    reserves the rights refuses, whatever its place."""
    from multidict import CIMultiDict

    from builder.signals import ResponseSignals

    headers = CIMultiDict([("tdm-reservation", v) for v in values])
    tdm = [s for s in ResponseSignals(DownloadSpec())(headers) if s.name == "tdmrep"]
    assert [(s.value, s.verdict) for s in tdm] == [("tdm-reservation=1", REFUSE)]


@pytest.mark.parametrize("metas,verdict", [
    (["0", "1"], REFUSE), (["1", "0"], REFUSE), (["0", "0"], ALLOW), (["x"], NONE)])
def test_a_reservation_among_a_pages_tdm_meta_tags_refuses(metas, verdict):
    from builder.signals import parse_page

    html = "".join(f'<meta name="tdm-reservation" content="{m}">' for m in metas)
    facts = parse_page(html.encode(), "http://example.com/page", DownloadSpec())
    assert [s.verdict for s in facts.signals if s.name == "tdmrep"] == [verdict]


def test_a_capital_dotted_i_in_a_script_hides_no_tag_after_it():
    """The end of a script was found in the page lower-cased, at the original's positions:
    'İ' lower-cases to two characters, so each one moved the search a place on, and a
    Turkish page's opt-out tags after its script were skipped (the image taken)."""
    from builder.signals import parse_page

    page = ('<script>var c="' + "\u0130stanbul " * 12 + '";</script>'
            '<meta name="robots" content="noai"><meta name="tdm-reservation" content="1">')
    facts = parse_page(page.encode(), "http://example.com.tr/p", DownloadSpec())
    assert {s.name: s.verdict for s in facts.signals} == {"robots_meta": REFUSE,
                                                          "tdmrep": REFUSE}


@pytest.mark.parametrize("content_type,charset", [
    ('text/html; charset = "windows-1251"', "cp1251"), ("text/html; charset=" + " " * 8000, None),
    ("text/html;charset='koi8-r'", "koi8-r")])
def test_a_declared_charset_is_found_and_a_run_of_spaces_is_not_backtracked(content_type,
                                                                             charset):
    """A Content-Type of ``charset=`` and 8,000 spaces took 0.9 s of the fetching event
    loop (the pattern backtracked quadratically); it is read in one pass."""
    from builder.signals import _HEADER_CHARSET

    found = _HEADER_CHARSET.search(content_type)
    assert (codecs.lookup(found.group(1)).name if found else None) == charset


@pytest.mark.parametrize("html", [
    '<meta name="robots"><meta name="robots" content="noai">',
    '<meta name="robots" content="noai noimageai">',
    '<meta name="robots" content="index, follow"><meta name="robots" content="noai, noimageai">',
    '<meta name="robots" content="noai"><p><![foo[ a malformed marked section',
])
def test_every_robots_meta_tag_of_a_page_counts(html):
    """An empty or an allowing robots tag does not hide a later one that refuses, and a
    malformed ``<![`` section after the tags (html.parser raises AssertionError) does not
    lose them."""
    from builder.signals import parse_page

    facts = parse_page(html.encode(), "http://example.com/page", DownloadSpec())
    robots = [s for s in facts.signals if s.name == "robots_meta"]
    assert [s.verdict for s in robots] == [REFUSE]


class _Reference:
    """What html.parser finds: the meta and img start tags' attributes (the reference)."""

    @staticmethod
    def tags(text: str) -> list[tuple[str, dict[str, str]]]:
        import html.parser

        found: list[tuple[str, dict[str, str]]] = []

        class P(html.parser.HTMLParser):
            def handle_starttag(self, tag, attrs):
                if tag in ("meta", "img"):
                    found.append((tag, {k: v or "" for k, v in attrs}))

        parser = P(convert_charrefs=True)
        parser.feed(text)
        parser.close()
        return found


PAGES = [
    '<html><head><meta name="robots" content="noai"><meta name=tdm-reservation content=1>'
    '</head><body><img src="/a.jpg" alt="A cat"><IMG SRC=\'/b.jpg\' ALT=\'two &amp; more\'>'
    '<img src=/c.jpg alt="x > y" /></body></html>',
    '<!-- <meta name="robots" content="noai"> --><meta content="index" name="robots">',
    '<script>document.write(\'<meta name="robots" content="noai">\')</script>'
    '<style>img[alt="<img src=x alt=y>"]{}</style><img src="/d.png" alt="kept">',
    '<meta\nname="robots"\ncontent="noimageai"\n/><img alt="no src"><img src="/e.jpg">'
    '<img src="/f.jpg" alt>',
    '<p>1 < 2 and <b>bold</b></p><imgx src="/g.jpg" alt="not an img"><meta/name=a content=b>',
]


@pytest.mark.parametrize("page", PAGES)
def test_the_page_scanner_finds_what_an_html_parser_finds(page):
    from builder.signals import _page_tags

    assert list(_page_tags(page)) == _Reference.tags(page)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("junk", ["<a ", "<!--", "</", '<img alt="', "<meta name=robots "])
def test_a_page_of_unclosed_constructs_is_read_in_one_pass(junk):
    """html.parser (CPython before 3.11.13) took about 4 s for 16 KiB of "<a " and grows with
    the square of the page; a page's read must not stall the fetching event loop."""
    from builder.signals import parse_page

    body = (junk * (512 * 1024 // len(junk))).encode()
    facts = parse_page(body + b'<meta name="robots" content="noai">', "http://example.com/p",
                       DownloadSpec())
    assert facts.signals


@pytest.mark.parametrize("body,alt", [
    ('<meta name="robots" content="noai"><img src="/a.jpg" alt="caf\u00e9">'.encode("utf-16"),
     "caf\u00e9"),  # UTF-16 with its byte order mark
    (b'<meta charset="iso-8859-1"><meta name="robots" content="noai">'
     b'<img src="/a.jpg" alt="caf\xe9 \x93quoted\x94">', "caf\u00e9 \u201cquoted\u201d"),
    (b'<meta http-equiv="Content-Type" content="text/html; charset=Shift_JIS">'
     b'<meta name="robots" content="noai"><img src="/a.jpg" alt="\x94\x4c">', "\u732b"),
    (b'<meta name="robots" content="noai"><img src="/a.jpg" alt="caf\xc3\xa9">', "caf\u00e9"),
])
def test_a_page_is_read_in_its_declared_encoding(body, alt):
    """Read as UTF-8 whatever it said, a UTF-16 page's noai tag was missed and a Latin-1
    caption mangled."""
    from builder.signals import parse_page

    facts = parse_page(body, "http://example.com/p", DownloadSpec())
    assert [s.verdict for s in facts.signals if s.name == "robots_meta"] == [REFUSE]
    assert facts.alts == {"http://example.com/a.jpg": alt}


PAGE = '<meta name="robots" content="noai"><img src="/a.jpg" alt="caf\u00e9 \u201cq\u201d">'


@pytest.mark.parametrize("body,content_type", [
    (PAGE.encode("utf-16-le"), "text/html; charset=UTF-16LE"),  # no byte order mark
    (PAGE.encode("utf-16-le"), 'text/html;charset="utf-16"'),
    (PAGE.encode("cp1252"), "text/html; charset=ISO-8859-1"),  # read as windows-1252
    (b'<meta charset="utf-16">' + PAGE.encode("cp1252"), "text/html; charset=latin1"),
    (b'\xef\xbb\xbf' + PAGE.encode(), "text/html; charset=iso-8859-1"),  # the mark wins
    (b'<meta charset="windows-1252">' + PAGE.encode(), "text/html; charset=utf-8"),
    (PAGE.encode(), "text/html; charset=base64"),  # no web encoding: as if none were named
])
def test_a_pages_http_charset_comes_before_its_meta_tag(body, content_type):
    from builder.signals import parse_page

    facts = parse_page(body, "http://example.com/p", DownloadSpec(), content_type)
    assert [s.verdict for s in facts.signals if s.name == "robots_meta"] == [REFUSE]
    assert facts.alts == {"http://example.com/a.jpg": "caf\u00e9 \u201cq\u201d"}


@pytest.mark.parametrize("label", ["base64", "rot13", "hex", "zlib", "uu", "undefined",
                                   "idna", "punycode", "unicode_escape", "utf-7", "nonsense"])
def test_a_charset_no_page_can_mean_is_read_as_utf8(label):
    """Python knows codecs that are not text encodings: a page naming one raised LookupError
    or UnicodeError out of the page check."""
    from builder.signals import parse_page

    for body, content_type in ((f'<meta charset="{label}">{PAGE}'.encode(), ""),
                               (PAGE.encode(), f"text/html; charset={label}")):
        facts = parse_page(body, "http://example.com/p", DownloadSpec(), content_type)
        assert [s.verdict for s in facts.signals if s.name == "robots_meta"] == [REFUSE]
        assert facts.alts == {"http://example.com/a.jpg": "caf\u00e9 \u201cq\u201d"}


def test_an_opt_out_file_that_fails_once_is_asked_again(monkeypatch) -> None:
    """As robots.txt is: one 503 does not make a whole origin's images unreachable."""
    from builder import robots as robots_module

    monkeypatch.setattr(robots_module, "UNREACHABLE_RETRY_S", 0.01)
    for answers, expected in (([(503, b"", ""), (200, b"[]", "application/json")], (200, 2)),
                              ([(404, b"", "")], (404, 1)),
                              ([(0, b"", ""), (429, b"", "")], (429, 2))):
        async def main() -> tuple[tuple[int, bytes], int]:
            async with Fetcher(cfg()) as fetcher:
                async def small(url: URL) -> tuple[int, bytes, str]:
                    return answers.pop(0)

                fetcher._fetch_small = small  # type: ignore[method-assign]
                got = await fetcher._fetch_signal_file(URL("http://h/x.jpg"), "/ai.txt")
                return got, fetcher.stats["signal_fetches"]

        (status, _), fetches = asyncio.run(main())
        assert (status, fetches) == expected


def test_a_page_of_thousands_of_images_keeps_a_bounded_share_of_its_alt_texts():
    """Every <img src alt> was kept, joined to the page's URL: a 512 KB page of 24,000 images
    held 4 MB with a 50-character page URL and 51 MB with a 2,000-character one, and a fetcher
    caches 4,096 pages. The first images' alt texts are kept, up to PAGE_ALT_CHARS."""
    from builder.signals import PAGE_ALT_CHARS, parse_page

    page = "".join(f"<img src=?{i} alt=x>" for i in range(24_000)).encode()
    for page_url in ("http://example.com/p", "http://example.com/" + "p" * 2000):
        alts = parse_page(page, page_url, DownloadSpec()).alts
        size = sum(len(url) + len(alt) for url, alt in alts.items())
        assert 0 < size <= PAGE_ALT_CHARS + len(page_url) + 20
        assert f"{page_url}?0" in alts and f"{page_url}?23999" not in alts
    gallery = "".join(f'<img src="/photos/{i:04d}.jpg" alt="photo number {i} of the gallery">'
                      for i in range(300)).encode()
    assert len(parse_page(gallery, "http://example.com/g", DownloadSpec()).alts) == 300


def _wildcard_robots(rules: int) -> bytes:
    """A robots.txt of ``rules`` wildcard rules that never match a path of 'a's."""
    return ("User-agent: *\n" + ("Allow: /" + "*a" * 6 + "*zz\n") * rules).encode()


def test_an_origin_whose_every_url_costs_just_under_the_cap_is_refused_soon(monkeypatch):
    """The cap was per URL: a hostile robots.txt that kept each image's matching just under
    it (tens of milliseconds with long paths) cost the fetching event loop that much for
    every image of the origin, and the page check matched without any cap. The budget is
    the origin's in all (a base and a little a URL), so such a file is stopped after a few
    URLs, and a page whose robots.txt is too costly is unread, not known."""
    import builder.robots as robots_mod
    from builder.robots import RobotsPolicy
    from builder.signals import OriginSignals
    from yarl import URL

    monkeypatch.setattr(robots_mod, "MATCH_CPU_S", 0.05)
    body = _wildcard_robots(8000)
    origin = OriginSignals(DownloadSpec(), RobotsPolicy.from_response(200, body), None, None)
    for n in range(1, 41):
        entries = origin.ledger(URL(f"http://h/{n}/" + "a" * 1500 + ".jpg"))
        if entries[0].value == "unreachable":
            break
    assert n <= 20, "the origin's URLs were matched on and on"
    assert "not matched again" in entries[0].source and entries[0].verdict == REFUSE

    policy = RobotsPolicy.from_response(200, body)
    for n in range(1, 41):
        if policy.costly:
            break
        assert policy.allowed(URL(f"http://h/{n}/" + "a" * 1500 + ".jpg"))
    assert n <= 20 and not policy.allowed(URL("http://h/a.jpg"))
    # spent by the page checks (which match the policy alone): the origin's images are then
    # refused as not known, not as disallowed (which retry-failed would never ask again)
    spent = OriginSignals(DownloadSpec(), policy, None, None).ledger(URL("http://h/b.jpg"))
    assert (spent[0].name, spent[0].value, spent[0].verdict) == \
        ("robots_txt", "unreachable", REFUSE)
    fine = RobotsPolicy.from_response(200, b"User-agent: *\nDisallow: /x/\n")
    assert all(fine.allowed(URL(f"http://h/{n}.jpg")) for n in range(2000))
    assert not fine.costly


def test_a_long_robots_txt_is_parsed_off_the_event_loop(monkeypatch):
    """512 KiB of wildcard rules took about 0.2 s to parse, which every download of the
    fetching event loop waited: a long file is parsed in another thread (a short one, in
    microseconds, where it is)."""
    import asyncio
    import threading

    from builder.robots import MAX_ROBOTS_BYTES, RobotsPolicy, parsed

    threads: list[int] = []
    parse = RobotsPolicy.from_response.__func__

    def from_response(cls, *args):
        threads.append(threading.get_ident())
        return parse(cls, *args)

    monkeypatch.setattr(RobotsPolicy, "from_response", classmethod(from_response))

    async def main():
        long = await parsed(200, _wildcard_robots(30000)[:MAX_ROBOTS_BYTES])
        short = await parsed(200, _wildcard_robots(10))
        return long, short, threading.get_ident()

    long, short, loop_thread = asyncio.run(main())
    assert long.group == short.group == "*"
    assert threads[0] != loop_thread and threads[1] == loop_thread


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_the_rule_files_thread_works_in_a_forked_child():
    """Worker 0 forks the other workers: a child inherits the parsing pool without its
    thread, and a pool that had parsed before the fork took work and never ran it."""
    import asyncio

    from builder.robots import parsed

    body = _wildcard_robots(3000)  # long enough to be parsed off the loop
    assert asyncio.run(parsed(200, body)).group == "*"  # the parent's pool has its thread
    pid = os.fork()
    if pid == 0:  # the child: exit 0 if it parsed within 10 s
        try:
            policy = asyncio.run(asyncio.wait_for(parsed(200, body), 10))
            os._exit(0 if policy.group == "*" else 1)
        except BaseException:
            os._exit(2)
    deadline = time.monotonic() + 60
    while not (waited := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:  # (a child stuck before its own timeout)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child did not finish")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(waited[1]) == 0


def test_an_origin_whose_rules_cost_too_much_to_match_is_refused_after_one_url(monkeypatch):
    """Each image's URL was matched against every rule on the fetching event loop: a
    robots.txt of 30,000 wildcard rules that never match cost 0.4 s per image with paths of
    8,000 characters. One such match now marks the origin's later URLs refused, not known."""
    import time

    import builder.robots as robots_mod
    from builder.robots import RobotsPolicy
    from builder.signals import OriginSignals
    from yarl import URL

    monkeypatch.setattr(robots_mod, "MATCH_CPU_S", 0.01)
    body = "User-agent: *\n" + "".join(f"Disallow: /*{i:05d}x\nContent-Usage: /*{i:05d}y "
                                       "train-ai=n\n" for i in range(8000))
    cfg = DownloadSpec()
    origin = OriginSignals(cfg, RobotsPolicy.from_response(200, body.encode()), None, None)
    first = origin.ledger(URL("http://h/" + "a" * 8000 + ".jpg"))
    assert all(e.verdict != REFUSE for e in first)  # matched, and nothing matches
    started = time.thread_time()
    later = origin.ledger(URL("http://h/" + "b" * 8000 + ".jpg"))
    assert time.thread_time() - started < 0.005
    assert [e.verdict for e in later] == [REFUSE] * len(first)
    assert later[0].name == "robots_txt" and later[0].value == "unreachable"
    assert "not matched again" in later[0].source
    fine = OriginSignals(cfg, RobotsPolicy.from_response(200, b"User-agent: *\nDisallow: /x/\n"),
                         None, None)
    for _ in range(3):
        assert [e.verdict for e in fine.ledger(URL("http://h/a.jpg"))][0] == ALLOW


def _rules_site(names: list[str], hold_ai: Optional[Callable[[str], Awaitable[None]]] = None
                ) -> tuple[Any, int]:
    """An aiohttp app answering every name with long robots.txt and ai.txt files (ai.txt once
    ``hold_ai(name)`` returns, where given), a long tdmrep.json, a page and a PNG."""
    from aiohttp import web as aioweb

    robots = _wildcard_robots(3000)  # over INLINE_PARSE_BYTES: parsed off the loop
    tdm = ("[" + ",".join(f'{{"location": "/p{i}/*", "tdm-reservation": 1}}'
                          for i in range(1500)) + "]").encode()
    image = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 40)).save(image, "PNG")

    async def handler(request: aioweb.Request) -> aioweb.StreamResponse:
        if request.path == "/ai.txt" and hold_ai is not None:
            await hold_ai(request.host.split(":")[0])
        if request.path in ("/robots.txt", "/ai.txt"):
            return aioweb.Response(body=robots, content_type="text/plain")
        if request.path == "/.well-known/tdmrep.json":
            return aioweb.Response(body=tdm, content_type="application/json")
        if request.path == "/page.html":
            return aioweb.Response(text="<html><img src='/a.png' alt='a cat'></html>",
                                   content_type="text/html")
        return aioweb.Response(body=image.getvalue(), content_type="image/png")

    app = aioweb.Application()
    app.router.add_route("GET", "/{tail:.*}", handler)
    return app, len(robots)


async def _serving(app: Any) -> tuple[Any, int]:
    from aiohttp import web as aioweb

    runner = aioweb.AppRunner(app)
    await runner.setup()
    site = aioweb.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


def test_origins_of_long_rule_files_are_parsed_a_slot_at_a_time_and_kept_within_bytes():
    """The fetcher kept every origin's parsed rules for 24 hours, and every origin loading
    at once held its own: images on many names of one server of long robots.txt, ai.txt and
    tdmrep.json files (the security review's case: 32 MB an origin) filled a worker's
    memory. Through the whole fetch path (the origin's robots.txt load, its signals, its
    page's check) every image is fetched with a gate of one slot, which is used and holds
    one at a time, and the caches keep no more than their bytes."""
    from builder.robots import RobotsCache, RulesGate, cache_weight

    names = [f"h{i}.example" for i in range(6)]
    app, robots_bytes = _rules_site(names)

    async def main() -> tuple[list[Record], int, int, tuple[int, int]]:
        runner, port = await _serving(app)
        try:
            config = cfg(signals={"page_meta": True, "ai_txt": True, "tdmrep": True})
            resolver = HostsResolver({name: "127.0.0.1" for name in names})
            async with Fetcher(config, resolver=resolver) as fetcher:
                gate = fetcher._rules_gate = RulesGate(1)
                fetcher._robots = RobotsCache(fetcher._fetch_robots, gate=gate)
                limit = 2 * cache_weight(robots_bytes)  # two robots.txt files
                fetcher._robots.max_bytes = limit
                fetcher._origins.max_bytes = 1  # the last origin loaded only
                records = [Record(Candidate(url=f"http://{name}:{port}/a.png", label="x",
                                            page_url=f"http://{name}:{port}/page.html"))
                           for name in names]
                done = await asyncio.wait_for(fetcher.fetch_many(records), 60)
                return (done, gate.most_held, fetcher._robots.weight <= limit,
                        (fetcher._robots.evicted, fetcher._origins.evicted))
        finally:
            await runner.cleanup()

    records, most_held, within, evicted = asyncio.run(main())
    assert [r.rejected for r in records] == [False] * len(names), [r.detail for r in records]
    # (a dropped origin its page's check comes back to is read again, and dropped again)
    assert most_held == 1 and within and evicted[0] >= len(names) - 2 and \
        evicted[1] >= len(names) - 1


def test_an_origin_waiting_for_its_files_holds_no_slot_another_origin_needs():
    """A load took its slot at its first long file and kept it while its other files were
    read: a server answering ai.txt slowly held every other origin of long files back for as
    long. The files are read first, and the slot is taken to parse them."""
    from builder.robots import RobotsCache, RulesGate

    slow_asked, quick_done = asyncio.Event(), asyncio.Event()
    held_out: list[bool] = []

    async def hold_ai(name: str) -> None:  # slow's ai.txt answers once quick is done
        if name == "slow.example":
            slow_asked.set()
            try:
                await asyncio.wait_for(quick_done.wait(), 3)  # under cfg()'s timeout_s
            except asyncio.TimeoutError:
                held_out.append(True)

    app, _ = _rules_site(["slow.example", "quick.example"], hold_ai)

    async def main() -> list[str]:
        runner, port = await _serving(app)
        done: list[str] = []
        try:
            resolver = HostsResolver({"slow.example": "127.0.0.1", "quick.example": "127.0.0.1"})
            async with Fetcher(cfg(), resolver=resolver) as fetcher:
                gate = fetcher._rules_gate = RulesGate(1)
                fetcher._robots = RobotsCache(fetcher._fetch_robots, gate=gate)

                async def one(name: str, after: Optional[asyncio.Event]) -> None:
                    if after is not None:
                        await asyncio.wait_for(after.wait(), 10)
                    [record] = await fetcher.fetch_many(
                        [Record(Candidate(url=f"http://{name}:{port}/a.png", label="x"))])
                    assert not record.rejected, record.detail
                    done.append(name)
                    if name == "quick.example":
                        quick_done.set()

                await asyncio.gather(one("slow.example", None), one("quick.example", slow_asked))
        finally:
            await runner.cleanup()
        return done

    assert asyncio.run(main()) == ["quick.example", "slow.example"]
    assert not held_out  # quick was never held back by slow's slot


def test_an_origin_whose_files_could_not_be_kept_refuses_as_not_known_by_each_honoured_file():
    """The answer for an origin whose long rule files were dropped for room too often: each
    file the spec honours refuses, as not known (not as disallowed), robots.txt off or on."""
    url = URL("https://example.org/a.jpg")
    for config, names in ((DownloadSpec(), ["robots_txt", "content_signal", "content_usage",
                                            "tdmrep", "ai_txt"]),
                          (DownloadSpec(respect_robots=False, signals={
                              "content_signal": False, "content_usage": False}),
                           ["tdmrep", "ai_txt"])):
        entries = OriginSignals.unkept(config, "read too often").ledger(url)
        assert [e.name for e in entries] == names
        assert all("read too often" in e.source for e in entries)
        assert {(e.value, e.verdict) for e in entries} == {("unreachable", REFUSE)}
        assert first_refusal(entries) is not None


def test_an_origins_robots_txt_is_read_once_for_its_images_and_for_the_pages_there():
    """An origin's signals read robots.txt themselves, not through the cache its pages'
    checks use: with page_meta, an image whose page is on a host with images of its own had
    that host's robots.txt read twice. The read is shared, and a short file is cached as soon
    as it is read."""
    from aiohttp import web as aioweb

    asked: dict[str, int] = {}
    image = io.BytesIO()
    Image.new("RGB", (64, 48), (20, 120, 240)).save(image, "PNG")

    async def handler(request: aioweb.Request) -> aioweb.StreamResponse:
        host = request.host.split(":")[0]
        if request.path == "/robots.txt":
            asked[host] = asked.get(host, 0) + 1
            # (slow where the pages are: the page check asks while the origin's load reads)
            await asyncio.sleep(1.0 if host == "pages.example" else 0)
            return aioweb.Response(text="User-agent: *\nDisallow: /private/\n")
        if request.path == "/page.html":
            return aioweb.Response(text="<html><img src='/a.png' alt='a cat'></html>",
                                   content_type="text/html")
        if request.path.endswith(".png"):
            return aioweb.Response(body=image.getvalue(), content_type="image/png")
        return aioweb.Response(status=404)

    app = aioweb.Application()
    app.router.add_route("GET", "/{tail:.*}", handler)

    async def main() -> tuple[list[Record], int]:
        runner, port = await _serving(app)
        try:
            resolver = HostsResolver({"img.example": "127.0.0.1", "pages.example": "127.0.0.1"})
            async with Fetcher(cfg(signals={"page_meta": True}), resolver=resolver) as fetcher:
                records = [Record(Candidate(url=f"http://img.example:{port}/a.png", label="x",
                                            page_url=f"http://pages.example:{port}/page.html")),
                           Record(Candidate(url=f"http://pages.example:{port}/b.png",
                                            label="x"))]
                done = await fetcher.fetch_many(records)
                return done, fetcher.stats["robots_fetches"]
        finally:
            await runner.cleanup()

    records, fetches = asyncio.run(main())
    assert [r.rejected for r in records] == [False, False], [r.detail for r in records]
    assert asked == {"img.example": 1, "pages.example": 1} and fetches == 2


def test_a_policy_dropped_too_often_says_so_not_that_its_rules_cost_too_much():
    from builder.robots import DROPPED_TEXT, RobotsPolicy

    [entry] = OriginSignals(DownloadSpec(signals={"content_signal": False,
                                                  "content_usage": False, "tdmrep": False,
                                                  "ai_txt": False}),
                            RobotsPolicy.unkept(), None, None).ledger(URL("https://x.org/a.jpg"))
    assert (entry.name, entry.value, entry.verdict) == ("robots_txt", "unreachable", REFUSE)
    assert DROPPED_TEXT in entry.source and "CPU" not in entry.source
