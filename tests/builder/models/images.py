"""Image and record helpers for the model tests."""

from __future__ import annotations

import io
import itertools

import numpy as np
from PIL import Image

from builder.records import Candidate, Record

TINY_IMAGE_SIZE = 32
_serial = itertools.count()


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def plain(color: tuple[int, int, int], size: tuple[int, int] = (96, 80)) -> Image.Image:
    return Image.new("RGB", size, color)


def noise(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def record(data: bytes | None, label: str, url: str = "") -> Record:
    url = url or f"http://127.0.0.1/{label}/{next(_serial)}.jpg"
    return Record(candidate=Candidate(url=url, label=label), data=data)
