"""Fast and medium validation of downloaded images.

fast: the bytes decode completely; format in ``validation.formats``; sides within
``min_side``/``max_side``; aspect ratio at most ``max_aspect_ratio``; ``width*height`` at most
``max_pixels`` (checked from the header, before any pixel is decoded: decompression bombs never
reach the decoder). EXIF orientation is applied to the reported width/height (5-8 swap them).
Animated images (GIF/WebP/PNG with more than one frame): rule ``validation.animated`` —
``first_frame`` (default) validates and hashes the first frame and keeps the file as is;
``reject`` rejects them with ``animated``. A GIF whose block structure ends before its last frame
is complete (a cut-off download of an animation whose first frame decodes) is ``truncated``.

JPEGs are decoded with ``Image.draft`` at a reduced DCT scale: libjpeg still entropy-decodes every
byte of every scan, so truncated and corrupt streams are caught exactly as by a full-size decode,
while the full-resolution inverse DCT (most of the cost) is skipped.

Every level records the sha256 of the bytes (the image id is its first 16 hex digits).
medium: fast + pHash/dHash of the reduced decode (``builder.hashing``).
Dedup against the rest of the job is a separate, stateful stage (``builder.dedup``).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from builder.hashing import perceptual, reduced_gray, to_hex
from builder.reasons import Reason
from builder.records import Record
from builder.spec import ValidationSpec

warnings.simplefilter("ignore", Image.DecompressionBombWarning)

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, EOFError)
"""What Pillow raises on malformed data (TypeError: e.g. a TIFF page without dimensions)."""

PIL_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "gif",
               "BMP": "bmp", "TIFF": "tiff"}
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


@dataclass
class ImageValidator:
    """The fast (and, at ``level`` medium or slow, hashing) validation stage."""

    cfg: ValidationSpec

    @property
    def hashes(self) -> bool:
        return self.cfg.level in ("medium", "slow")

    def __call__(self, records: list[Record]) -> list[Record]:
        for record in records:
            if not record.rejected:
                self.check(record)
        return records

    def check(self, record: Record) -> Record:
        data = record.data
        if not data:
            return record.reject(Reason.DECODE_ERROR, "no bytes")
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            return record.reject(Reason.DECOMPRESSION_BOMB, str(exc))
        except UnidentifiedImageError:
            return record.reject(Reason.DECODE_ERROR, "not a recognised image")
        except _DECODE_ERRORS as exc:
            return record.reject(Reason.DECODE_ERROR, f"{type(exc).__name__}: {exc}")
        with img:
            return self._check_open(record, img, data)

    def _check_open(self, record: Record, img: Image.Image, data: bytes) -> Record:
        cfg = self.cfg
        fmt = PIL_FORMATS.get(img.format or "", (img.format or "unknown").lower())
        if fmt not in cfg.formats:
            return record.reject(Reason.FORMAT_NOT_ALLOWED,
                                 f"{fmt}; allowed: {', '.join(cfg.formats)}")
        w, h = img.size
        if w * h > cfg.max_pixels:
            return record.reject(Reason.DECOMPRESSION_BOMB,
                                 f"{w}x{h} = {w * h} pixels > max_pixels {cfg.max_pixels}")
        try:
            orientation = img.getexif().get(0x0112, 1)
        except (OSError, SyntaxError, ValueError, TypeError):
            orientation = 1
        if orientation in _SWAPPING_ORIENTATIONS:
            w, h = h, w
        try:
            frames = getattr(img, "n_frames", 1)
        except _DECODE_ERRORS as exc:
            return record.reject(Reason.DECODE_ERROR,
                                 f"counting frames: {type(exc).__name__}: {exc}")
        if frames > 1 and cfg.animated == "reject":
            return record.reject(Reason.ANIMATED, f"{frames} frames")
        if fmt == "gif":
            cut = gif_truncation(data)
            if cut:
                return record.reject(Reason.TRUNCATED, cut)
        short, long_ = min(w, h), max(w, h)
        if short < cfg.min_side:
            return record.reject(Reason.TOO_SMALL, f"{w}x{h}, min_side {cfg.min_side}")
        if long_ > cfg.max_side:
            return record.reject(Reason.TOO_LARGE, f"{w}x{h}, max_side {cfg.max_side}")
        if long_ / short > cfg.max_aspect_ratio:
            return record.reject(Reason.BAD_ASPECT_RATIO,
                                 f"{w}x{h} = {long_ / short:.2f} > {cfg.max_aspect_ratio}")
        try:
            gray = reduced_gray(img)
        except Image.DecompressionBombError as exc:
            return record.reject(Reason.DECOMPRESSION_BOMB, str(exc))
        except EOFError as exc:
            return record.reject(Reason.TRUNCATED, f"EOFError: {exc}")
        except _DECODE_ERRORS as exc:
            msg = str(exc)
            reason = Reason.TRUNCATED if "truncat" in msg.lower() else Reason.DECODE_ERROR
            return record.reject(reason, f"{type(exc).__name__}: {msg}")
        record.format = fmt
        record.width, record.height = w, h
        record.orig_width, record.orig_height = w, h
        record.sha256 = hashlib.sha256(data).hexdigest()
        if self.hashes:
            p, d = perceptual(gray)
            record.phash, record.dhash = to_hex(p), to_hex(d)
        return record


def gif_truncation(data: bytes) -> str:
    """Why a GIF's block structure is cut off ('' if it is not), read without decoding pixels.

    Pillow decodes only the frame it is asked for, so a cut-off animation whose first frame is
    whole would otherwise pass. The walk follows the header, colour tables, extensions and image
    blocks up to the trailer (``;``); it stops, without complaint, at the end of the data after a
    complete block (a missing trailer) or at a byte that starts no block (trailing junk).
    """
    n = len(data)
    if n < 13:
        return "GIF header cut off"
    pos = 13
    if data[10] & 0x80:
        pos += 3 << ((data[10] & 7) + 1)
    frames = 0

    def sub_blocks(at: int) -> int:
        """The position after a chain of data sub-blocks starting at ``at``; -1 if cut off."""
        while at < n:
            size = data[at]
            at += 1 + size
            if size == 0:
                return at
        return -1

    while pos < n:
        tag = data[pos]
        if tag == 0x3B:
            return ""
        if tag == 0x21:
            pos = sub_blocks(pos + 2) if pos + 2 <= n else -1
            if pos < 0:
                return f"GIF data ends inside an extension block after {frames} frame(s)"
        elif tag == 0x2C:
            if pos + 10 > n:
                return f"GIF data ends inside the descriptor of frame {frames + 1}"
            flags = data[pos + 9]
            pos += 10 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0) + 1
            pos = sub_blocks(pos) if pos <= n else -1
            if pos < 0:
                return f"GIF data ends inside frame {frames + 1}"
            frames += 1
        else:
            return ""
    return ""
