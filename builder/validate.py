"""Fast and medium validation of downloaded images.

fast: the bytes decode completely; format in ``validation.formats``; sides within
``min_side``/``max_side``; aspect ratio at most ``max_aspect_ratio``; ``width*height`` at most
``max_pixels`` (checked from the header, before any pixel is decoded: decompression bombs never
reach the decoder). EXIF orientation is applied to the reported width/height (5-8 swap them).
Animated images (GIF/WebP/PNG with more than one frame): rule ``validation.animated`` —
``first_frame`` (default) validates and hashes the first frame and keeps the file as is;
``reject`` rejects them with ``animated``. A GIF whose block structure ends before its last frame
is complete (a cut-off download of an animation whose first frame decodes) is ``truncated``. A
PNG whose chunks fail their CRC, whose image data does not inflate to the size its header
promises, or whose animation chunks do not add up is a ``decode_error`` (``png_damage``).

The pixels are decoded before anything else is read from the file: a decode error is never
taken for a missing EXIF block (reading a PNG's EXIF can run the decoder, whose error would
otherwise be swallowed and the half-decoded image accepted).

JPEGs are decoded with ``Image.draft`` at a reduced DCT scale: libjpeg still entropy-decodes every
byte of every scan, so truncated and corrupt streams are caught exactly as by a full-size decode,
while the full-resolution inverse DCT (most of the cost) is skipped.

Every level records the sha256 of the bytes (the image id is its first 16 hex digits).
medium: fast + the near-duplicate signatures of the reduced decode (``builder.hashing``), the
colour flag and the estimated JPEG quality (for ranking copies, ``builder.similarity``).
Dedup against the rest of the job is a separate, stateful stage (``builder.dedup``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from builder.hashing import luma_grid, prepare, signatures_many, to_hex
from builder.reasons import Reason
from builder.records import Record
from builder.similarity import jpeg_quality
from builder.spec import ValidationSpec
from builder.urls import without_secrets

log = logging.getLogger(__name__)

warnings.simplefilter("ignore", Image.DecompressionBombWarning)

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, EOFError, IndexError, KeyError,
                  struct.error)
"""What Pillow raises on malformed data (TypeError: e.g. a TIFF page without dimensions;
IndexError and struct.error: a GIF cut off inside a later frame's header)."""
_PILLOW_BOMB_SIZE = re.compile(r"Image size \((\d+) pixels\)")
_EXIF_ERRORS = (SyntaxError, ValueError, TypeError, KeyError, struct.error, UnicodeDecodeError)
"""What reading a malformed EXIF block raises once the pixels are decoded (no OSError: that
would be the decoder's, and the image is loaded before EXIF is read)."""

MAX_JPEG_SCANS = 100
"""The most scans a JPEG may hold. libjpeg runs every scan over the whole image, at a reduced
DCT scale too, so a file of tiny repeated scans costs pixels times scans of CPU: 2,000 scans of
33 bytes over 4096x4096 pixels took 2.5 s, and the default ``max_bytes`` holds 600,000 of them.
Encoders write one scan (baseline) to about a dozen (progressive)."""
MAX_JPEG_SEGMENTS = 2000
"""The most marker segments a JPEG may hold up to its end marker. Pillow parses each one before
the first scan when it opens the file: a 20 MB file of a million empty ICC-profile segments
cost 2.8 s of CPU to open and load, 14 times a photo of its size. Encoders write tens (a
progressive file with its tables, a large ICC profile or XMP packet split in 64 KB
segments)."""
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
"""A JPEG marker as libjpeg reads one (``jpeg_markers``)."""
PIL_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "gif",
               "BMP": "bmp", "TIFF": "tiff"}
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
ANIMATED_FORMATS = frozenset({"gif", "webp", "png"})
"""The formats whose extra frames are an animation (``validation.animated``)."""


@dataclass
class ImageValidator:
    """The fast (and, at ``level`` medium or slow, hashing) validation stage."""

    cfg: ValidationSpec

    def __post_init__(self) -> None:
        # Pillow refuses to open more than twice MAX_IMAGE_PIXELS (about 179M pixels), which
        # made a max_pixels above that refuse images it allows. The header is read before
        # any pixel, and max_pixels is checked then: Pillow's limit only needs to be no lower.
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, -(-self.cfg.max_pixels // 2))

    @property
    def hashes(self) -> bool:
        return self.cfg.level in ("medium", "slow")

    def __call__(self, records: list[Record]) -> list[Record]:
        """Check each record not yet rejected; at ``level`` medium or slow the perceptual
        signatures of the batch's good images are then worked out together (cheaper per
        image than one at a time)."""
        grids: list[tuple[Record, np.ndarray]] = []
        for record in records:
            if not record.rejected:
                try:
                    grid = self._inspect(record)
                except Exception as exc:  # the last guard: a decoder's surprise is this image's
                    log.warning("unexpected %s validating %s: %s", type(exc).__name__,
                                without_secrets(record.candidate.url), exc, exc_info=True)
                    record.reject(Reason.DECODE_ERROR, f"unexpected {type(exc).__name__}: {exc}")
                    continue
                if grid is not None:
                    grids.append((record, grid))
        if grids:
            for (record, _), (stored, probes) in zip(
                    grids, signatures_many([grid for _, grid in grids])):
                record.phash, record.dhash = to_hex(stored[0][0]), to_hex(stored[0][1])
                record.near_stored, record.near_probes = stored, probes
        return records

    def check(self, record: Record) -> Record:
        """One record: a batch of one."""
        self([record])
        return record

    def _inspect(self, record: Record) -> Optional[np.ndarray]:
        """Reject the record or fill in what its decode tells; the luma grid its signatures
        come from when the level hashes, else None."""
        data = record.data
        if not data:
            record.reject(Reason.DECODE_ERROR, "no bytes")
            return None
        # (Pillow's JPEG plugin opens only what starts so, parsing the segments before the
        # first scan as it opens)
        markers = jpeg_markers(data) if data.startswith(b"\xff\xd8\xff") else JpegMarkers(0, 0)
        if markers.segments > MAX_JPEG_SEGMENTS:
            record.reject(Reason.DECOMPRESSION_BOMB, f"more than {MAX_JPEG_SEGMENTS} JPEG "
                          "marker segments: each one is parsed on its own")
            return None
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            record.reject(Reason.DECOMPRESSION_BOMB, self._bomb_detail(exc))
            return None
        except UnidentifiedImageError:
            record.reject(Reason.DECODE_ERROR, "not a recognised image")
            return None
        except _DECODE_ERRORS as exc:
            record.reject(Reason.DECODE_ERROR, f"{type(exc).__name__}: {exc}")
            return None
        with img:
            return self._check_open(record, img, data, markers.scans)

    def _bomb_detail(self, exc: Image.DecompressionBombError) -> str:
        """Pillow's refusal in the spec's terms: it names its own limit (twice
        ``Image.MAX_IMAGE_PIXELS``), the job's limit is ``max_pixels``."""
        found = _PILLOW_BOMB_SIZE.search(str(exc))
        size = f"{found[1]} pixels" if found else "more pixels than Pillow opens"
        return f"{size} > max_pixels {self.cfg.max_pixels}"

    def _check_open(self, record: Record, img: Image.Image, data: bytes, scans: int
                    ) -> Optional[np.ndarray]:
        cfg = self.cfg
        fmt = PIL_FORMATS.get(img.format or "", (img.format or "unknown").lower())
        if fmt not in cfg.formats:
            return self._reject(record, Reason.FORMAT_NOT_ALLOWED,
                                f"{fmt}; allowed: {', '.join(cfg.formats)}")
        w, h = img_size = img.size
        if w * h > cfg.max_pixels:
            return self._reject(record, Reason.DECOMPRESSION_BOMB,
                                f"{w}x{h} = {w * h} pixels > max_pixels {cfg.max_pixels}")
        # before counting frames, which reads every frame's header: a cut-off one is truncation
        cut = gif_truncation(data) if fmt == "gif" else png_damage(data) if fmt == "png" else ""
        if fmt == "jpeg" and scans > MAX_JPEG_SCANS:
            return self._reject(record, Reason.DECOMPRESSION_BOMB,
                                f"{scans} scans > {MAX_JPEG_SCANS}: each one decodes the whole "
                                "image again")
        if cut:
            return self._reject(record, Reason.TRUNCATED if "ends" in cut
                                else Reason.DECODE_ERROR, cut)
        try:
            frames = getattr(img, "n_frames", 1)
        except _DECODE_ERRORS as exc:
            return self._reject(record, Reason.DECODE_ERROR,
                                f"counting frames: {type(exc).__name__}: {exc}")
        # An MPO (a camera's JPEG with a preview image inside) and a multi-page TIFF have
        # frames too, but are stills: their first image is the photo.
        if frames > 1 and cfg.animated == "reject" and fmt in ANIMATED_FORMATS:
            return self._reject(record, Reason.ANIMATED, f"{frames} frames")
        try:
            if frames > 1:
                img.seek(0)
            prepare(img)
            img.load()
        except Image.DecompressionBombError as exc:
            return self._reject(record, Reason.DECOMPRESSION_BOMB, self._bomb_detail(exc))
        except EOFError as exc:
            return self._reject(record, Reason.TRUNCATED, f"EOFError: {exc}")
        except _DECODE_ERRORS as exc:
            msg = str(exc)
            reason = Reason.TRUNCATED if "truncat" in msg.lower() else Reason.DECODE_ERROR
            return self._reject(record, reason, f"{type(exc).__name__}: {msg}")
        try:
            orientation = img.getexif().get(0x0112, 1)
        except _EXIF_ERRORS:
            orientation = 1  # the pixels decoded; only the EXIF block is malformed
        if orientation in _SWAPPING_ORIENTATIONS:
            w, h = h, w
        short, long_ = min(w, h), max(w, h)
        if short < cfg.min_side:
            return self._reject(record, Reason.TOO_SMALL, f"{w}x{h}, min_side {cfg.min_side}")
        if long_ > cfg.max_side:
            return self._reject(record, Reason.TOO_LARGE, f"{w}x{h}, max_side {cfg.max_side}")
        if long_ / short > cfg.max_aspect_ratio:
            return self._reject(record, Reason.BAD_ASPECT_RATIO,
                                f"{w}x{h} = {long_ / short:.2f} > {cfg.max_aspect_ratio}")
        record.format = fmt
        record.width, record.height = w, h
        record.orig_width, record.orig_height = w, h
        record.sha256 = hashlib.sha256(data).hexdigest()
        if not self.hashes:
            return None
        grid, record.colour = luma_grid(img, img_size)
        tables = getattr(img, "quantization", None) or {}
        record.jpeg_quality = jpeg_quality(tables.get(0, ())) if fmt == "jpeg" else 0
        return grid

    @staticmethod
    def _reject(record: Record, reason: Reason, detail: str) -> None:
        """Reject the record; None, the grid of a rejected image."""
        record.reject(reason, detail)


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))
"""Adam7 passes: (x0, y0, dx, dy)."""


def _png_raw_size(ihdr: bytes) -> int:
    """Bytes of filtered scanlines the IDAT stream must inflate to (0 if IHDR is unusable)."""
    if len(ihdr) < 13:
        return 0
    w, h = int.from_bytes(ihdr[0:4], "big"), int.from_bytes(ihdr[4:8], "big")
    depth, ctype, interlace = ihdr[8], ihdr[9], ihdr[12]
    bits = depth * _PNG_CHANNELS.get(ctype, 0)
    if not bits:
        return 0

    def rows(width: int, height: int) -> int:
        return height * (1 + (width * bits + 7) // 8) if width and height else 0

    if not interlace:
        return rows(w, h)
    return sum(rows((w - x0 + dx - 1) // dx, (h - y0 + dy - 1) // dy)
               for x0, y0, dx, dy in _ADAM7)


class JpegMarkers(NamedTuple):
    scans: int
    segments: int


def jpeg_markers(data: bytes) -> JpegMarkers:
    """How many scans (SOS markers) and marker segments the image of a JPEG holds, to its end
    marker; the walk stops once the segments pass ``MAX_JPEG_SEGMENTS``. Markers are found as
    libjpeg finds them: an 0xFF byte followed by anything but 0x00 (a stuffed byte of
    entropy-coded data), a restart marker or another 0xFF (a fill byte); any other byte
    between markers is passed over, and a marker segment is skipped by its length. So what
    follows the image (a phone's motion-photo video) and the data inside segments count for
    nothing, and a stray byte in the header hides no scan."""
    pos, end, scans, segments = 2, len(data), 0, 0
    while segments <= MAX_JPEG_SEGMENTS and \
            (found := _JPEG_MARKER.search(data, pos)) is not None:
        pos = found.start()
        marker = data[pos + 1]
        if marker == 0xD9:
            break
        segments += 1
        if marker in (0xD8, 0x01):  # markers without a length
            pos += 2
            continue
        scans += marker == 0xDA
        if pos + 4 > end:
            break
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return JpegMarkers(scans, segments)


def png_damage(data: bytes) -> str:
    """What is wrong with a PNG's chunks ('' if nothing), found without decoding pixels.

    Pillow accepts a PNG whose image data is damaged mid-stream when the inflater stops early:
    the rows after the damage come back black, and no CRC is checked. So every chunk's CRC is
    checked here, and the IDAT stream is inflated (streamed, counting bytes, never held) to the
    exact size the header promises. Animated PNGs: Pillow trusts ``acTL`` for the frame count
    and decodes only the frame asked for, so each frame's data must follow its control chunk
    (``fcTL``) and the control chunks must add up to the declared count.

    The size the data must inflate to comes from the one IHDR, which opens the file (Pillow
    reads it there): a second IHDR of a colour type that gives no size turned the cap off, and
    a 20 MB file was inflated to its end (about 45 s of CPU) and accepted.
    """
    n, pos = len(data), 8
    declared = controls = 0
    expect_frame_data = False
    inflater = zlib.decompressobj()
    inflated, expected, idat_done, seen_idat = 0, 0, False, False
    while pos + 8 <= n:
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > n:
            return f"PNG data ends inside a {kind.decode('latin-1')} chunk"
        body = data[pos + 8:pos + 8 + length]
        if zlib.crc32(data[pos + 4:pos + 8 + length]) != int.from_bytes(data[end - 4:end], "big"):
            return f"PNG {kind.decode('latin-1')} chunk at byte {pos} fails its CRC"
        if kind == b"IHDR":
            if pos != 8:
                return f"PNG has an IHDR chunk at byte {pos}: only the first chunk may be one"
            expected = _png_raw_size(body)
        elif kind == b"acTL" and length >= 4:
            declared = int.from_bytes(body[:4], "big")
        elif kind == b"fcTL":
            controls += 1
            expect_frame_data = True
        elif kind == b"fdAT":
            if not expect_frame_data:
                return f"APNG frame data without a frame control chunk after {controls} frame(s)"
            expect_frame_data = False
        elif kind == b"IDAT":
            if idat_done:
                return "PNG image data split by another chunk"
            if not expected:
                return "PNG image data without a header that gives its size"
            seen_idat = True
            expect_frame_data = False
            try:
                while body:
                    inflated += len(inflater.decompress(body, 1 << 20))
                    body = inflater.unconsumed_tail
                    if expected and inflated > expected:  # a zip bomb: stop inflating it
                        return (f"PNG image data damaged: it inflates past the {expected} "
                                "bytes its header promises")
            except zlib.error as exc:
                return f"PNG image data damaged: {exc}"
        elif kind == b"IEND":
            break
        if seen_idat and kind != b"IDAT":
            idat_done = True
        pos = end
    if seen_idat and expected and (inflated != expected or not inflater.eof):
        return f"PNG image data damaged: it inflates to {inflated} of {expected} bytes"
    if declared and controls != declared:
        return f"APNG declares {declared} frames but has {controls} frame control chunks"
    return ""


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
