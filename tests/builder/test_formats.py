"""Format sniffing from magic numbers, checked against files Pillow writes."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from builder.formats import FORMATS, sniff_format

PIL_NAMES = {"jpeg": "JPEG", "png": "PNG", "gif": "GIF", "webp": "WEBP", "bmp": "BMP",
             "tiff": "TIFF"}


def _encode(fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (10, 200, 90)).save(buf, PIL_NAMES[fmt], **params)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", FORMATS)
def test_pillow_encoded_images_are_recognised(fmt: str) -> None:
    assert sniff_format(_encode(fmt)) == fmt


def test_big_endian_tiff_and_bigtiff() -> None:
    assert sniff_format(b"MM\x00*\x00\x00\x00\x08" + b"\0" * 16) == "tiff"
    assert sniff_format(b"II+\x00\x08\x00\x00\x00" + b"\0" * 16) == "tiff"


def test_gif87a() -> None:
    assert sniff_format(b"GIF87a" + b"\0" * 20) == "gif"


@pytest.mark.parametrize("data", [
    b"",
    b"\xff\xd8",
    b"<!DOCTYPE html><html><body>404</body></html>",
    b"<html><head><title>image.jpg</title></head></html>",
    b"<?xml version='1.0'?><svg xmlns='http://www.w3.org/2000/svg'/>",
    b'{"error": "not found"}',
    b"BMW is a car maker, not a bitmap header",
    b"RIFF\x24\x00\x00\x00WAVEfmt ",
    b"%PDF-1.7\n",
    b"\x1f\x8b\x08\x00\x00\x00\x00\x00",
    b"\x89PNG\r\n",
    b"GIF88a" + b"\0" * 10,
])
def test_non_images_are_none(data: bytes) -> None:
    assert sniff_format(data) is None


def test_only_the_prefix_matters() -> None:
    jpeg = _encode("jpeg")
    assert sniff_format(jpeg[:3]) == "jpeg"
    assert sniff_format(memoryview(jpeg)) == "jpeg"
    assert sniff_format(b"junk" + jpeg) is None
