"""Machine-readable opt-out signals: what each says about an image, as rights-ledger entries.

Three levels, checked in this order by the fetcher (``builder.fetch``):

* **origin** (fetched once per origin and cached, like robots.txt; ``OriginSignals``):
  robots.txt rules (RFC 9309, ``builder.robots``); in robots.txt, Cloudflare Content Signals
  (``Content-Signal: ai-train=no``) and IETF AI Preferences (``Content-Usage: train-ai=n``), each
  optionally for a path (``Content-Usage: /photos/ train-ai=n``; the longest matching path wins);
  TDMRep's ``/.well-known/tdmrep.json`` (an array of ``location`` / ``tdm-reservation`` /
  ``tdm-policy`` rules; the first rule whose location pattern matches applies); ``/ai.txt``
  (robots.txt syntax).
* **response** (``ResponseSignals``): the ``X-Robots-Tag`` header (``noai``, ``noimageai``,
  ``noml``, ``noindex``, ``noimageindex``, ``none``), TDMRep's ``tdm-reservation`` /
  ``tdm-policy`` headers and the ``Content-Usage`` header.
* **embedded** (``embedded_signals``): IPTC ``plus:DataMining`` in the image's XMP.
* **page** (``download.signals.page_meta``, ``page_signals``): TDMRep and robots meta tags on the
  image's page.

Any refusal anywhere refuses the image; an explicit allowance never overrides another source's
refusal. AI Preferences are read for the dataset's usage (``signals.usage``): for ``train-genai``
the first of ``train-genai``, ``train-ai``, ``bots`` that the preference sets decides; for
``train-ai``, the first of ``train-ai``, ``bots``. Content Signals refuse on ``ai-train=no``.

Per image, an origin's ledger costs a few pattern matches: each origin's entries are built once,
and the entries for absent signals are shared constants.
"""

from __future__ import annotations

import codecs
import html
import json
import re
import string
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Iterator, Mapping, Optional

from protego._utils import _quote_path, _quote_pattern
from yarl import URL

from builder.rights import ALLOW, NO_ANSWER, NONE, REFUSE, UNREACHABLE, Signal
from builder.robots import (DROPPED_TEXT, MATCH_CPU_PER_URL_S, MATCH_CPU_S, ROBOTS_UA, MatchCost,
                            RobotsPolicy, answer_text, optout_directive, unreachable)
from builder.spec import DownloadSpec
from builder.urls import MAX_URL_CHARS
from builder.xmp import data_mining, data_mining_verdict

TDMREP_PATH = "/.well-known/tdmrep.json"
AI_TXT_PATH = "/ai.txt"

USAGE_CATEGORIES: dict[str, tuple[str, ...]] = {
    "train-genai": ("train-genai", "train-ai", "bots"),
    "train-ai": ("train-ai", "bots"),
}
"""AI Preferences categories that decide for each dataset usage, most specific first."""

_YES = {"y": "y", "yes": "y", "?1": "y", "1": "y", "true": "y",
        "n": "n", "no": "n", "?0": "n", "0": "n", "false": "n"}


# ---- vocabularies -----------------------------------------------------------------------------


def parse_preferences(text: str) -> dict[str, str]:
    """``key=value`` pairs separated by commas (AI Preferences / Content Signals), keys and
    values lower-cased, yes/no spellings read as ``y`` / ``n``. Later keys win, except that a
    refusal (``n``) is never replaced by an allowance."""
    prefs: dict[str, str] = {}
    for item in text.split(","):
        key, eq, value = item.strip().partition("=")
        key = key.strip().lower()
        if not key or not eq:
            continue
        value = value.split(";", 1)[0].strip().strip('"').strip().lower()
        value = _YES.get(value, value)
        if prefs.get(key) != "n":
            prefs[key] = value
    return prefs


def _merge(into: dict[str, str], b: dict[str, str]) -> None:
    """``b``'s preferences into ``into``, in place (a copy per line was quadratic in a
    file's lines for one path); an ``n`` stays."""
    for key, value in b.items():
        if into.get(key) != "n":
            into[key] = value


def usage_verdict(prefs: Mapping[str, str], usage: str) -> str:
    """``refuse`` / ``allow`` / ``none`` for an AI Preferences dictionary and our usage."""
    for category in USAGE_CATEGORIES[usage]:
        value = prefs.get(category)
        if value == "n":
            return REFUSE
        if value == "y":
            return ALLOW
    return NONE


def content_signal_verdict(prefs: Mapping[str, str]) -> str:
    """Content Signals: ``ai-train=no`` refuses, ``ai-train=yes`` allows."""
    value = prefs.get("ai-train")
    if value == "n":
        return REFUSE
    if value == "y":
        return ALLOW
    return NONE


def split_path(value: str) -> tuple[str, str]:
    """A robots.txt rule value with an optional leading path: ``("/photos/", "train-ai=n")``
    for ``/photos/ train-ai=n``, ``("", "train-ai=n")`` without one."""
    value = value.strip()
    if value.startswith(("/", "*")):
        path, _, rest = value.partition(" ")
        return path, rest.strip()
    return "", value


@lru_cache(maxsize=4096)
def _pieces(pattern: str) -> tuple[tuple[str, ...], bool]:
    """A pattern's literal pieces between its ``*``s, and whether a final ``$`` anchors it."""
    anchored = pattern.endswith("$")
    return tuple((pattern[:-1] if anchored else pattern).split("*")), anchored


def normal_pattern(pattern: str) -> str:
    """A path pattern with its percent-encoding as RFC 9309 2.2.2 compares it (non-ASCII
    encoded, unreserved characters decoded), as protego does for robots.txt's own rules and
    ``OriginSignals.ledger`` for the path: matched as written, ``/fotos/é/`` never matched
    ``/fotos/%C3%A9/a.jpg``, nor ``/%7Ejohn/`` the ``/~john/a.jpg`` yarl spells. Patterns
    that match the same paths are spelled the same, so that one rule holds their merged
    preferences: ``/a/*`` is ``/a/``, and ``*`` and ``/`` are every path (``""``)."""
    pattern = pattern.rstrip("*")  # a rule is a prefix: "/a/*" is "/a/", "*" every path
    return "" if pattern in ("", "/") else _quote_pattern(pattern)


def path_matches(pattern: str, path: str) -> bool:
    """RFC 9309 path matching: ``pattern`` is a prefix of ``path``, with ``*`` for any run of
    characters and a final ``$`` anchoring the end. The empty pattern matches everything.

    Each piece between ``*``s is found at its leftmost place after the one before, which
    leaves the most room for the rest, so the match is linear in the path: a regular
    expression of ``.*``s backtracks, and a site's ``/*a*a*a*a*a*a*a*a*b`` took seconds per
    image on a path of 40 characters, on the fetching event loop."""
    if not pattern:
        return True
    if "*" not in pattern and not pattern.endswith("$"):
        return path.startswith(pattern)
    pieces, anchored = _pieces(pattern)
    if not path.startswith(pieces[0]):
        return False
    if len(pieces) == 1:  # anchored, no wildcard
        return path == pieces[0]
    at = len(pieces[0])
    for piece in pieces[1:-1]:
        found = path.find(piece, at)
        if found < 0:
            return False
        at = found + len(piece)
    last = pieces[-1]
    if anchored:
        return path.endswith(last) and len(path) - len(last) >= at
    return path.find(last, at) >= 0


@dataclass(frozen=True)
class PathRule:
    """A preference for the paths matching ``pattern`` ('' = all), as its ledger entry."""

    pattern: str
    signal: Signal


def path_rules(name: str, values: Iterable[str], source: str, verdict_of: Any
               ) -> list[PathRule]:
    """Rules from robots.txt lines: the lines for one path are merged; each becomes a
    ``PathRule`` whose signal is decided by ``verdict_of(prefs)``."""
    merged: dict[str, dict[str, str]] = {}
    written: dict[str, list[str]] = {}
    shown: dict[str, str] = {}
    for value in values:
        path, text = split_path(value)
        prefs = parse_preferences(text)
        if prefs:  # two spellings of one path are one path (``normal_pattern``)
            pattern = normal_pattern(path)
            shown.setdefault(pattern, path)
            _merge(merged.setdefault(pattern, {}), prefs)
            written.setdefault(pattern, []).append(" ".join(text.split()))
    rules = [PathRule(pattern, Signal(name, ", ".join(written[pattern])[:300],
                                      source + (f" for {shown[pattern]}" if pattern else ""),
                                      verdict_of(prefs)))
             for pattern, prefs in merged.items()]
    rules.sort(key=lambda r: len(r.pattern), reverse=True)  # longest match first
    return rules


def match_rules(rules: list[PathRule], path: str, absent: Signal) -> Signal:
    for rule in rules:
        if path_matches(rule.pattern, path):
            return rule.signal
    return absent


# ---- TDMRep -----------------------------------------------------------------------------------


TDM_RULE_BYTES = 64
"""What a tdmrep.json rule is taken to weigh beside its location's text
(``OriginSignals.size``)."""


@dataclass(frozen=True)
class TdmRule:
    pattern: str
    """The path pattern of the rule's ``location`` ('' or '*': every path)."""
    signal: Signal


def strictest_reservation(values: Iterable[str]) -> Optional[str]:
    """Of repeated ``tdm-reservation`` headers or meta tags (or one a proxy joined with commas),
    the one that reserves (``1``) if any does, else ``0`` if any allows, else the first."""
    found = [part.strip() for value in values for part in str(value).split(",")]
    for text in ("1", "0"):
        if text in found:
            return text
    return found[0] if found else None


def tdm_signal(reservation: Any, policy: Any, source: str) -> Optional[Signal]:
    """The ledger entry of a TDMRep reservation (``1`` refuses, ``0`` allows), or None when
    ``reservation`` is neither."""
    text = str(reservation).strip()
    if text not in ("0", "1"):
        return None
    value = f"tdm-reservation={text}"
    if isinstance(policy, str) and policy.strip():
        value += f", tdm-policy={policy.strip()[:300]}"
    return Signal("tdmrep", value, source, REFUSE if text == "1" else ALLOW)


def parse_tdmrep(status: int, body: bytes) -> tuple[list[TdmRule], Signal]:
    """The rules of a ``tdmrep.json`` answer, and the entry for a path none of them matches
    (it also says why there are no rules: a status, or a file that is not a JSON array)."""
    if unreachable(status):
        return [], Signal("tdmrep", UNREACHABLE if status else NO_ANSWER,
                          f"{TDMREP_PATH} ({answer_text(status)}: unreachable)", REFUSE)
    if not 200 <= status < 300:
        return [], Signal("tdmrep", "", f"{TDMREP_PATH} (HTTP {status})")
    try:
        data = json.loads(body.decode("utf-8-sig", "replace"))  # (a BOM from an editor)
    except (ValueError, RecursionError):
        return [], Signal("tdmrep", "", f"{TDMREP_PATH} (not JSON)")
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        return [], Signal("tdmrep", "", f"{TDMREP_PATH} (not a JSON array)")
    rules = []
    for item in data:
        if not isinstance(item, dict):
            continue
        location = item.get("location")
        location = location.strip() if isinstance(location, str) else ""
        try:
            pattern = _tdm_pattern(location)
        except ValueError:  # an absolute URL that cannot be read names no path: no rule
            continue
        signal = tdm_signal(item.get("tdm-reservation"), item.get("tdm-policy"),
                            f"{TDMREP_PATH} location {location or '*'!r}")
        if signal is not None:
            rules.append(TdmRule(pattern, signal))
    return rules, Signal("tdmrep", "", f"{TDMREP_PATH} (no rule for this path)")


def _tdm_pattern(location: str) -> str:
    """The path pattern of a rule's ``location``: an absolute URL gives its path (raises
    ValueError where it cannot be read), a relative one is taken from the root."""
    if not location or location == "*" or location.startswith(("/", "*")):
        return normal_pattern(location)
    return normal_pattern(URL(location).raw_path if "://" in location else "/" + location)


# ---- origin-level -----------------------------------------------------------------------------


def _robots_source(policy: RobotsPolicy, file: str) -> str:
    if policy.unreachable:
        why = answer_text(policy.status)
        if file != "robots.txt":
            return f"{file} ({why}: unreachable)"
        return f"{file} ({why}: unreachable, so everything disallowed, RFC 9309 2.3.1.4)"
    if policy.disallow_all:
        return f"{file} (HTTP {policy.status}: everything disallowed)"
    if policy.allow_all:  # a 4xx: no answer at all is unreachable, above
        return f"{file} (HTTP {policy.status}: no rules)"
    if not policy.group:
        return f"{file} (no group for us)"
    return f"{file} group {policy.group!r}"


class _RulesFile:
    """Allow/disallow entries of a robots.txt-syntax file (robots.txt, ai.txt) for a path."""

    __slots__ = ("policy", "allow", "refuse", "absent", "costly")

    def __init__(self, name: str, file: str, policy: RobotsPolicy):
        self.policy = policy
        source = _robots_source(policy, file)
        self.allow = Signal(name, "allow", source, ALLOW)
        value = "disallow"
        if policy.unreachable:
            value = UNREACHABLE if policy.status else NO_ANSWER
        self.refuse = Signal(name, value, source, REFUSE)
        self.costly = Signal(name, UNREACHABLE, source[:200] + (
            f" ({DROPPED_TEXT})" if policy.dropped else
            " (its rules cost too much CPU to match: not matched)"), REFUSE)
        """Not known, not a disallow: the policy's own budget is spent (its page checks may
        have spent it)."""
        # A file that sets nothing for us (absent, no group) is recorded as nothing said.
        self.absent: Optional[Signal] = None
        if policy.allow_all or (not policy.group and not policy.disallow_all):
            self.absent = Signal(name, "", source, NONE)

    def entry(self, url: URL) -> Signal:
        if self.absent is not None:
            return self.absent
        if self.policy.costly:
            return self.costly
        return self.allow if self.policy.allowed(url, ROBOTS_UA) else self.refuse




class OriginSignals:
    """Everything known about one origin's opt-outs: its robots.txt, tdmrep.json and ai.txt,
    read once. ``ledger(url)`` gives a URL's origin-level entries."""

    def __init__(self, cfg: DownloadSpec, robots: Optional[RobotsPolicy],
                 tdmrep: Optional[tuple[list[TdmRule], Signal]],
                 ai_txt: Optional[RobotsPolicy]):
        sig = cfg.signals
        self.crawl_delay = robots.crawl_delay if robots is not None and cfg.respect_robots \
            else 0.0
        self._robots = _RulesFile("robots_txt", "robots.txt", robots) \
            if robots is not None and cfg.respect_robots else None
        source = _robots_source(robots, "robots.txt") if robots is not None else "robots.txt"
        ext = robots.extensions if robots is not None else {}
        absent, verdict = "", NONE
        if robots is not None and robots.unreachable:
            # The lines it would carry are not known: they refuse, as an unreachable
            # tdmrep.json does (with respect_robots, robots.txt's own entry refuses first).
            absent, verdict = (UNREACHABLE if robots.status else NO_ANSWER), REFUSE
            source = _robots_source(robots, "robots.txt lines")
        self._signal_rules: Optional[list[PathRule]] = None
        self._usage_rules: Optional[list[PathRule]] = None
        if sig.content_signal and robots is not None:
            self._signal_rules = path_rules("content_signal", ext.get("content-signal", ()),
                                            source, content_signal_verdict)
            self._signal_absent = Signal("content_signal", absent, source, verdict)
        if sig.content_usage and robots is not None:
            usage = sig.usage
            self._usage_rules = path_rules("content_usage", ext.get("content-usage", ()),
                                           source, lambda p: usage_verdict(p, usage))
            self._usage_absent = Signal("content_usage", absent, source, verdict)
        self._tdm = tdmrep
        self._ai = _RulesFile("ai_txt", "ai.txt", ai_txt) if ai_txt is not None else None
        self._too_costly: Optional[tuple[Signal, ...]] = None
        self._cost = MatchCost()
        rules = tdmrep[0] if tdmrep is not None else []
        self.size = sum(p.size for p in (robots, ai_txt) if p is not None) + \
            sum(len(rule.signal.source) + TDM_RULE_BYTES for rule in rules)
        """The bytes of rule files this was built from, as ``builder.robots.cache_weight``
        reads them (a tdmrep.json rule: its location's text and ``TDM_RULE_BYTES``)."""

    @classmethod
    def unkept(cls, cfg: DownloadSpec, why: str) -> "OriginSignals":
        """The signals of an origin whose rule files could not be kept (``why``): each file
        the spec honours refuses every URL as not known."""
        out = cls(cfg, None, None, None)
        names = [name for name, on in (("robots_txt", cfg.respect_robots),
                                       ("content_signal", cfg.signals.content_signal),
                                       ("content_usage", cfg.signals.content_usage),
                                       ("tdmrep", cfg.signals.tdmrep),
                                       ("ai_txt", cfg.signals.ai_txt)) if on]
        out._too_costly = tuple(Signal(name, UNREACHABLE, f"the origin's rule files ({why})",
                                       REFUSE) for name in names)
        return out

    def ledger(self, url: URL) -> tuple[Signal, ...]:
        """The origin-level entries of ``url``. Once matching its URLs (against robots.txt's
        rules, the Content-Usage and Content-Signal lines it carries, tdmrep.json's locations,
        ai.txt's) has cost more than its budget (``builder.robots.MATCH_CPU_S``: a hostile
        robots.txt of 30,000 wildcard rules took 0.4 s an image with 8,000-character paths,
        on the fetching event loop), the origin's later URLs get refusals instead (not known:
        too costly to match)."""
        if self._too_costly is not None:
            return self._too_costly
        started = time.thread_time()
        out = self._ledger(url)
        if self._cost.over(time.thread_time() - started):
            cost = self._cost
            note = (f" (matching its rules took {cost.spent:.2f} s of CPU for {cost.matched} "
                    f"URLs, over {MATCH_CPU_S:g} s and {MATCH_CPU_PER_URL_S * 1000:g} ms a URL: "
                    "not matched again)")
            self._too_costly = tuple(Signal(e.name, UNREACHABLE, e.source[:200] + note, REFUSE)
                                     for e in out)
        return out

    def _ledger(self, url: URL) -> tuple[Signal, ...]:
        by_path = (self._signal_rules, self._usage_rules, self._tdm)
        path = _quote_path(str(url)) if any(r is not None for r in by_path) else ""
        out: list[Signal] = []
        if self._robots is not None:
            out.append(self._robots.entry(url))
        if self._signal_rules is not None:
            out.append(match_rules(self._signal_rules, path, self._signal_absent))
        if self._usage_rules is not None:
            out.append(match_rules(self._usage_rules, path, self._usage_absent))
        if self._tdm is not None:
            rules, absent = self._tdm
            out.append(next((r.signal for r in rules
                             if path_matches(r.pattern, path)), absent))
        if self._ai is not None:
            out.append(self._ai.entry(url))
        return tuple(out)


def needs_robots(cfg: DownloadSpec) -> bool:
    """Whether robots.txt must be read: for its rules, or for the signals it carries."""
    return cfg.respect_robots or cfg.signals.content_signal or cfg.signals.content_usage


def origin_active(cfg: DownloadSpec) -> bool:
    return needs_robots(cfg) or cfg.signals.tdmrep or cfg.signals.ai_txt


# ---- response-level ---------------------------------------------------------------------------


_NO_XRT = Signal("x_robots_tag", "", "header X-Robots-Tag")
_NO_TDM_HEADER = Signal("tdmrep", "", "header tdm-reservation")
_NO_USAGE_HEADER = Signal("content_usage", "", "header Content-Usage")
_NO_XMP = Signal("xmp_datamining", "", "XMP plus:DataMining (embedded)")


def _chars(key: tuple[Any, ...]) -> int:
    """The characters of a ``ResponseSignals`` key's header values."""
    return sum(len(v) for part in key if part
               for v in (part if isinstance(part, tuple) else (part,)))


class ResponseSignals:
    """The entries an image response's headers give (``__call__(headers)``: a multidict with
    ``getall``, as aiohttp's); ``active`` is False when the spec reads no header signal.

    A site sends the same opt-out headers with every image, so the entries are kept per
    distinct set of header values (up to ``CACHE`` sets): most images cost a dict lookup.
    Sets of more than ``CACHE_KEY_CHARS`` characters are read each time, not kept: a host
    sending a hundred 8 KB headers, a little different with each image, pinned about 1 GB."""

    CACHE = 1024
    CACHE_KEY_CHARS = 4096

    def __init__(self, cfg: DownloadSpec):
        self.cfg = cfg
        self.active = cfg.respect_optouts or cfg.signals.tdmrep or cfg.signals.content_usage
        self._seen: dict[tuple[Any, ...], tuple[Signal, ...]] = {}

    def __call__(self, headers: Any) -> tuple[Signal, ...]:
        key = (tuple(headers.getall("X-Robots-Tag", ())),
               strictest_reservation(headers.getall("tdm-reservation", ())),
               headers.get("tdm-policy"), tuple(headers.getall("Content-Usage", ())))
        found = self._seen.get(key)
        if found is None:
            found = self._read(*key)
            if _chars(key) <= self.CACHE_KEY_CHARS:
                if len(self._seen) >= self.CACHE:
                    self._seen.clear()
                self._seen[key] = found
        return found

    def _read(self, tags: tuple[str, ...], reservation: Optional[str], policy: Optional[str],
              usage: tuple[str, ...]) -> tuple[Signal, ...]:
        cfg = self.cfg
        out: list[Signal] = []
        if cfg.respect_optouts:
            if not tags:
                out.append(_NO_XRT)
            else:
                directive = optout_directive(tags, ROBOTS_UA)
                if directive:
                    out.append(Signal("x_robots_tag", directive, "header X-Robots-Tag", REFUSE))
                else:
                    out.append(Signal("x_robots_tag", ", ".join(tags)[:300],
                                      "header X-Robots-Tag"))
        if cfg.signals.tdmrep:
            signal = None
            if reservation is not None:
                signal = tdm_signal(reservation, policy, "header tdm-reservation")
            out.append(signal or _NO_TDM_HEADER)
        if cfg.signals.content_usage:
            if usage:
                prefs = parse_preferences(",".join(usage))
                out.append(Signal("content_usage", ", ".join(usage)[:300],
                                  "header Content-Usage", usage_verdict(prefs, cfg.signals.usage)))
            else:
                out.append(_NO_USAGE_HEADER)
        return tuple(out)


def embedded_signals(data: bytes, fmt: str) -> tuple[Signal, ...]:
    """The entry of the image's own XMP ``plus:DataMining``."""
    value = data_mining(data, fmt)
    if value is None:
        return (_NO_XMP,)
    return (Signal("xmp_datamining", value, "XMP plus:DataMining (embedded)",
                   data_mining_verdict(value)),)


# ---- page-level -------------------------------------------------------------------------------


PAGE_ALT_CHARS = 64_000
"""About the most characters a page's alt texts keep, with their images' URLs: the first
images' are kept. A fetcher caches thousands of pages, and a hostile page of 24,000 images
with long URLs held 4 MB to 190 MB each; a gallery of 300 photos takes about 50,000."""


@dataclass(frozen=True)
class PageFacts:
    """What an image's page says: its meta-tag entries and the alt text of each image. A page
    not read (``unread_page``) says ``why``; ``unknown`` when that leaves its opt-out unknown
    (its entries refuse)."""

    signals: tuple[Signal, ...]
    alts: Mapping[str, str]
    unknown: bool = False
    why: str = ""


_TAG_OPEN = re.compile(r"<(meta|img|script|style)(?=[\s/>])", re.IGNORECASE | re.ASCII)
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
"""HTML's case-insensitivity (ASCII only), which keeps every character where it was."""
_ATTR_NAME = re.compile(r"[^\s/>=]+")
_SPACE_EQ = re.compile(r"\s*=\s*")


_BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))
# Possessive: a run of spaces with no encoding after it backtracked quadratically (8,000
# spaces in a Content-Type stalled the fetching event loop 0.9 s).
_META_CHARSET = re.compile(rb"""<meta[^>]*?charset\s*+=\s*+["']?+\s*+([A-Za-z0-9._:-]+)""",
                           re.IGNORECASE)
_HEADER_CHARSET = re.compile(r"""charset\s*+=\s*+["']?+\s*+([A-Za-z0-9._:-]+)""",
                             re.IGNORECASE)
_WEB_ENCODINGS = {
    # Python's name of each encoding of the WHATWG Encoding Standard -> the decoder browsers use
    **{name: name for name in (
        "utf-8", "utf-16-le", "utf-16-be", "cp866", "koi8-r", "koi8-u", "mac-roman",
        "mac-cyrillic", "cp874", "gbk", "gb18030", "big5", "big5hkscs", "euc_jp", "iso2022_jp",
        "cp932", "cp949", *(f"cp{n}" for n in range(1250, 1259)),
        *(f"iso8859-{n}" for n in (2, 3, 4, 5, 6, 7, 8, 10, 13, 14, 15, 16)))},
    "utf-16": "utf-16-le", "iso8859-1": "cp1252", "ascii": "cp1252", "gb2312": "gbk",
    "shift_jis": "cp932", "euc_kr": "cp949",
}
"""Only these: Python also has codecs no page can mean (``base64``, ``rot13``, ``idna``,
``unicode_escape``), some of which cannot decode text at all."""


def _web_encoding(label: str) -> Optional[str]:
    try:
        return _WEB_ENCODINGS.get(codecs.lookup(label).name)
    except LookupError:
        return None


def page_text(body: bytes, content_type: str = "") -> str:
    """A page's text in its declared encoding, as a browser finds it (HTML's encoding
    sniffing): a byte order mark, else the charset of its HTTP ``Content-Type``, else a
    ``<meta charset>`` or ``http-equiv`` charset in the first 1024 bytes, else UTF-8. Only
    the web's encodings count, as browsers decode them (Latin-1 and ASCII as windows-1252,
    Shift_JIS as windows-31j); a meta tag cannot declare UTF-16 (the page is read as UTF-8).
    Bytes the encoding cannot read become U+FFFD."""
    for bom, encoding in _BOMS:
        if body.startswith(bom):
            return body[len(bom):].decode(encoding, "replace")
    header = _HEADER_CHARSET.search(content_type)
    encoding = _web_encoding(header.group(1)) if header else None
    if encoding is None:
        declared = _META_CHARSET.search(body[:1024])
        encoding = _web_encoding(declared.group(1).decode("ascii")) if declared else None
        if encoding is not None and encoding.startswith("utf-16"):
            encoding = "utf-8"
    return body.decode(encoding or "utf-8", "replace")


def _page_tags(text: str) -> Iterator[tuple[str, dict[str, str]]]:
    """The ``meta`` and ``img`` start tags of a page, with their attributes (names lower-cased,
    values unescaped, the first of a repeated name kept), as an HTML parser finds them: not
    inside comments, scripts or styles.

    One pass, each character read a bounded number of times: ``html.parser`` (CPython before
    3.11.13) rescans to the end of the page for every unclosed ``<a `` or ``<!--``, and a
    page of them stalled the fetching event loop for minutes."""
    lower = text.translate(_ASCII_LOWER)  # same length: str.lower makes 'İ' two characters
    pos, n = 0, len(text)
    while True:
        i = text.find("<", pos)
        if i < 0:
            return
        if text.startswith("<!--", i):
            j = text.find("-->", i + 4)
            if j < 0:
                return  # an unclosed comment runs to the end of the page
            pos = j + 3
            continue
        m = _TAG_OPEN.match(text, i)
        if m is None:
            pos = i + 1
            continue
        tag = m.group(1).lower()
        attrs: dict[str, str] = {}
        p = m.end()
        while p < n:
            while p < n and (text[p].isspace() or text[p] == "/"):
                p += 1
            if p >= n or text[p] == ">":
                break
            name_m = _ATTR_NAME.match(text, p)
            if name_m is None:  # a stray '=': skip it
                p += 1
                continue
            name, p = name_m.group().lower(), name_m.end()
            value = ""
            eq = _SPACE_EQ.match(text, p)
            if eq is not None:
                p = eq.end()
                if p < n and text[p] in "\"'":
                    close = text.find(text[p], p + 1)
                    close = n if close < 0 else close
                    value, p = text[p + 1:close], close + 1
                else:
                    end = p
                    while end < n and not text[end].isspace() and text[end] != ">":
                        end += 1
                    value, p = text[p:end], end
            attrs.setdefault(name, html.unescape(value))
        pos = p + 1
        if tag in ("script", "style"):  # raw text up to its end tag: no tags inside
            j = lower.find(f"</{tag}", pos)
            if j < 0:
                return
            pos = j + 2
        else:
            yield tag, attrs


def parse_page(body: bytes, page_url: str, cfg: DownloadSpec,
               content_type: str = "") -> PageFacts:
    """The TDMRep and robots meta tags of a page (the ``robots`` tag and one for our token),
    and its images' alt texts keyed by absolute URL. ``content_type`` is the HTTP header's
    (its charset counts)."""
    meta: dict[str, list[str]] = {}  # each name's contents in page order, empty ones left out
    found_alts: dict[str, str] = {}
    room = PAGE_ALT_CHARS
    for tag, a in _page_tags(page_text(body, content_type)):
        if tag == "meta" and a.get("name") and a.get("content", "").strip():
            meta.setdefault(a["name"].strip().lower(), []).append(a["content"].strip())
        elif tag == "img" and room > 0 and a.get("src") and a.get("alt", "").strip():
            src, alt = a["src"].strip(), " ".join(a["alt"].split())[:1000]
            if len(src) <= MAX_URL_CHARS and src not in found_alts:
                found_alts[src] = alt
                room -= len(src) + len(alt) + len(page_url)
    where = f"page {page_url[:200]}"
    out: list[Signal] = []
    if cfg.signals.tdmrep:
        signal = None
        if "tdm-reservation" in meta:
            signal = tdm_signal(strictest_reservation(meta["tdm-reservation"]),
                                meta.get("tdm-policy", [None])[0],
                                f"{where} meta tdm-reservation")
        out.append(signal or Signal("tdmrep", "", f"{where} meta tdm-reservation"))
    if cfg.respect_optouts:
        tags = [v for k in ("robots", ROBOTS_UA.lower()) for v in meta.get(k, ())]
        directive = optout_directive(tags, ROBOTS_UA) if tags else None
        out.append(Signal("robots_meta", directive or ", ".join(tags)[:300],
                          f"{where} meta robots", REFUSE if directive else NONE))
    base = URL(page_url)
    alts = {}
    for src, alt in found_alts.items():
        try:
            url = str(base.join(URL(src)))
        except ValueError:
            continue
        if len(url) <= MAX_URL_CHARS:
            alts[url] = alt
    return PageFacts(tuple(out), alts)


def unread_page(page_url: str, cfg: DownloadSpec, why: str, unknown: bool = False
                ) -> PageFacts:
    """The entries of a page that was not read, ``why`` saying why: with ``unknown`` (the page
    could not be reached, or refused us) they refuse, as an unreachable opt-out file's do;
    otherwise (a 4xx, robots.txt forbidding it, an address the guard refuses) they say
    nothing. Without a meta tag to read (``tdmrep`` and ``respect_optouts`` off) there are no
    entries, and nothing is unknown."""
    source = f"page {page_url[:200]} (not read: {why})"
    value, verdict = (UNREACHABLE, REFUSE) if unknown else ("", NONE)
    out: list[Signal] = []
    if cfg.signals.tdmrep:
        out.append(Signal("tdmrep", value, source, verdict))
    if cfg.respect_optouts:
        out.append(Signal("robots_meta", value, source, verdict))
    return PageFacts(tuple(out), {}, unknown=unknown and bool(out), why=why)


__all__ = ["AI_TXT_PATH", "OriginSignals", "PageFacts", "ResponseSignals", "TDMREP_PATH",
           "content_signal_verdict", "embedded_signals", "needs_robots", "origin_active",
           "parse_page", "parse_preferences", "parse_tdmrep", "path_matches", "unread_page",
           "usage_verdict"]
