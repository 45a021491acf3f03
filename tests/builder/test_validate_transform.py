import io

import pytest
from PIL import Image

from builder.records import Candidate, Record
from builder.spec import EncodeSpec, ResizeSpec, ValidationSpec
from builder.transform import ImageTransformer
from builder.validate import ImageValidator
from tests.images import encode, jpeg, picture


def rec(data: bytes) -> Record:
    return Record(Candidate("http://x/a", "cat"), data=data)


def check(data: bytes, **cfg) -> Record:
    return ImageValidator(ValidationSpec(**cfg)).check(rec(data))


def test_good_jpeg_gets_facts_and_hashes():
    r = check(jpeg(1, (320, 240)))
    assert not r.rejected and (r.width, r.height, r.format) == (320, 240, "jpeg")
    assert len(r.sha256) == 64 and len(r.phash) == 16 and len(r.dhash) == 16


def test_fast_level_skips_hashes():
    r = check(jpeg(1), level="fast")
    assert not r.rejected and r.phash == "" and len(r.sha256) == 64


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF", "BMP"])
def test_formats(fmt):
    r = check(encode(picture(2), fmt))
    if fmt == "BMP":
        assert r.reason == "format_not_allowed"
    else:
        assert not r.rejected, r.detail


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.9])
def test_truncated_jpeg_rejected(cut):
    data = jpeg(3, (400, 300))
    r = check(data[: int(len(data) * cut)])
    assert r.reason == "truncated", r.detail


def test_truncated_png_rejected():
    data = encode(picture(3), "PNG")
    r = check(data[: len(data) // 2])
    assert r.reason in ("truncated", "decode_error")
    assert r.rejected and r.stage == "validate"


def test_garbage_and_empty():
    assert check(b"\xff\xd8\xff" + b"\x00garbage" * 50).reason == "decode_error"
    assert check(b"<html>hi</html>").reason == "decode_error"
    assert check(b"").reason == "decode_error"


def test_sides_aspect_and_bomb():
    assert check(jpeg(4, (40, 40))).reason == "too_small"
    assert check(jpeg(4, (1000, 100))).reason == "bad_aspect_ratio"
    assert check(jpeg(4, (600, 400)), max_side=500).reason == "too_large"
    assert check(jpeg(4, (600, 400)), max_pixels=100_000).reason == "decompression_bomb"


def test_exif_orientation_swaps_reported_sides():
    img = picture(5, (400, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    r = check(encode(img, "JPEG", exif=exif.tobytes()))
    assert (r.width, r.height) == (200, 400)


def test_animated_rule():
    frames = [picture(i, (200, 200)).convert("P") for i in range(3)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert not check(out.getvalue()).rejected
    assert check(out.getvalue(), animated="reject").reason == "animated"


def test_rejection_drops_bytes():
    r = check(jpeg(4, (40, 40)))
    assert r.data is None and r.stage == "validate"


def test_transform_resize_keep_ratio_and_encode():
    r = check(jpeg(6, (800, 400)))
    ImageTransformer(ResizeSpec(max_side=200), EncodeSpec(format="webp", quality=80))([r])
    assert (r.width, r.height, r.format) == (200, 100, "webp")
    assert (r.orig_width, r.orig_height) == (800, 400)
    assert Image.open(io.BytesIO(r.data)).format == "WEBP"


def test_transform_center_crop_and_no_upscale():
    r = check(jpeg(6, (800, 400)))
    ImageTransformer(ResizeSpec(max_side=256, mode="center_crop"))([r])
    assert (r.width, r.height) == (256, 256) and r.format == "jpeg"
    small = check(jpeg(6, (150, 120)))
    ImageTransformer(ResizeSpec(max_side=256))([small])
    assert (small.width, small.height) == (150, 120)


def test_transform_inactive_keeps_bytes():
    data = jpeg(6)
    r = check(data)
    ImageTransformer()([r])
    assert r.data == data
