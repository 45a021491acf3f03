"""Small image makers for tests (no network, deterministic)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def picture(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A distinct, natural-ish picture: smooth gradients plus a few random blocks."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([
        (np.sin(x / (10 + rng.random() * 40) + rng.random() * 6) * 127 + 128),
        (np.cos(y / (10 + rng.random() * 40) + rng.random() * 6) * 127 + 128),
        ((x + y) * rng.random() % 255),
    ], axis=-1)
    for _ in range(6):
        x0, y0 = rng.integers(0, w - 10), rng.integers(0, h - 10)
        base[y0:y0 + h // 4, x0:x0 + w // 4] = rng.integers(0, 255, 3)
    return Image.fromarray(base.astype("uint8"))


def encode(img: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    out = io.BytesIO()
    if fmt == "JPEG" and img.mode != "RGB":
        img = img.convert("RGB")
    img.save(out, fmt, **kwargs)
    return out.getvalue()


def jpeg(seed: int, size: tuple[int, int] = (320, 240), quality: int = 85) -> bytes:
    return encode(picture(seed, size), "JPEG", quality=quality)
