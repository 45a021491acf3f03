"""Optional resizing and re-encoding of accepted images, as img2dataset users expect.

``orig_width``/``orig_height`` keep the downloaded size. Resizing only ever shrinks. EXIF
orientation is baked in whenever pixels are rewritten; animated images keep their first frame
only when they are rewritten. Pixels in an unusual mode are brought to a plain 8-bit one first
(16/32-bit integer and float grey -> L, scaled rather than clipped; CMYK, YCbCr, LAB... -> RGB;
premultiplied or palette alpha -> RGBA/LA), so every accepted image resizes and encodes.

Resizing is Pillow's ``thumbnail`` recipe: the image is first reduced by whole factors (a JPEG
in its decoder, at 1/2, 1/4 or 1/8 scale: ``Image.draft``; other formats by ``Image.reduce``,
which averages blocks) while the last step, with the spec's filter, still shrinks it by at least
``REDUCING_GAP`` (2 for lanczos, bicubic and bilinear, Pillow's default: the result is close to
resampling the full image; 1 for box, whose whole-factor steps are its own averages). A JPEG
several times the target size is then never decoded in full.

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


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation says (``ImageOps.exif_transpose``). Pillow
    rewrites the EXIF block without the orientation afterwards, and a block with a malformed
    tag makes that fail after the validator accepted the image: then the turned pixels are
    returned without any EXIF (the output is re-encoded anyway)."""
    try:
        return ImageOps.exif_transpose(img)
    except _EXIF_REWRITE_ERRORS:
        turn = _TURNS.get(img.getexif().get(0x0112, 1))
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
            img.save(out, "JPEG", quality=WEBDATASET_QUALITY)
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

    def _draft(self, src: Image.Image) -> None:
        """Ask a JPEG not yet loaded for a reduced decode, as small as leaves the last step
        of the resize ``REDUCING_GAP`` to shrink (a no-op for other formats). The sides are
        the file's, before any EXIF turn: the bound is square, so a turn changes nothing."""
        assert self.resize is not None
        side, (w, h) = self.resize.max_side, src.size
        scale = side / (min(w, h) if self.resize.mode == "center_crop" else max(w, h))
        if scale < 1:
            keep = min(1.0, scale * REDUCING_GAP[self.resize.resample])
            src.draft(None, (math.ceil(w * keep), math.ceil(h * keep)))

    def _resized(self, img: Image.Image) -> Image.Image:
        """``img`` (a decoded image of its own: ``upright`` always returns a new one) shrunk
        as the spec says; never enlarged."""
        assert self.resize is not None
        side = self.resize.max_side
        method = _FILTERS[self.resize.resample]
        if self.resize.mode == "center_crop":
            factor = int(min(img.size) / (side * REDUCING_GAP[self.resize.resample]))
            if factor > 1:
                img = img.reduce(factor)
            return ImageOps.fit(img, (min(side, *img.size),) * 2, method)
        if max(img.size) > side:
            img.thumbnail((side, side), method, reducing_gap=REDUCING_GAP[self.resize.resample])
        return img

    def transform_bytes(self, data: bytes, fmt: str) -> tuple[bytes, str, int, int]:
        """(new bytes, new format, width, height) of one encoded image. Raises what Pillow
        raises (``_TRANSFORM_ERRORS``); ``apply`` and ``apply_row`` never do."""
        with Image.open(io.BytesIO(data)) as src:
            if self.resize is not None:
                self._draft(src)
            img = plain_mode(upright(src))
            if self.resize is not None:
                img = self._resized(img)
            fmt = self.encode.format if self.encode else fmt
            if fmt not in _SAVE_FORMATS:
                fmt = "png"
            if fmt == "jpeg":
                img = _rgb(img)
            out = io.BytesIO()
            quality = self.encode.quality if self.encode else 95
            img.save(out, _SAVE_FORMATS[fmt], **({"quality": quality}
                                                 if fmt in ("jpeg", "webp") else {}))
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
