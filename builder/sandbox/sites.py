"""The sandbox web's opt-out sites: more origins (one port each) with their own robots.txt,
/.well-known/tdmrep.json and /ai.txt, plus the image answers whose headers, XMP or page carry an
opt-out, so every signal ``builder.signals`` reads has a route.

``SIGNAL_CASES`` lists one URL per case: which site (``main``: the sandbox's own origin) and path
serve it, the outcome the pipeline must give it (``accepted`` or a reason) and the ledger entry
that must say why (signal name and verdict). ``SandboxWeb.signal_urls()`` gives their absolute
URLs. A ``Site`` is mutable while serving (``SandboxWeb.site(name)``), so a test can make an
origin opt out after a dataset was built.

The ``wikimedia`` site answers like upload.wikimedia.org: originals under
``/wikipedia/commons/``, thumbnails under ``/wikipedia/commons/thumb/.../<width>px-<name>`` at the
standard widths only (400 otherwise), each answer after ``delay_s``, and it records the most
requests it had in flight (point ``upload.wikimedia.org`` at 127.0.0.1 to test the profile).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Optional

from builder.profiles import WIKIMEDIA_THUMB_WIDTHS
from builder.reasons import Reason

ACCEPTED = "accepted"
TDM_POLICY = "https://sandbox.invalid/tdm-policy.json"


@dataclass
class Site:
    """One origin of the sandbox: its per-origin files (None: 404) and per-path answers.

    ``down`` names per-origin files (``/robots.txt``, ``/.well-known/tdmrep.json``, ``/ai.txt``)
    and other paths that answer 503, as on a server that is failing. ``headers`` and ``xmp`` map a path prefix
    to the headers an image under it is served with, and to the ``plus:DataMining`` value
    embedded in its XMP. ``pages`` maps a page path to the HTML it serves (in UTF-8, or the
    charset ``page_charsets`` names for it, which its ``Content-Type`` then names too),
    ``redirects`` a path to the URL it redirects to (302), ``statuses`` a path to the error
    status it answers.
    """

    name: str
    robots_txt: Optional[str] = None
    tdmrep_json: Optional[str] = None
    ai_txt: Optional[str] = None
    down: tuple[str, ...] = ()
    headers: dict[str, dict[str, str]] = field(default_factory=dict)
    xmp: dict[str, str] = field(default_factory=dict)
    pages: dict[str, str] = field(default_factory=dict)
    page_charsets: dict[str, str] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    delay_s: float = 0.0
    thumb_widths: tuple[int, ...] = ()
    in_flight: int = 0
    max_in_flight: int = 0
    paths: list[str] = field(default_factory=list)

    def headers_for(self, path: str) -> dict[str, str]:
        return next((h for prefix, h in self.headers.items() if path.startswith(prefix)), {})

    def xmp_for(self, path: str) -> Optional[str]:
        return next((v for prefix, v in self.xmp.items() if path.startswith(prefix)), None)


@dataclass(frozen=True)
class SignalCase:
    site: str
    path: str
    outcome: str
    signal: str
    verdict: str
    page: str = ""
    """The page path a search hit would give for it ('' for none)."""


def default_sites() -> dict[str, Site]:
    """The sites every sandbox serves (``main`` is the sandbox's own origin: header, XMP and
    page cases live there, with the main robots.txt)."""
    return {s.name: s for s in [
        Site("main",
             headers={"/sig/tdm-header/": {"tdm-reservation": "1", "tdm-policy": TDM_POLICY},
                      "/sig/content-usage/": {"Content-Usage": "train-ai=n"},
                      "/sig/noml/": {"X-Robots-Tag": "noml"}},
             xmp={"/sig/xmp-prohibited/": "DMI-PROHIBITED-AIMLTRAINING",
                  "/sig/xmp-allowed/": "DMI-ALLOWED"},
             pages={"/sig/page/reserved": page_html("/sig/page-meta/a.jpg",
                                                    "a reserved picture", reserved=True),
                    "/sig/page/open": page_html("/sig/page-open/a.jpg", "a cat on a sofa"),
                    "/sig/page/reserved-utf16": page_html("/sig/page-meta-utf16/a.jpg",
                                                          "a reserved picture", reserved=True)},
             page_charsets={"/sig/page/reserved-utf16": "utf-16-le"},  # no byte order mark
             down=("/sig/page/down",)),
        Site("rfc9309-wildcard", robots_txt="User-agent: *\nDisallow: /*.jpg$\n"),
        Site("rfc9309-longest", robots_txt="User-agent: *\nDisallow: /\nAllow: /public\n"),
        Site("rfc9309-wordpress", robots_txt="User-agent: *\nDisallow: /wp-admin/\n"
                                             "Allow: /wp-admin/admin-ajax.php\n"),
        Site("tdmrep", tdmrep_json=json.dumps([
            {"location": "/reserved/*", "tdm-reservation": 1, "tdm-policy": TDM_POLICY},
            {"location": "/", "tdm-reservation": 0}])),
        Site("content-signal", robots_txt="User-Agent: *\nContent-Signal: search=yes, "
                                          "ai-train=no\nAllow: /\n"),
        Site("content-usage", robots_txt="User-Agent: *\nAllow: /\nContent-Usage: train-ai=n\n"
                                         "Content-Usage: /free/ train-ai=y\n"),
        Site("ai-txt", ai_txt="# Spawning AI\nUser-Agent: *\nDisallow: *.jpg\n"),
        Site("tdmrep-down", robots_txt="User-agent: *\nAllow: /\n",
             down=("/.well-known/tdmrep.json",)),
        Site("ai-txt-down", robots_txt="User-agent: *\nAllow: /\n", down=("/ai.txt",)),
        Site("mutable"),
        Site("wikimedia", delay_s=0.05, thumb_widths=WIKIMEDIA_THUMB_WIDTHS),
    ]}


def page_html(image_path: str, alt: str, reserved: bool = False) -> str:
    meta = ('<meta name="tdm-reservation" content="1">'
            f'<meta name="tdm-policy" content="{TDM_POLICY}">') if reserved else ""
    return (f"<!DOCTYPE html><html><head><title>A sandbox page</title>{meta}</head><body>"
            f'<img src="{image_path}" alt="{alt}"></body></html>\n')


OPTED_OUT = Reason.OPTED_OUT.value
ROBOTS = Reason.ROBOTS_DISALLOWED.value

SIGNAL_CASES: dict[str, SignalCase] = {
    # robots.txt: the three answers RFC 9309 settles (urllib.robotparser got them wrong)
    "robots_wildcard_end": SignalCase("rfc9309-wildcard", "/a/b.jpg", ROBOTS, "robots_txt",
                                      "refuse"),
    "robots_wildcard_query": SignalCase("rfc9309-wildcard", "/a/b.jpg?size=2", ACCEPTED,
                                        "robots_txt", "allow"),
    "robots_longest_match": SignalCase("rfc9309-longest", "/public/x.jpg", ACCEPTED,
                                       "robots_txt", "allow"),
    "robots_longest_disallow": SignalCase("rfc9309-longest", "/other/x.jpg", ROBOTS,
                                          "robots_txt", "refuse"),
    "robots_wordpress_exception": SignalCase("rfc9309-wordpress", "/wp-admin/admin-ajax.php",
                                             ACCEPTED, "robots_txt", "allow"),
    # origin-level opt-out files
    "tdmrep_reserved": SignalCase("tdmrep", "/reserved/x.jpg", OPTED_OUT, "tdmrep", "refuse"),
    "tdmrep_open": SignalCase("tdmrep", "/open/x.jpg", ACCEPTED, "tdmrep", "allow"),
    "content_signal": SignalCase("content-signal", "/x.jpg", OPTED_OUT, "content_signal",
                                 "refuse"),
    "content_usage_robots": SignalCase("content-usage", "/x.jpg", OPTED_OUT, "content_usage",
                                       "refuse"),
    "content_usage_robots_path": SignalCase("content-usage", "/free/x.jpg", ACCEPTED,
                                            "content_usage", "allow"),
    "ai_txt": SignalCase("ai-txt", "/x.jpg", OPTED_OUT, "ai_txt", "refuse"),
    # an opt-out file that cannot be read: whether it opts out is not known
    "tdmrep_unreachable": SignalCase("tdmrep-down", "/x.jpg", Reason.OPTOUT_UNREACHABLE.value,
                                     "tdmrep", "refuse"),
    "ai_txt_unreachable": SignalCase("ai-txt-down", "/x.jpg", Reason.OPTOUT_UNREACHABLE.value,
                                     "ai_txt", "refuse"),
    # the image response's headers
    "tdm_header": SignalCase("main", "/sig/tdm-header/a.jpg", OPTED_OUT, "tdmrep", "refuse"),
    "content_usage_header": SignalCase("main", "/sig/content-usage/a.jpg", OPTED_OUT,
                                       "content_usage", "refuse"),
    "x_robots_tag_noml": SignalCase("main", "/sig/noml/a.jpg", OPTED_OUT, "x_robots_tag",
                                    "refuse"),
    # the image's own XMP
    "xmp_prohibited": SignalCase("main", "/sig/xmp-prohibited/a.jpg", OPTED_OUT,
                                 "xmp_datamining", "refuse"),
    "xmp_allowed": SignalCase("main", "/sig/xmp-allowed/a.jpg", ACCEPTED, "xmp_datamining",
                              "allow"),
}
"""Case name -> where it is served, what must become of it, and the ledger entry saying why."""

PAGE_CASES: dict[str, SignalCase] = {
    "page_tdm_meta": SignalCase("main", "/sig/page-meta/a.jpg", OPTED_OUT, "tdmrep", "refuse",
                                page="/sig/page/reserved"),
    "page_open": SignalCase("main", "/sig/page-open/a.jpg", ACCEPTED, "tdmrep", "none",
                            page="/sig/page/open"),
    "page_tdm_meta_in_header_charset": SignalCase("main", "/sig/page-meta-utf16/a.jpg",
                                                  OPTED_OUT, "tdmrep", "refuse",
                                                  page="/sig/page/reserved-utf16"),
    # a page that cannot be read: whether its meta tags opt out is not known
    "page_unreachable": SignalCase("main", "/sig/page-down/a.jpg",
                                   Reason.OPTOUT_UNREACHABLE.value, "tdmrep", "refuse",
                                   page="/sig/page/down"),
}
"""Cases read only with ``download.signals.page_meta`` (the page is fetched)."""

_THUMB = re.compile(r"^/wikipedia/commons/thumb/.+/(?:[a-z0-9]+-)*?(\d+)px-[^/]+$")


def thumb_width(path: str) -> Optional[int]:
    """The width a Wikimedia thumbnail path asks for, or None when it is not a thumbnail."""
    m = _THUMB.match(path)
    return int(m.group(1)) if m else None


__all__ = ["PAGE_CASES", "SIGNAL_CASES", "Site", "SignalCase", "default_sites", "thumb_width"]
