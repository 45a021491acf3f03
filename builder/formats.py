"""Image formats decided from the bytes (magic numbers), never from a Content-Type header.

Servers mislabel freely (HTML error pages served as ``image/jpeg``, JPEGs served as
``application/octet-stream``), so the fetcher trusts only the first bytes of the body.
``sniff_format`` is a cheap prefix check; full decoding is the validation stage's job.
"""

from __future__ import annotations

from typing import Optional

FORMATS: tuple[str, ...] = ("jpeg", "png", "gif", "webp", "bmp", "tiff")
"""Every name ``sniff_format`` can return (the same names as ``ValidationSpec.formats``)."""

_PNG = b"\x89PNG\r\n\x1a\n"
# Sizes of the BMP DIB header variants (BITMAPCOREHEADER .. BITMAPV5HEADER). Checking it makes
# "BM" (two printable letters) a much less likely false positive on text bodies.
_BMP_DIB_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})


def sniff_format(data: bytes) -> Optional[str]:
    """The image format of ``data`` from its magic number, or None when it is not an image we know.

    Returns one of ``FORMATS``. Only the first 32 bytes are looked at.
    """
    head = bytes(data[:32])
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == _PNG:
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:2] == b"BM" and len(head) >= 18:
        dib_size = int.from_bytes(head[14:18], "little")
        if dib_size in _BMP_DIB_SIZES:
            return "bmp"
    return None
