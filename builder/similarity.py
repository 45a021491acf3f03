"""The near-duplicate rule and the best-copy ranking: pure functions, no index, no I/O.

**Signatures.** A signature is a pair of 64-bit codes ``(a, b)`` (``builder.hashing``: pHash
and dHash of one view of the picture). Each image has at most ``MAX_STORED`` *stored*
signatures (what a kept image offers) and at most ``MAX_PROBES`` *probes* (what a newcomer is
looked up with).

**The rule.** A newcomer is a near duplicate of a kept image iff some probe of the newcomer and
some stored signature of the kept image are within ``t`` bits on ``a`` AND within ``t`` bits on
``b``, and (for ``t`` above 4) agree exactly on one chunk of each code in one of the index's
cuttings (``builder.dedup.KeyScheme``: what keeps the index's lookups flat; up to ``t`` = 4 it
follows from the distance). ``t`` is ``validation.near_duplicate_threshold``.
``near_distance`` is the rule (the oracle an index must agree with); the distance it reports is
the smallest ``max(da, db)``.

**The best copy.** ``quality_key`` orders the images of one duplicate group, best first: more
pixels, then colour over grey, then the less compressed (estimated JPEG quality; lossless
formats count as 100), then more bytes, then the image id (so the order is total and
deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

import numpy as np

from builder.dedup import KeyScheme

if TYPE_CHECKING:
    from builder.records import Record

Signature = tuple[int, int]
MAX_STORED = 4
MAX_PROBES = 8
LOSSLESS = {"png", "gif", "bmp", "tiff"}


@lru_cache(maxsize=None)
def _scheme(t: int) -> KeyScheme:
    return KeyScheme(t)


def near_distance(probes: Sequence[Signature], stored: Sequence[Signature],
                  t: int) -> Optional[int]:
    """The rule: the smallest ``max(ham(a), ham(b))`` over the probe x stored pairs that are
    within ``t`` and share a key, if any."""
    scheme = _scheme(t)
    best: Optional[int] = None
    for pa, pb in probes:
        for sa, sb in stored:
            d = max((pa ^ sa).bit_count(), (pb ^ sb).bit_count())
            if d <= t and (best is None or d < best) and (scheme.exact or scheme.designated(
                    np.array([pa], np.uint64), np.array([pb], np.uint64),
                    np.array([sa], np.uint64), np.array([sb], np.uint64))[0] >= 0):
                best = d
    return best


@dataclass(frozen=True)
class Copy:
    """What the ranking needs to know about one image of a duplicate group."""

    image_id: str
    width: int
    height: int
    nbytes: int
    format: str
    colour: bool
    jpeg_quality: int = 0  # estimated from the quantisation tables; 0 if not a JPEG


def copy_of(record: "Record") -> Copy:
    """A validated record as a ``Copy`` (its size as downloaded, before any resize)."""
    return Copy(record.id, record.orig_width or record.width, record.orig_height or record.height,
                record.downloaded_bytes or len(record.data or b""), record.format, record.colour,
                record.jpeg_quality)


def quality_key(c: Copy) -> tuple:
    """Sort key, best copy first (use with ``sorted`` / ``min``)."""
    quality = 100 if c.format in LOSSLESS else (c.jpeg_quality or 75)
    return (-(c.width * c.height), not c.colour, -quality, -c.nbytes, c.image_id)


def best_copy(copies: Iterable[Copy]) -> Copy:
    """The copy a dataset should keep from one duplicate group."""
    return min(copies, key=quality_key)


_STD_LUMA = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40,
             57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35,
             55, 64, 81, 104, 113, 92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112,
             100, 103, 99)
"""The JPEG standard's luminance table (Annex K), which libjpeg scales by the quality setting."""


def jpeg_quality(luma_table: Sequence[int]) -> int:
    """The libjpeg quality (1-100) whose scaled standard table is nearest ``luma_table``."""
    if len(luma_table) != 64:
        return 0
    ratio = sum(luma_table) / sum(_STD_LUMA) * 100
    q = (200 - ratio) / 2 if ratio <= 100 else 5000 / ratio
    return int(min(100, max(1, round(q))))
