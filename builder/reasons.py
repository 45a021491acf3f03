"""The one enum of rejection reasons, and the stage each belongs to.

Every candidate a job sees ends accepted or rejected; a rejected one carries a ``Stage`` and a
``Reason`` from here (plus free-text detail). The table in README.md ("Reason codes") is generated
from ``REASON_DOCS`` and must stay in step with it (a test checks).
"""

from __future__ import annotations

from enum import Enum


class Stage(str, Enum):
    """Where in the data path a candidate was rejected."""

    URL = "url"
    FETCH = "fetch"
    VALIDATE = "validate"
    DEDUP = "dedup"
    NSFW = "nsfw"
    SEMANTIC = "semantic"
    SELECT = "select"


class Reason(str, Enum):
    """Why a candidate was rejected. Values are stable: they appear in rejects manifests."""

    # url
    INVALID_URL = "invalid_url"
    UNSUPPORTED_SCHEME = "unsupported_scheme"
    DUPLICATE_URL = "duplicate_url"
    BLOCKED_ADDRESS = "blocked_address"
    # fetch
    HTTP_CLIENT_ERROR = "http_client_error"
    HTTP_SERVER_ERROR = "http_server_error"
    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    TOO_MANY_BYTES = "too_many_bytes"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    ROBOTS_DISALLOWED = "robots_disallowed"
    ROBOTS_UNREACHABLE = "robots_unreachable"
    OPTED_OUT = "opted_out"
    OPTOUT_UNREACHABLE = "optout_unreachable"
    NOT_AN_IMAGE = "not_an_image"
    # validate
    DECODE_ERROR = "decode_error"
    TRUNCATED = "truncated"
    FORMAT_NOT_ALLOWED = "format_not_allowed"
    TOO_SMALL = "too_small"
    TOO_LARGE = "too_large"
    BAD_ASPECT_RATIO = "bad_aspect_ratio"
    DECOMPRESSION_BOMB = "decompression_bomb"
    ANIMATED = "animated"
    VALIDATOR_CRASHED = "validator_crashed"
    # dedup
    EXACT_DUPLICATE = "exact_duplicate"
    NEAR_DUPLICATE = "near_duplicate"
    # nsfw / semantic (the slow level)
    NSFW = "nsfw"
    OFF_TOPIC = "off_topic"
    WRONG_CLASS = "wrong_class"
    # select
    OVER_TARGET = "over_target"
    CANCELLED = "cancelled"


REASON_STAGE: dict[Reason, Stage] = {
    Reason.INVALID_URL: Stage.URL,
    Reason.UNSUPPORTED_SCHEME: Stage.URL,
    Reason.DUPLICATE_URL: Stage.URL,
    Reason.BLOCKED_ADDRESS: Stage.URL,
    Reason.HTTP_CLIENT_ERROR: Stage.FETCH,
    Reason.HTTP_SERVER_ERROR: Stage.FETCH,
    Reason.RATE_LIMITED: Stage.FETCH,
    Reason.TIMEOUT: Stage.FETCH,
    Reason.CONNECTION_ERROR: Stage.FETCH,
    Reason.TOO_MANY_BYTES: Stage.FETCH,
    Reason.TOO_MANY_REDIRECTS: Stage.FETCH,
    Reason.ROBOTS_DISALLOWED: Stage.FETCH,
    Reason.ROBOTS_UNREACHABLE: Stage.FETCH,
    Reason.OPTED_OUT: Stage.FETCH,
    Reason.OPTOUT_UNREACHABLE: Stage.FETCH,
    Reason.NOT_AN_IMAGE: Stage.FETCH,
    Reason.DECODE_ERROR: Stage.VALIDATE,
    Reason.TRUNCATED: Stage.VALIDATE,
    Reason.FORMAT_NOT_ALLOWED: Stage.VALIDATE,
    Reason.TOO_SMALL: Stage.VALIDATE,
    Reason.TOO_LARGE: Stage.VALIDATE,
    Reason.BAD_ASPECT_RATIO: Stage.VALIDATE,
    Reason.DECOMPRESSION_BOMB: Stage.VALIDATE,
    Reason.ANIMATED: Stage.VALIDATE,
    Reason.VALIDATOR_CRASHED: Stage.VALIDATE,
    Reason.EXACT_DUPLICATE: Stage.DEDUP,
    Reason.NEAR_DUPLICATE: Stage.DEDUP,
    Reason.NSFW: Stage.NSFW,
    Reason.OFF_TOPIC: Stage.SEMANTIC,
    Reason.WRONG_CLASS: Stage.SEMANTIC,
    Reason.OVER_TARGET: Stage.SELECT,
    Reason.CANCELLED: Stage.SELECT,
}

REASON_DOCS: dict[Reason, str] = {
    Reason.INVALID_URL: "the URL does not parse, has no host or is over 8,192 characters, or its "
                        "list row holds no URL (a line over 1 MiB, a row the parser refuses)",
    Reason.UNSUPPORTED_SCHEME: "a scheme other than http/https",
    Reason.DUPLICATE_URL: "the same normalised URL was already a candidate in this job",
    Reason.BLOCKED_ADDRESS: "the host resolves to a loopback/private/link-local/reserved address "
    "(SSRF guard; lift with download.allow_private_networks)",
    Reason.HTTP_CLIENT_ERROR: "the server answered 4xx (other than 429)",
    Reason.HTTP_SERVER_ERROR: "the server answered 5xx on every try",
    Reason.RATE_LIMITED: "the server answered 429 on every try",
    Reason.TIMEOUT: "no complete answer within download.timeout_s on every try, or none "
                    "within download.deadline_s for the image",
    Reason.CONNECTION_ERROR: "the connection failed (DNS, refused, reset) on every try, or the "
    "origin's robots.txt gave no usable answer, twice (none, too many redirects, a blocked "
    "address, an encoding it cannot read)",
    Reason.TOO_MANY_BYTES: "the body exceeded download.max_bytes (aborted while streaming)",
    Reason.TOO_MANY_REDIRECTS: "more than download.max_redirects redirects (or a loop)",
    Reason.ROBOTS_DISALLOWED: "robots.txt disallows the path for our user agent",
    Reason.ROBOTS_UNREACHABLE: "robots.txt answered a server error or 429, twice: RFC 9309 says "
    "to assume everything is disallowed; or its rules cost too much CPU to match (retry-failed "
    "asks again)",
    Reason.OPTED_OUT: "a machine-readable opt-out refuses AI training; the detail names the "
    "signal and where it was read: X-Robots-Tag (noai / noimageai / noml / noindex / "
    "noimageindex / none), TDMRep (tdm-reservation: 1 in /.well-known/tdmrep.json, a header "
    "or the page), AI Preferences (Content-Usage: train-ai=n, header or robots.txt), Content "
    "Signals (Content-Signal: ai-train=no in robots.txt), IPTC plus:DataMining prohibited in the "
    "image's XMP, /ai.txt",
    Reason.OPTOUT_UNREACHABLE: "the origin's /.well-known/tdmrep.json or /ai.txt (or, with "
    "page_meta, the image's page) answered a server error or 429, or gave no answer, twice, or "
    "the origin's rules cost too much CPU to match: whether it opts out could not be checked, "
    "so the image is not kept (retry-failed asks again)",
    Reason.NOT_AN_IMAGE: "the bytes are not an image format we recognise (e.g. HTML served "
    "as image/jpeg); decided from magic numbers, not the header",
    Reason.DECODE_ERROR: "the image does not decode",
    Reason.TRUNCATED: "the image data ends early",
    Reason.FORMAT_NOT_ALLOWED: "the format is not in validation.formats",
    Reason.TOO_SMALL: "the shorter side is below validation.min_side",
    Reason.TOO_LARGE: "the longer side is above validation.max_side",
    Reason.BAD_ASPECT_RATIO: "long side / short side is above validation.max_aspect_ratio",
    Reason.DECOMPRESSION_BOMB: "width*height exceeds validation.max_pixels, or a JPEG holds "
                               "more than 100 scans (each decodes the whole image again) or "
                               "more than 2,000 marker segments",
    Reason.ANIMATED: "an animated image while validation.animated is 'reject'",
    Reason.VALIDATOR_CRASHED: "the process validating the image died on it (e.g. out of memory, "
    "a decoder crash), with the image alone in a process of its own (its worker was lost while "
    "its unit ran, so the unit ran again isolated)",
    Reason.EXACT_DUPLICATE: "the same bytes (sha256) as an image kept earlier in the job",
    Reason.NEAR_DUPLICATE: "a view (whole, centre crops, mirror, small turns) within "
    "validation.near_duplicate_threshold bits on pHash and dHash of a view of an image kept "
    "before it (within one unit of work, the best copy goes first)",
    Reason.NSFW: "NSFW probability at or above validation.nsfw_threshold",
    Reason.OFF_TOPIC: "CLIP similarity to the class prompts below validation.clip_threshold",
    Reason.WRONG_CLASS: "CLIP zero-shot puts the image in another class of the job",
    Reason.OVER_TARGET: "valid, but its class had reached its target when it arrived",
    Reason.CANCELLED: "the job was cancelled before this candidate was decided",
}

TRANSIENT_REASONS: frozenset[Reason] = frozenset(
    {Reason.HTTP_SERVER_ERROR, Reason.RATE_LIMITED, Reason.TIMEOUT, Reason.CONNECTION_ERROR,
     Reason.ROBOTS_UNREACHABLE, Reason.OPTOUT_UNREACHABLE}
)


def decided_again(retry: bool) -> frozenset[str]:
    """The reasons of a published dataset's rejects that a run continuing it decides again:
    ``cancelled`` (a cancel left them undecided) always, and with ``retry`` (retry-failed)
    the transient ones too."""
    again = {Reason.CANCELLED, *(TRANSIENT_REASONS if retry else ())}
    return frozenset(r.value for r in again)


def stage_of(reason: Reason) -> Stage:
    """The stage a reason belongs to."""
    return REASON_STAGE[reason]


def reasons_markdown() -> str:
    """The reason-code table as Markdown, for README.md and dataset cards."""
    lines = ["| stage | reason | meaning |", "|---|---|---|"]
    for reason in Reason:
        lines.append(f"| {REASON_STAGE[reason].value} | `{reason.value}` | {REASON_DOCS[reason]} |")
    return "\n".join(lines)
