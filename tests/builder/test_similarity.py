"""Near-duplicate signatures on real photographs, the rule, and the best-copy ranking.

The photos under tests/builder/data/photos are 320x240 tiles of two CC-BY-4.0 photographs by
Aitzol Berasategi (``friends_by_Aitzol_Berasategi.jpg`` and
``picosdeeuropa_by_Aitzol_Berasategi.jpg``, Debian package lomiri-wallpapers-16.04), scaled to
1280 px wide; ``r1c1`` and ``r1c2`` of one photo are neighbouring tiles.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from builder.hashing import MIRROR, STORED_VIEWS, PROBE_VIEWS, hash_bytes
from builder.similarity import (MAX_PROBES, MAX_STORED, Copy, best_copy,
                                jpeg_quality, near_distance, quality_key)
from builder.spec import ValidationSpec

PHOTOS = Path(__file__).parent / "data" / "photos"
ORIGINALS = ["friends-r1c1.jpg", "picos-r1c1.jpg"]
NEIGHBOURS = [("friends-r1c1.jpg", "friends-r1c2.jpg"), ("picos-r1c1.jpg", "picos-r1c2.jpg")]
T = ValidationSpec().near_duplicate_threshold


def _jpeg(img: Image.Image, quality: int = 85) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _crop(img: Image.Image, frac: float) -> Image.Image:
    w, h = img.size
    return img.crop((round(w * frac), round(h * frac), round(w * (1 - frac)),
                     round(h * (1 - frac))))


def _rotate(img: Image.Image, degrees: float) -> Image.Image:
    w, h = img.size
    c, s = np.cos(np.radians(abs(degrees))), np.sin(np.radians(abs(degrees)))
    scale = min(w / (w * c + h * s), h / (w * s + h * c))
    cw, ch = int(w * scale) - 2, int(h * scale) - 2
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return img.rotate(degrees, Image.Resampling.BICUBIC).crop((x0, y0, x0 + cw, y0 + ch))


def _watermark(img: Image.Image) -> Image.Image:
    out = img.copy()
    w, h = out.size
    draw = ImageDraw.Draw(out, "RGBA")
    draw.rectangle((w - 110, h - 28, w - 8, h - 8), fill=(255, 255, 255, 110))
    draw.text((w - 104, h - 25), "(c) stock", fill=(20, 20, 20, 200))
    return out


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


TRANSFORMS = {
    "resize50": lambda im: _jpeg(im.resize((im.width // 2, im.height // 2),
                                           Image.Resampling.LANCZOS)),
    "resize25": lambda im: _jpeg(im.resize((im.width // 4, im.height // 4),
                                           Image.Resampling.LANCZOS)),
    "jpeg_q40": lambda im: _jpeg(im, 40),
    "png": _png,
    "grayscale": lambda im: _jpeg(im.convert("L")),
    "blur": lambda im: _jpeg(im.filter(ImageFilter.GaussianBlur(1.5))),
    "bright+20": lambda im: _jpeg(ImageEnhance.Brightness(im).enhance(1.2)),
    "bright-20": lambda im: _jpeg(ImageEnhance.Brightness(im).enhance(0.8)),
    "watermark": lambda im: _jpeg(_watermark(im)),
    "crop5": lambda im: _jpeg(_crop(im, 0.05)),
    "crop10": lambda im: _jpeg(_crop(im, 0.10)),
    "rotate3": lambda im: _jpeg(_rotate(im, 3.0)),
    "rotate-4": lambda im: _jpeg(_rotate(im, -4.0)),
    "flip": lambda im: _jpeg(ImageOps.mirror(im)),
}


def _distance(newcomer: bytes, kept: bytes) -> int | None:
    n, k = hash_bytes(newcomer), hash_bytes(kept)
    return near_distance(n.probes, k.stored, T)


@pytest.mark.parametrize("name", ORIGINALS)
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_real_photo_copies_are_caught_whichever_arrives_first(name: str, transform: str) -> None:
    original = (PHOTOS / name).read_bytes()
    with Image.open(io.BytesIO(original)) as img:
        copy = TRANSFORMS[transform](img.convert("RGB"))
    assert _distance(copy, original) is not None
    assert _distance(original, copy) is not None


@pytest.mark.parametrize("pair", NEIGHBOURS)
def test_neighbouring_tiles_and_their_copies_are_not_merged(pair: tuple[str, str]) -> None:
    a, b = ((PHOTOS / n).read_bytes() for n in pair)
    with Image.open(io.BytesIO(b)) as img:
        b_copies = [b] + [TRANSFORMS[t](img.convert("RGB")) for t in TRANSFORMS]
    for copy in b_copies:
        assert _distance(copy, a) is None
        assert _distance(a, copy) is None


@pytest.mark.parametrize("name", ORIGINALS + ["friends-r1c2.jpg"])
def test_png_and_jpeg_of_the_same_pixels_hash_within_one_bit(name: str) -> None:
    jpeg = (PHOTOS / name).read_bytes()
    with Image.open(io.BytesIO(jpeg)) as img:
        png = _png(img.convert("RGB"))
    hj, hp = hash_bytes(jpeg), hash_bytes(png)
    for (ja, jb), (pa, pb) in zip(hj.stored + hj.probes, hp.stored + hp.probes):
        assert (ja ^ pa).bit_count() <= 1 and (jb ^ pb).bit_count() <= 1


def test_a_large_jpeg_decoded_at_one_eighth_still_matches_its_png() -> None:
    with Image.open(PHOTOS / "picos-r1c1.jpg") as img:
        big = img.convert("RGB").resize((1280, 960), Image.Resampling.LANCZOS)
    jpeg = _jpeg(big, 92)
    with Image.open(io.BytesIO(jpeg)) as img:
        png = _png(img.convert("RGB"))
    assert near_distance(hash_bytes(png).probes[:1], hash_bytes(jpeg).stored[:1], 2) is not None


def test_signature_counts_fit_the_index_contract() -> None:
    h = hash_bytes((PHOTOS / ORIGINALS[0]).read_bytes())
    assert len(h.stored) == len(STORED_VIEWS) <= MAX_STORED
    assert len(h.probes) == len(PROBE_VIEWS) <= MAX_PROBES
    assert (h.phash, h.dhash) == h.stored[0]
    assert h.stored[STORED_VIEWS.index(MIRROR)] != h.stored[0]


def test_rule_is_the_min_over_pairs_and_needs_both_codes() -> None:
    stored = [(0b1111, 0), (0, 0b1)]
    assert near_distance([(0b0111, 0b1)], stored, 2) == 1
    assert near_distance([(0b0111, 0b11)], stored, 2) == 2
    assert near_distance([(0, 0b1111)], stored, 2) is None  # a within 0, b 3 bits off
    assert near_distance([(0b1111, 0b11)], stored, 0) is None
    assert near_distance([], stored, 32) is None and near_distance([(0, 0)], [], 32) is None


def test_colour_flag_follows_the_pixels() -> None:
    with Image.open(PHOTOS / ORIGINALS[1]) as img:
        colour, grey = _jpeg(img.convert("RGB")), _jpeg(img.convert("L"))
    assert hash_bytes(colour).colour and not hash_bytes(grey).colour


def test_quality_ranking_prefers_pixels_then_colour_then_less_compression() -> None:
    big = Copy("a", 1024, 768, 90_000, "jpeg", True, 85)
    thumb = Copy("b", 256, 192, 20_000, "jpeg", True, 95)
    grey = Copy("c", 1024, 768, 95_000, "jpeg", False, 95)
    worse = Copy("d", 1024, 768, 60_000, "jpeg", True, 40)
    png = Copy("e", 1024, 768, 900_000, "png", True)
    assert best_copy([thumb, grey, worse, big]) == big
    assert best_copy([thumb, grey]) == grey
    assert best_copy([big, png]) == png
    assert [c.image_id for c in sorted([thumb, grey, worse, big, png], key=quality_key)] == \
        ["e", "a", "d", "c", "b"]
    twin = Copy("0", 1024, 768, 90_000, "jpeg", True, 85)
    assert best_copy([big, twin]) == twin  # ties end on the id: the order is total


@pytest.mark.parametrize("quality", [30, 60, 85, 95])
def test_jpeg_quality_estimate(quality: int) -> None:
    with Image.open(PHOTOS / ORIGINALS[0]) as img:
        data = _jpeg(img.convert("RGB"), quality)
    with Image.open(io.BytesIO(data)) as img:
        assert abs(jpeg_quality(img.quantization[0]) - quality) <= 1


def test_palette_png_hashes_like_its_rgb_pixels_and_keeps_its_colour_flag() -> None:
    with Image.open(PHOTOS / ORIGINALS[1]) as img:
        pal = img.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    hp, hr = hash_bytes(_png(pal)), hash_bytes(_png(pal.convert("RGB")))
    assert hp.colour and hr.colour
    assert near_distance(hp.probes[:1], hr.stored[:1], 1) is not None
    assert not hash_bytes(_png(pal.convert("L").convert("P"))).colour
