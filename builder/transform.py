"""Optional resizing and re-encoding of accepted images, as img2dataset users expect.

``orig_width``/``orig_height`` keep the downloaded size. Resizing only ever shrinks. EXIF
orientation is baked in whenever pixels are rewritten; animated images keep their first frame
only when they are rewritten.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

from PIL import Image, ImageOps

from builder.records import Record
from builder.spec import EncodeSpec, ResizeSpec

_SAVE_FORMATS = {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG", "gif": "GIF"}


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

    def _resized(self, img: Image.Image) -> Image.Image:
        assert self.resize is not None
        side = self.resize.max_side
        if self.resize.mode == "center_crop":
            if min(img.size) > side:
                return ImageOps.fit(img, (side, side), Image.Resampling.LANCZOS)
            short = min(img.size)
            return ImageOps.fit(img, (short, short), Image.Resampling.LANCZOS)
        if max(img.size) > side:
            img = img.copy()
            img.thumbnail((side, side), Image.Resampling.LANCZOS)
        return img

    def transform_bytes(self, data: bytes, fmt: str) -> tuple[bytes, str, int, int]:
        """(new bytes, new format, width, height) of one encoded image."""
        with Image.open(io.BytesIO(data)) as src:
            img = ImageOps.exif_transpose(src)
            if self.resize is not None:
                img = self._resized(img)
            fmt = self.encode.format if self.encode else fmt
            if fmt not in _SAVE_FORMATS:
                fmt = "png"
            if fmt == "jpeg" and img.mode != "RGB":
                img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "LA", "RGBA") \
                    else img.convert("RGB")
            out = io.BytesIO()
            quality = self.encode.quality if self.encode else 95
            img.save(out, _SAVE_FORMATS[fmt], **({"quality": quality}
                                                 if fmt in ("jpeg", "webp") else {}))
        return out.getvalue(), fmt, img.size[0], img.size[1]

    def apply(self, record: Record) -> Record:
        assert record.data is not None
        record.data, record.format, record.width, record.height = self.transform_bytes(
            record.data, record.format)
        return record

    def apply_row(self, row: dict) -> dict:
        """The same on an output row (``builder.records.ACCEPTED_SCHEMA``)."""
        row["image"], row["format"], row["width"], row["height"] = self.transform_bytes(
            row["image"], row["format"])
        row["bytes"] = len(row["image"])
        return row
