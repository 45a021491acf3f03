"""Optional resizing and re-encoding of accepted images, as img2dataset users expect.

``orig_width``/``orig_height`` keep the downloaded size. Resizing only ever shrinks. EXIF
orientation is baked in whenever pixels are rewritten; animated images keep their first frame
only when they are rewritten. Pixels in an unusual mode are brought to a plain 8-bit one first
(16/32-bit integer and float grey -> L, scaled rather than clipped; CMYK, YCbCr, LAB... -> RGB;
premultiplied or palette alpha -> RGBA/LA), so every accepted image resizes and encodes. A
rewritten image keeps its source's ICC colour profile where the profile describes its pixels
and is small (``colour_profile``).

Resizing is Pillow's ``thumbnail`` recipe: the image is first reduced by whole factors (a JPEG
in its decoder, at 1/2, 1/4 or 1/8 scale: ``Image.draft``; other formats by ``Image.reduce``,
which averages blocks, except palette and bilevel images, which Pillow resamples by nearest
neighbour) while the last step, with the spec's filter, still shrinks it by at least
``REDUCING_GAP`` (2 for lanczos, bicubic and bilinear, Pillow's default: the result is close to
resampling the full image; 1 for box, whose whole-factor steps are its own averages). A JPEG
several times the target size is then never decoded in full. The output's size is the one the
old full decode gave: worked out on the file's own size, and the picture resampled from the
decoder's exact box (a reduced decode rounds a partial block up to a whole pixel).

Transforming runs after an image is accepted and counted, so it never rejects: if it fails
anyway for one image, that image keeps its original bytes (a warning is logged) and the job goes
on; ``accepted + rejected == candidates`` holds either way.
"""

from __future__ import annotations

import io
import logging
import math
import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

from builder.records import Record
from builder.spec import EncodeSpec, ResizeSpec

log = logging.getLogger(__name__)

_SAVE_FORMATS = {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG", "gif": "GIF"}
_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
            "bilinear": Image.Resampling.BILINEAR, "box": Image.Resampling.BOX}
REDUCING_GAP = {"lanczos": 2.0, "bicubic": 2.0, "bilinear": 2.0, "box": 1.0}
"""How much the last, filtered step of a resize still shrinks an image, at least (Pillow's
``reducing_gap``): what is left above it is taken off by whole factors first."""
MAX_ICC_BYTES = 256 * 1024
"""The largest colour profile a rewritten image keeps (``colour_profile``): a matrix profile
(sRGB, Display P3, Adobe RGB) is 0.5-4 KB, ICC v4's sRGB preference profile 60 KB, a display's
calibrated profile with lookup tables some hundreds of KB at most."""
_PLAIN_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")
"""Modes every resampler and output encoder takes; others are converted (``plain_mode``)."""
_TRANSFORM_ERRORS = (OSError, ValueError, SyntaxError, EOFError, TypeError,
                     Image.DecompressionBombError)
"""What Pillow raises on an image it cannot rewrite; any of these keeps the original bytes."""
_EXIF_REWRITE_ERRORS = (AttributeError, OverflowError, struct.error, KeyError, TypeError,
                        ValueError)
"""What Pillow's ``exif_transpose`` raises when it writes back an EXIF block with a tag stored
in the wrong type (after turning the pixels)."""
_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
          6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_90}
"""EXIF orientation -> the transpose that makes the picture upright (Pillow's own table)."""
_SWAPPING = (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
             Image.Transpose.ROTATE_90)
"""The turns that swap width and height."""


def thumbnail_size(size: tuple[int, int], side: int) -> Optional[tuple[int, int]]:
    """The size Pillow's ``thumbnail((side, side))`` gives a picture of ``size`` (its aspect
    kept, each side rounded the way that keeps it closest, at least 1), or None where it fits
    already."""
    w, h = size
    if w <= side and h <= side:
        return None
    aspect = w / h
    if aspect <= 1:
        return max(min(math.floor(side * aspect), math.ceil(side * aspect),
                       key=lambda n: abs(aspect - n / side)), 1), side
    return side, max(min(math.floor(side / aspect), math.ceil(side / aspect),
                         key=lambda n: 0 if n == 0 else abs(aspect - side / n)), 1)


def exif_turn(img: Image.Image) -> Optional[Image.Transpose]:
    """The transpose ``img``'s EXIF orientation asks for (None: upright). A block Pillow
    cannot read (cut, or a tag of the wrong type) reads as upright: the image was accepted,
    so it must still be rewritten."""
    try:
        return _TURNS.get(img.getexif().get(0x0112, 1))
    except _EXIF_REWRITE_ERRORS:
        return None


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation says (``ImageOps.exif_transpose``). Pillow
    rewrites the EXIF block without the orientation afterwards, and a block with a malformed
    tag makes that fail after the validator accepted the image: then the turned pixels are
    returned without any EXIF (the output is re-encoded anyway)."""
    try:
        return ImageOps.exif_transpose(img)
    except _EXIF_REWRITE_ERRORS:
        turn = exif_turn(img)
        return img.transpose(turn) if turn is not None else img.copy()


def _grey8(img: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float grey image as 8-bit L. 16-bit modes scale 0..65535 to
    0..255; ``I``/``F`` values already in 0..255 are kept, ``F`` in 0..1 is scaled by 255,
    values in 0..65535 are read as 16-bit, and any other range is stretched to 0..255."""
    arr = np.asarray(img).astype(np.float64)
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (lo >= 0 and 255 < hi <= 65535):
        arr = arr * (255.0 / 65535.0)
    elif img.mode == "F" and lo >= 0 and hi <= 1.0:
        arr = arr * 255.0
    elif (lo < 0 or hi > 255) and hi > lo:
        arr = (arr - lo) * (255.0 / (hi - lo))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def plain_mode(img: Image.Image) -> Image.Image:
    """``img`` in one of ``_PLAIN_MODES`` (itself if it already is)."""
    mode = img.mode
    if mode in _PLAIN_MODES:
        return img
    if mode in ("I", "F") or mode.startswith("I;"):
        return _grey8(img)
    if mode == "La":
        return img.convert("LA")
    if mode.endswith(("A", "a")):
        return img.convert("RGBA")
    return img.convert("RGB")


def colour_profile(src: Image.Image, img: Image.Image, fmt: str) -> Optional[bytes]:
    """The ICC profile of ``src`` that the rewritten ``img`` keeps, encoded as ``fmt``: one
    that describes its pixels (an RGB profile for colour pixels, a grey one for grey, which
    WebP stores as colour), of at most ``MAX_ICC_BYTES``; else None. A PNG kept whatever the
    source carried (a CMYK profile on RGB pixels, which no viewer can apply; a megabyte on a
    thumbnail) and JPEG and WebP dropped even an sRGB one (a wide-gamut photo's colours then
    shift)."""
    icc = src.info.get("icc_profile")
    if not isinstance(icc, bytes) or not 20 <= len(icc) <= MAX_ICC_BYTES:
        return None
    space = b"GRAY" if img.mode in ("1", "L", "LA") and fmt != "webp" else b"RGB "
    return icc if icc[16:20] == space else None


def _rgb(img: Image.Image) -> Image.Image:
    """A plain-mode image as RGB (alpha dropped)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("P", "LA", "RGBA"):
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")


WEBDATASET_QUALITY = 95


def rgb_jpeg(data: bytes, fmt: str) -> bytes:
    """The image as an RGB JPEG: ``data`` itself when it is one, else its first frame (EXIF
    orientation applied, alpha dropped) encoded at quality ``WEBDATASET_QUALITY``. An image
    Pillow cannot rewrite keeps its bytes (with a warning): it was accepted and counted."""
    try:
        with Image.open(io.BytesIO(data)) as src:
            if src.format == "JPEG" and src.mode == "RGB":
                return data
            img = _rgb(plain_mode(upright(src)))
            out = io.BytesIO()
            img.save(out, "JPEG", quality=WEBDATASET_QUALITY,
                     icc_profile=colour_profile(src, img, "jpeg"))
    except _TRANSFORM_ERRORS as exc:
        log.warning("cannot encode a %s image as JPEG (%s: %s); keeping its bytes", fmt,
                    type(exc).__name__, exc)
        return data
    return out.getvalue()


@dataclass
class ImageTransformer:
    resize: Optional[ResizeSpec] = None
    encode: Optional[EncodeSpec] = None

    @property
    def active(self) -> bool:
        return self.resize is not None or self.encode is not None

    def __call__(self, records: list[Record]) -> list[Record]:
        if self.active:
            for record in records:
                if not record.rejected and record.data:
                    self.apply(record)
        return records

    def _plan(self, size: tuple[int, int], swapped: bool
              ) -> Optional[tuple[tuple[int, int], tuple[float, float, float, float]]]:
        """For a file of ``size`` pixels (``swapped``: its EXIF turn swaps the sides), the size
        to resample it to and the region of it that shows, both in the file's own orientation;
        None where it is kept as it is. keep_ratio: the whole picture, sized as Pillow's
        ``thumbnail`` sizes the upright picture; center_crop: the centred square, as
        ``ImageOps.fit`` crops it (a centred square stays centred whichever way it turns)."""
        assert self.resize is not None
        side, (w, h) = self.resize.max_side, size
        if self.resize.mode == "center_crop":
            short = min(w, h)
            if w == h <= side:
                return None
            n = min(side, short)
            return (n, n), ((w - short) / 2, (h - short) / 2, (w + short) / 2, (h + short) / 2)
        fitted = thumbnail_size((h, w) if swapped else (w, h), side)
        if fitted is None:
            return None
        return (fitted[::-1] if swapped else fitted), (0.0, 0.0, float(w), float(h))

    def _resized(self, src: Image.Image) -> Image.Image:
        """``src`` (opened, not yet loaded) upright, in a plain mode, and shrunk as the spec
        says (never enlarged).

        The size and the region to show are worked out on the file's pixels; a JPEG is asked
        for its reduced decode (``draft``) that leaves the last, filtered step
        ``REDUCING_GAP`` to shrink; the region is resampled from what was decoded (the
        decoder's box, so a partial block at an edge does not stretch the picture); and the
        small result is turned upright."""
        assert self.resize is not None
        if src.format not in ("JPEG", "MPO"):
            src.load()  # a PNG's EXIF may follow its pixels
        turn = exif_turn(src)
        plan = self._plan(src.size, turn in _SWAPPING)
        if plan is None:
            return plain_mode(upright(src))
        (fw, fh), region = plan
        gap = REDUCING_GAP[self.resize.resample]
        w, h = src.size
        rw, rh = region[2] - region[0], region[3] - region[1]
        drafted = src.draft(None, (math.ceil(w * min(1.0, gap * fw / rw)),
                                   math.ceil(h * min(1.0, gap * fh / rh))))
        scale = w / drafted[1][2] if drafted else 1.0
        img = plain_mode(src).resize((fw, fh), _FILTERS[self.resize.resample],
                                     box=tuple(x / scale for x in region), reducing_gap=gap)
        return img.transpose(turn) if turn is not None else img

    def transform_bytes(self, data: bytes, fmt: str) -> tuple[bytes, str, int, int]:
        """(new bytes, new format, width, height) of one encoded image. Raises what Pillow
        raises (``_TRANSFORM_ERRORS``); ``apply`` and ``apply_row`` never do."""
        with Image.open(io.BytesIO(data)) as src:
            img = self._resized(src) if self.resize is not None else plain_mode(upright(src))
            fmt = self.encode.format if self.encode else fmt
            if fmt not in _SAVE_FORMATS:
                fmt = "png"
            if fmt == "jpeg":
                img = _rgb(img)
            out = io.BytesIO()
            quality = self.encode.quality if self.encode else 95
            img.save(out, _SAVE_FORMATS[fmt], icc_profile=colour_profile(src, img, fmt),
                     **({"quality": quality} if fmt in ("jpeg", "webp") else {}))
        return out.getvalue(), fmt, img.size[0], img.size[1]

    def transform_or_keep(self, data: bytes, fmt: str, width: int, height: int,
                          what: str) -> tuple[bytes, str, int, int]:
        """``transform_bytes``, or the image unchanged (with a warning naming ``what``) if
        Pillow cannot rewrite it: the image is already accepted and counted, so a failure here
        must neither reject it nor stop the job."""
        try:
            return self.transform_bytes(data, fmt)
        except _TRANSFORM_ERRORS as exc:
            log.warning("cannot resize/re-encode %s (%s: %s); keeping the original image",
                        what, type(exc).__name__, exc)
            return data, fmt, width, height

    def apply(self, record: Record) -> Record:
        assert record.data is not None
        record.data, record.format, record.width, record.height = self.transform_or_keep(
            record.data, record.format, record.width, record.height, record.candidate.url)
        return record

    def apply_row(self, row: dict) -> dict:
        """The same on a row (``builder.records.ROW_SCHEMA``)."""
        row["image"], row["format"], row["width"], row["height"] = self.transform_or_keep(
            row["image"], row["format"], row["width"], row["height"],
            row.get("url") or row.get("id") or "an image")
        row["bytes"] = len(row["image"])
        return row
