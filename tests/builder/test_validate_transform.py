import io
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from builder.records import Candidate, Record
from builder.spec import EncodeSpec, ResizeSpec, ValidationSpec
from builder.sandbox.corpus import BOMB_SIDE, bomb_png
from builder.transform import MAX_ICC_BYTES, ImageTransformer, rgb_jpeg
from builder.validate import (MAX_JPEG_SCANS, MAX_JPEG_SEGMENTS, ImageValidator,
                              gif_truncation, jpeg_markers)
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


def test_a_batch_gets_the_facts_and_signatures_each_image_gets_alone():
    """The validator works out a batch's signatures together; rejected images in the middle
    of the batch must not shift anyone's signatures onto a neighbour."""
    datas = [jpeg(1, (320, 240)), b"not an image", encode(picture(2), "PNG"),
             jpeg(3, (20, 20)), jpeg(4, (640, 480))]
    batch = ImageValidator(ValidationSpec())([rec(d) for d in datas])
    alone = [check(d) for d in datas]
    assert [r.rejected for r in batch] == [False, True, False, True, False]
    fields = ("reason", "sha256", "phash", "dhash", "near_stored", "near_probes", "colour")
    for got, want in zip(batch, alone):
        assert [getattr(got, f) for f in fields] == [getattr(want, f) for f in fields]
    assert len({r.near_probes for r in batch if not r.rejected}) == 3


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


def test_a_bomb_pillow_refuses_is_reported_against_max_pixels():
    """Pillow refuses to open past twice its own limit; the detail quotes the spec's."""
    r = check(bomb_png(BOMB_SIDE, BOMB_SIDE))
    assert r.reason == "decompression_bomb"
    assert r.detail == f"{BOMB_SIDE * BOMB_SIDE} pixels > max_pixels 89478485"
    assert str(2 * Image.MAX_IMAGE_PIXELS) not in r.detail


def test_a_max_pixels_above_pillows_own_limit_is_the_limit():
    """Pillow refuses to open past twice its own limit (about 179M pixels), so a spec that
    raised max_pixels to 300M had a 200M-pixel image rejected as "200000000 pixels >
    max_pixels 300000000"."""
    data = bomb_png(20_000, 10_000)  # 200M pixels declared, one row of data
    r = check(data, max_pixels=300_000_000, min_side=1, max_side=50_000, max_aspect_ratio=10)
    assert r.reason == "decode_error" and "inflates" in r.detail, r.detail  # opened, checked
    r = check(data, max_pixels=100_000_000)
    assert r.reason == "decompression_bomb"
    assert r.detail.endswith("200000000 pixels > max_pixels 100000000")


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("RGBA", "PNG"),
                                       ("P", "GIF"), ("RGB", "WEBP"), ("L", "PNG")])
def test_rgb_jpeg_gives_every_image_as_an_rgb_jpeg(mode, fmt):
    buf = io.BytesIO()
    picture(4, (90, 60)).convert(mode).save(buf, fmt)
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).mode == mode
    out = rgb_jpeg(data, fmt.lower())
    img = Image.open(io.BytesIO(out))
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (90, 60))
    assert (out == data) == (mode == "RGB" and fmt == "JPEG")


def _profile(space: bytes, size: int = 588) -> bytes:
    """Bytes with an ICC header's colour space field (what ``colour_profile`` reads)."""
    return bytes(16) + space + bytes(size - 20)


@pytest.mark.parametrize("encode", [None, "jpeg", "webp"])
def test_a_rewritten_image_keeps_a_colour_profile_only_where_it_describes_its_pixels(encode):
    """A PNG kept whatever profile its source carried: a CMYK one on RGB pixels, which no
    viewer can apply, or a megabyte on a thumbnail; JPEG and WebP dropped even an sRGB one,
    shifting a wide-gamut photo's colours."""
    def rewritten(mode: str, src_fmt: str, icc: bytes) -> bytes:
        buf = io.BytesIO()
        picture(4, (90, 60)).convert(mode).save(buf, src_fmt, icc_profile=icc)
        out, fmt, _, _ = ImageTransformer(
            ResizeSpec(max_side=32), EncodeSpec(format=encode) if encode else None
        ).transform_bytes(buf.getvalue(), src_fmt.lower())
        assert fmt == (encode or src_fmt.lower())
        return Image.open(io.BytesIO(out)).info.get("icc_profile") or b""

    rgb, grey = _profile(b"RGB "), _profile(b"GRAY")
    assert rewritten("RGB", "PNG", rgb) == rgb
    assert rewritten("CMYK", "JPEG", _profile(b"CMYK")) == b""
    assert rewritten("RGB", "PNG", _profile(b"RGB ", MAX_ICC_BYTES + 1)) == b""
    assert rewritten("L", "PNG", grey) == (grey if encode is None else b"")  # stored as RGB
    kept = Image.open(io.BytesIO(rgb_jpeg(_encoded_with(rgb), "png")))
    assert kept.format == "JPEG" and kept.info["icc_profile"] == rgb


def _encoded_with(icc: bytes) -> bytes:
    buf = io.BytesIO()
    picture(4, (90, 60)).convert("RGBA").save(buf, "PNG", icc_profile=icc)
    return buf.getvalue()


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


def test_a_cameras_mpo_jpeg_is_a_still_not_an_animation():
    """Phones and cameras write JPEGs with a second image inside (MPO), which Pillow counts
    as two frames: with animated: reject every such photo was rejected as animated."""
    photo, preview = picture(1, (320, 240)), picture(2, (160, 120))
    out = io.BytesIO()
    photo.save(out, "MPO", save_all=True, append_images=[preview])
    assert Image.open(io.BytesIO(out.getvalue())).n_frames == 2
    r = check(out.getvalue(), animated="reject")
    assert not r.rejected, r.detail
    assert (r.format, r.width, r.height) == ("jpeg", 320, 240)


def test_a_jpeg_of_many_scans_is_rejected_before_it_is_decoded(monkeypatch):
    """libjpeg runs every scan over the whole image, at a reduced scale too: a progressive
    JPEG whose last scan is repeated thousands of times cost minutes of CPU to validate, and
    was accepted. Encoders' files (one scan, or about ten progressive) pass."""
    out = io.BytesIO()
    picture(3, (640, 480)).save(out, "JPEG", progressive=True, quality=90)
    progressive = out.getvalue()
    assert jpeg_markers(jpeg(1)).scans == 1 and 5 < jpeg_markers(progressive).scans <= 20
    assert not check(progressive).rejected
    last = progressive.rindex(b"\xff\xda")
    bomb = progressive[:-2] + progressive[last:-2] * 150 + b"\xff\xd9"
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda img: decoded.append(img))
    r = check(bomb)
    assert r.reason == "decompression_bomb" and not decoded
    scans = jpeg_markers(progressive).scans + 150
    assert r.detail == f"{scans} scans > {MAX_JPEG_SCANS}: each one decodes the whole image again"
    # a stray byte in the header, which the decoders pass over, hides no scan
    for hidden in (bomb[:20] + b"A" + bomb[20:], bomb[:2] + b"\xff\x00" + bomb[2:]):
        assert check(hidden).reason == "decompression_bomb"
    monkeypatch.undo()
    # what follows the image (a phone's motion-photo video) is no scan of it
    trailer = np.random.default_rng(5).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
    assert trailer.count(b"\xff\xda") > MAX_JPEG_SCANS
    assert jpeg_markers(jpeg(1) + trailer).scans == 1 and not check(jpeg(1) + trailer).rejected


def test_a_jpeg_of_a_million_marker_segments_is_rejected_before_it_is_opened(monkeypatch):
    """Pillow parses every marker segment when it opens a JPEG: 20 MB of empty ICC-profile
    segments cost 2.8 s of CPU to open and load, 14 times a photo's. Encoders write tens; a
    large ICC profile split into 64 KB segments passes."""
    base = jpeg(1)
    segment = b"\xff\xe2\x00\x10ICC_PROFILE\x00\x01\x01"
    bomb = base[:2] + segment * (MAX_JPEG_SEGMENTS * 50) + base[2:]
    assert jpeg_markers(bomb).segments == MAX_JPEG_SEGMENTS + 1  # the walk stops there
    opened = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a))
    r = check(bomb)
    assert r.reason == "decompression_bomb" and not opened
    assert r.detail == f"more than {MAX_JPEG_SEGMENTS} JPEG marker segments: each one is " \
        "parsed on its own"
    monkeypatch.undo()
    profile = Image.new("RGB", (64, 64), "red")
    out = io.BytesIO()
    profile.save(out, "JPEG", icc_profile=bytes(range(256)) * 1200)  # about 5 segments
    assert 4 < jpeg_markers(out.getvalue()).segments < 30 and not check(out.getvalue()).rejected


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return (len(body).to_bytes(4, "big") + kind + body
            + zlib.crc32(kind + body).to_bytes(4, "big"))


def test_a_png_whose_data_inflates_far_past_its_header_stops_being_inflated():
    """A 64x64 PNG whose one image-data chunk inflates to gigabytes of zeros was inflated to
    its end before it was rejected (about 50 s of CPU for a 20 MB file). The check stops
    once the data passes the size the header promises."""
    header = (64).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])  # 64x64, 8-bit RGB
    bomb = zlib.compress(bytes(64 << 20), 9)  # 64 MiB of zeros, about 64 KB
    data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", bomb)
            + _png_chunk(b"IEND", b""))
    r = check(data, min_side=1)
    assert r.reason == "decode_error" and "inflates past" in r.detail, r.detail


@pytest.mark.parametrize("first", ["RGB", "no size"])
def test_a_png_whose_header_gives_no_cap_is_damaged_and_never_inflated(first, monkeypatch):
    """The inflation cap came from the last IHDR: a 64x64 RGB PNG with a second IHDR of a
    colour type that gives no size (Pillow reads only the first) had its 20 MB of image data
    inflated to its end, about 45 s of CPU, and was accepted. Only the first chunk may be an
    IHDR, and image data needs a header that gives its size."""
    import builder.validate as validate

    rgb = (64).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])  # 64x64, 8-bit RGB
    no_size = (64).to_bytes(4, "big") * 2 + bytes([8, 5, 0, 0, 0])  # colour type 5: none
    headers = [rgb, no_size] if first == "RGB" else [no_size]
    bomb = zlib.compress(bytes(64 << 20), 9)  # 64 MiB of zeros, about 64 KB
    data = (b"\x89PNG\r\n\x1a\n" + b"".join(_png_chunk(b"IHDR", h) for h in headers)
            + _png_chunk(b"IDAT", bomb) + _png_chunk(b"IEND", b""))
    inflated: list[int] = []
    real = validate.zlib.decompressobj

    def counting():
        inner = real()

        class Counting:
            unconsumed_tail = b""

            def decompress(self, body: bytes, limit: int) -> bytes:
                out = inner.decompress(body, limit)
                self.unconsumed_tail = inner.unconsumed_tail
                inflated.append(len(out))
                return out

        return Counting()

    monkeypatch.setattr(validate.zlib, "decompressobj", counting)
    damage = validate.png_damage(data)
    assert damage and not inflated, (damage, sum(inflated))
    monkeypatch.undo()
    if first == "RGB":  # Pillow opens it; the check refuses it
        r = check(data, min_side=1)
        assert r.reason == "decode_error" and "IHDR chunk at byte 33" in r.detail, r.detail
    else:
        assert damage == "PNG image data without a header that gives its size"


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


def _decoded_sizes(monkeypatch) -> list[tuple[int, int]]:
    """The size each JPEG is decoded at from now on (after any ``draft``)."""
    from PIL import JpegImagePlugin

    sizes: list[tuple[int, int]] = []
    load = JpegImagePlugin.JpegImageFile.load

    def spy(self):
        if self.tile:  # not decoded yet (Pillow empties the tiles once it has)
            sizes.append(self.size)
        return load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy)
    return sizes


def _psnr(a: Image.Image, b: Image.Image) -> float:
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return float(10 * np.log10(255.0 ** 2 / (diff ** 2).mean()))


@pytest.mark.parametrize("mode,want,decoded", [("keep_ratio", (256, 192), (512, 384)),
                                               ("center_crop", (256, 256), (1024, 768))])
def test_a_large_jpeg_is_resized_from_a_reduced_decode(monkeypatch, mode, want, decoded):
    """A JPEG 8 (keep_ratio) or 6 (center_crop: its short side) times the target is decoded
    at the smallest of 1/2, 1/4, 1/8 that leaves the last, lanczos, step a factor of 2 at
    least, and the result stays close to resampling the full decode."""
    data = jpeg(3, (2048, 1536), quality=92)
    sizes = _decoded_sizes(monkeypatch)
    webp = EncodeSpec(format="webp", quality=100)
    out, fmt, w, h = ImageTransformer(ResizeSpec(max_side=256, mode=mode), webp
                                      ).transform_bytes(data, "jpeg")
    assert (fmt, (w, h)) == ("webp", want)
    assert sizes == [decoded]
    full = Image.open(io.BytesIO(data)).convert("RGB")
    if mode == "center_crop":
        full = full.crop((256, 0, 1792, 1536))
    reference = io.BytesIO()
    full.resize(want, Image.Resampling.LANCZOS).save(reference, "WEBP", quality=100)
    assert _psnr(Image.open(io.BytesIO(out)), Image.open(reference)) > 35


@pytest.mark.parametrize("resample,decoded", [("lanczos", (217, 99)), ("box", (109, 50))])
@pytest.mark.parametrize("orientation", [1, 6, 3])
def test_a_reduced_decode_keeps_pillows_thumbnail_size(monkeypatch, resample, decoded,
                                                       orientation):
    """393 does not divide by the decoder's scale: the rounded-up partial block must neither
    change the size (Pillow's ``thumbnail`` of the whole file: 100x45, or 45x100 turned) nor
    stretch the picture (a gradient down the rows stays where a full decode puts it)."""
    rows = np.linspace(0, 255, 393)[:, None].repeat(868, 1)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(np.stack([rows] * 3, -1).astype(np.uint8)), "JPEG",
                  quality=95, exif=exif.tobytes())
    sizes = _decoded_sizes(monkeypatch)
    out, _, w, h = ImageTransformer(ResizeSpec(max_side=100, resample=resample)
                                    ).transform_bytes(data, "jpeg")
    assert sizes[0] == decoded
    want = (45, 100) if orientation == 6 else (100, 45)
    assert (w, h) == want == Image.open(io.BytesIO(out)).size
    full = Image.open(io.BytesIO(data))
    turn = {6: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}.get(orientation)
    full = full.transpose(turn) if turn is not None else full.copy()
    filters = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}
    reference = np.asarray(full.resize(want, filters[resample]).convert("L"), np.float64)
    got = np.asarray(Image.open(io.BytesIO(out)).convert("L"), np.float64)
    # without the decoder's box: 1.04-1.09 (lanczos) and 2.67-2.71 (box) levels on average
    assert np.abs(got - reference).mean() < (0.5 if resample == "lanczos" else 1.8)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_a_cut_exif_block_resizes_without_turning(fmt):
    """An EXIF block that ends after its TIFF header makes Pillow's ``getexif`` raise; the
    image is still accepted, so it must still resize (unturned), not stop the job."""
    data = encode(picture(7, (200, 150)), fmt, exif=bytes.fromhex("4578696600004d4d002a"))
    out, _, w, h = ImageTransformer(ResizeSpec(max_side=64)).transform_bytes(data, fmt.lower())
    assert (w, h) == (64, 48) == Image.open(io.BytesIO(out)).size


def test_thumbnail_size_is_pillows():
    from builder.transform import thumbnail_size

    for w, h in [(868, 393), (393, 868), (3, 1000), (1000, 3), (257, 256), (999, 1001),
                 (100, 100), (101, 100), (50, 70)] + [(w, 1000 + 7 * w) for w in range(1, 600, 37)]:
        for side in (1, 8, 100, 256, 333):
            img = Image.new("1", (w, h))
            img.thumbnail((side, side))
            assert thumbnail_size((w, h), side) == (None if (w, h) == img.size else img.size)


@pytest.mark.parametrize("mode", ["P", "1"])
def test_palette_and_bilevel_images_crop_and_shrink(mode):
    """Pillow resamples these by nearest neighbour and cannot ``reduce`` them."""
    data = encode(Image.new(mode, (1200, 900)), "PNG")
    out, fmt, w, h = ImageTransformer(ResizeSpec(max_side=100, mode="center_crop",
                                                 resample="box")).transform_bytes(data, "png")
    assert (fmt, w, h) == ("png", 100, 100) and Image.open(io.BytesIO(out)).mode == mode


def test_a_turned_large_jpeg_is_reduced_and_turned():
    """The reduced decode happens before the EXIF turn: the sides still come out swapped."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(picture(4, (2048, 1536)), "JPEG", quality=90, exif=exif.tobytes())
    out, _, w, h = ImageTransformer(ResizeSpec(max_side=256)).transform_bytes(data, "jpeg")
    assert (w, h) == (192, 256) == Image.open(io.BytesIO(out)).size


@pytest.mark.parametrize("resample", ["lanczos", "bicubic", "bilinear", "box"])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_every_filter_gives_the_asked_size(monkeypatch, resample, fmt):
    """Each filter, on a JPEG (reduced in its decoder) and a PNG (reduced by ``reduce``):
    box reduces all the way by whole factors, the others leave the last step a factor 2."""
    data = encode(picture(5, (1600, 1200)), fmt)
    sizes = _decoded_sizes(monkeypatch)
    out, _, w, h = ImageTransformer(ResizeSpec(max_side=200, resample=resample)
                                    ).transform_bytes(data, fmt.lower())
    assert (w, h) == (200, 150) == Image.open(io.BytesIO(out)).size
    if fmt == "JPEG":
        assert sizes == [(200, 150)] if resample == "box" else sizes == [(400, 300)]


def test_transform_inactive_keeps_bytes():
    data = jpeg(6)
    r = check(data)
    ImageTransformer()([r])
    assert r.data == data


def tiff_with_bad_second_page() -> bytes:
    """A valid one-page TIFF whose IFD chain points on to a page with no ImageWidth/Length:
    Pillow raises TypeError ("Missing dimensions") when counting its frames."""
    data = bytearray(encode(picture(7, (120, 90)), "TIFF"))
    assert data[:2] == b"II"
    ifd = int.from_bytes(data[4:8], "little")
    count = int.from_bytes(data[ifd:ifd + 2], "little")
    next_at = ifd + 2 + 12 * count
    if len(data) % 2:
        data += b"\0"
    second = len(data)
    # one entry: PhotometricInterpretation (262), SHORT, 1 value, RGB; then no further page
    data += (1).to_bytes(2, "little") + (262).to_bytes(2, "little") + (3).to_bytes(2, "little")
    data += (1).to_bytes(4, "little") + (2).to_bytes(4, "little") + (0).to_bytes(4, "little")
    data[next_at:next_at + 4] = second.to_bytes(4, "little")
    return bytes(data)


def test_malformed_multipage_tiff_is_rejected_not_raised():
    data = tiff_with_bad_second_page()
    with pytest.raises(TypeError):
        getattr(Image.open(io.BytesIO(data)), "n_frames")
    r = check(data, formats=["tiff"])
    assert r.rejected and r.reason == "decode_error", r.detail
    assert "frames" in r.detail and r.stage == "validate"


def animated_gif(frames: int = 3, size: tuple[int, int] = (200, 160)) -> bytes:
    images = [picture(i, size).convert("P") for i in range(frames)]
    out = io.BytesIO()
    images[0].save(out, "GIF", save_all=True, append_images=images[1:], duration=100)
    return out.getvalue()


@pytest.mark.parametrize("keep", [0.5, 0.75, 0.95])
def test_truncated_animated_gif_rejected(keep):
    data = animated_gif()
    cut = data[: int(len(data) * keep)]
    assert Image.open(io.BytesIO(cut)).n_frames >= 1
    r = check(cut)
    assert r.rejected and r.reason == "truncated", r.detail


def test_gif_structure_checks_are_lenient_where_decoders_are():
    data = animated_gif()
    assert data.endswith(b";")
    assert gif_truncation(data) == ""
    assert gif_truncation(data[:-1]) == ""  # complete last frame, only the trailer missing
    assert gif_truncation(data + b"junk after the trailer") == ""
    assert gif_truncation(data[:-2]) != ""  # inside the last frame's block terminator
    assert not check(data[:-1]).rejected
    single = encode(picture(8, (200, 160)).convert("P"), "GIF")
    assert not check(single).rejected and gif_truncation(single) == ""


def mode_image(mode: str) -> bytes:
    """A 300x200 image in an unusual mode (16-bit grey PNG, float or CMYK TIFF), with a
    gradient so that scaling shows."""
    if mode == "CMYK":
        return encode(picture(9, (300, 200)).convert(mode), "TIFF")
    ramp = np.tile(np.linspace(0, 1, 300), (200, 1))
    arr = (ramp * 65535).astype(np.uint16) if mode == "I;16" else ramp.astype(np.float32)
    img = Image.fromarray(arr)
    assert img.mode == mode
    return encode(img, "PNG" if mode == "I;16" else "TIFF")


OPTIONS = [(ResizeSpec(max_side=64), None),
           (ResizeSpec(max_side=64, mode="center_crop"), None),
           (ResizeSpec(max_side=64), EncodeSpec(format="jpeg")),
           (None, EncodeSpec(format="jpeg")),
           (None, EncodeSpec(format="webp"))]


@pytest.mark.parametrize("mode", ["I;16", "F", "CMYK"])
@pytest.mark.parametrize("resize,encode_as", OPTIONS)
def test_transform_handles_unusual_modes(mode, resize, encode_as):
    data = mode_image(mode)
    r = check(data, formats=["png", "tiff"])
    assert not r.rejected, r.detail
    out, fmt, w, h = ImageTransformer(resize, encode_as).transform_bytes(r.data, r.format)
    assert out != data
    with Image.open(io.BytesIO(out)) as img:
        assert img.mode in ("L", "RGB", "RGBA") and img.size == (w, h)
        assert max(w, h) == (64 if resize else 300)
        if mode in ("I;16", "F"):
            grey = np.asarray(img.convert("L"))
            assert grey.min() < 80 and grey.max() > 175  # scaled, not clipped to black/white


def test_transform_failure_keeps_original_instead_of_raising(caplog):
    data = jpeg(10, (300, 200))
    r = check(data)
    broken = ImageTransformer(ResizeSpec(max_side=64))
    original = broken.transform_bytes

    def fail(data: bytes, fmt: str) -> tuple[bytes, str, int, int]:
        raise OSError("cannot write mode XYZ as PNG")

    broken.transform_bytes = fail  # type: ignore[method-assign]
    with caplog.at_level("WARNING", logger="builder.transform"):
        broken([r])
    assert (r.data, r.format, r.width, r.height) == (data, "jpeg", 300, 200)
    assert not r.rejected and "keeping the original" in caplog.text
    row = {"image": data, "format": "jpeg", "width": 300, "height": 200, "bytes": 0,
           "url": "http://x/a"}
    broken.apply_row(row)
    assert (row["image"], row["width"], row["bytes"]) == (data, 300, len(data))
    assert original(data, "jpeg")[2:] == (64, 43)


CORRUPT = Path(__file__).parent / "data" / "corrupt"
"""Pillow's own test images (Tests/images in python-pillow/Pillow, MIT-CMU licence)."""


def _chunks(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, type) of each chunk of a PNG."""
    out, pos = [], 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        out.append((pos, data[pos + 4:pos + 8]))
        pos += 12 + length
    return out


def _flip_mid_idat(data: bytes) -> bytes:
    pos = next(p for p, kind in _chunks(data) if kind == b"IDAT")
    length = int.from_bytes(data[pos:pos + 4], "big")
    at = pos + 8 + length // 2
    body = data[pos + 4:pos + 8 + length]
    body = body[:at - pos - 4] + bytes([body[at - pos - 4] ^ 0xFF]) + body[at - pos - 3:]
    crc = zlib.crc32(body).to_bytes(4, "big")  # a valid CRC: only the decoder can tell
    return data[:pos + 4] + body + crc + data[pos + 8 + length + 4:]


@pytest.mark.parametrize("name", ["broken_data_stream.png", "truncated_end_chunk.png",
                                  "chunk_no_fctl.png"])
def test_pillows_corrupt_pngs_are_rejected(name):
    r = check((CORRUPT / name).read_bytes(), min_side=1)
    assert r.rejected and r.reason in ("decode_error", "truncated"), r.detail


@pytest.mark.parametrize("level", ["fast", "medium"])
def test_png_with_a_byte_flipped_mid_idat_is_a_decode_error(level):
    good = encode(picture(5, (320, 240)), "PNG")
    assert not check(good, level=level).rejected
    r = check(_flip_mid_idat(good), level=level)
    assert r.rejected and r.reason in ("decode_error", "truncated"), r.detail


def test_malformed_exif_on_good_pixels_is_not_a_decode_error():
    img = picture(6, (200, 150))
    out = io.BytesIO()
    img.save(out, "JPEG", exif=b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x05\x01\x12")
    r = check(out.getvalue())
    assert not r.rejected, r.detail


@pytest.mark.parametrize("tail,reason", [(b"\x2c\0\0\0\0\x64\0\x50\0\0", "truncated"),
                                         (b"\x21\xf9\x01\0\0", "decode_error")],
                         ids=["cut in a frame", "short graphic control block"])
@pytest.mark.parametrize("animated", ["first_frame", "reject"])
def test_a_gif_with_a_broken_later_frame_header_is_rejected(tail, reason, animated):
    """Counting frames reads every frame's header, and Pillow raises IndexError or
    struct.error on a broken one: a GIF cut off there is truncated (found before counting),
    a complete one with a malformed block is a decode error."""
    buf = io.BytesIO()
    Image.new("RGB", (100, 80)).save(buf, "GIF")
    r = check(buf.getvalue()[:-1] + tail, animated=animated)
    assert r.rejected and r.reason == reason, r.detail


def test_a_decoder_surprise_rejects_that_image_and_the_batch_goes_on(monkeypatch, caplog):
    """Whatever a decoder raises on one image's bytes is that image's rejection
    (decode_error, named), never the batch's or the job's failure."""
    import builder.validate

    good, odd = jpeg(1), jpeg(2)
    real = builder.validate.luma_grid
    calls = []

    def luma_grid(img, size):
        calls.append(size)
        if len(calls) == 2:
            raise RuntimeError("a plugin's bug")
        return real(img, size)

    monkeypatch.setattr(builder.validate, "luma_grid", luma_grid)
    records = [rec(good), rec(odd), rec(good)]
    with caplog.at_level("WARNING", logger="builder.validate"):
        ImageValidator(ValidationSpec())(records)
    assert [r.rejected for r in records] == [False, True, False]
    assert records[1].reason == "decode_error"
    assert records[1].detail == "unexpected RuntimeError: a plugin's bug"
    assert "unexpected RuntimeError" in caplog.text
    assert records[0].phash and records[2].phash


def test_a_malformed_exif_tag_still_lets_an_accepted_image_turn_and_resize():
    """Pillow turns the pixels by the EXIF orientation, then fails to write back a block whose
    tag is stored in the wrong type (Make as a FLOAT): the image is still turned and resized,
    and its WebDataset JPEG made, instead of the job stopping."""
    import struct

    exif = (b"Exif\0\0MM\0*\0\0\0\x08" + struct.pack(">H", 2)
            + struct.pack(">HHIf", 0x010F, 11, 1, 1.5)
            + struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + b"\0" * 4)
    buf = io.BytesIO()
    Image.new("RGB", (100, 80), (200, 30, 30)).save(buf, "JPEG", exif=exif)
    data = buf.getvalue()
    assert not check(data).rejected
    out, fmt, w, h = ImageTransformer(ResizeSpec(max_side=64)).transform_bytes(data, "jpeg")
    assert (fmt, w, h) == ("jpeg", 51, 64)  # turned a quarter (orientation 6), then shrunk
    png = io.BytesIO()
    Image.open(io.BytesIO(data)).save(png, "PNG", exif=exif)
    assert Image.open(io.BytesIO(rgb_jpeg(png.getvalue(), "png"))).size == (80, 100)
