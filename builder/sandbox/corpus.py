"""The sandbox web's content: which URLs exist, what each one serves, and the pictures themselves.

Nothing here does I/O. A ``Corpus`` is a catalogue of ``Entry`` objects (one per servable URL
path) built in milliseconds from the seed; the bytes of an image are rendered only when asked
for (``Corpus.body``), always the same bytes for the same seed.

Layout of the URL space (``{slug}`` is the class name made URL-safe):

- ``/img/{slug}/{i:04d}.{ext}``            clean images of a class
- ``/f/{fault}/{slug}/{n:03d}.{ext}``      the n-th fault instance in a class's results
- ``/private/{slug}/{n:03d}.jpg``          ``robots_disallowed`` instances (robots.txt bans it)
- ``/f/redirect_loop/{slug}/{n:03d}/a``    redirects to ``.../b``, which redirects back
- ``/bench/{i:05d}.jpg``                   benchmark images (``bench_images``)

``connection_refused`` instances point at a port nothing listens on and ``bad_scheme`` ones use
``ftp://``; neither is served. The dedicated instances behind ``SandboxWeb.fault_urls()`` use the
slug ``_probe``, which no class slug can take, so probing them never changes the state (e.g. the
first-request 500 of ``flaky_500``) of the instances the search results list.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import random
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from builder.reasons import Reason

ACCEPTED = "accepted"

FAULTS: dict[str, str] = {
    "exact_duplicate": Reason.EXACT_DUPLICATE.value,
    "near_duplicate": Reason.NEAR_DUPLICATE.value,
    "truncated": Reason.TRUNCATED.value,
    "corrupt": Reason.DECODE_ERROR.value,
    "html_as_jpeg": Reason.NOT_AN_IMAGE.value,
    "not_found": Reason.HTTP_CLIENT_ERROR.value,
    "flaky_500": ACCEPTED,
    "always_500": Reason.HTTP_SERVER_ERROR.value,
    "rate_limited_once": ACCEPTED,
    "always_429": Reason.RATE_LIMITED.value,
    "slow": Reason.TIMEOUT.value,
    "too_big": Reason.TOO_MANY_BYTES.value,
    "bomb": Reason.DECOMPRESSION_BOMB.value,
    "redirect_loop": Reason.TOO_MANY_REDIRECTS.value,
    "noai": Reason.OPTED_OUT.value,
    "robots_disallowed": Reason.ROBOTS_DISALLOWED.value,
    "tiny": Reason.TOO_SMALL.value,
    "panorama": Reason.BAD_ASPECT_RATIO.value,
    "connection_refused": Reason.CONNECTION_ERROR.value,
    "bad_scheme": Reason.UNSUPPORTED_SCHEME.value,
}
"""Fault name -> the Reason value the pipeline must give it, or "accepted" (after retries)."""

FAULT_NAMES: tuple[str, ...] = tuple(FAULTS)
CLEAN = "clean"
PROBE_SLUG = "_probe"
BOMB_SIDE = 30_000
ROBOTS_TXT = "User-agent: *\nDisallow: /private/\n"

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp",
                 "gif": "image/gif"}
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp", "gif": "gif"}
# Mostly JPEG; one PNG, one WebP and one GIF in every eight images.
FORMAT_CYCLE = ("jpeg", "jpeg", "png", "jpeg", "webp", "jpeg", "gif", "jpeg")

# Faults whose body is an ordinary, valid JPEG (the fault lives in the status, headers or size).
_VALID_IMAGE_FAULTS = frozenset({"flaky_500", "rate_limited_once", "slow", "noai",
                                 "robots_disallowed", "tiny", "panorama"})
# Faults that are only URLs: nothing on the sandbox serves them.
URL_ONLY_FAULTS = frozenset({"connection_refused", "bad_scheme"})

HTML_BODY = (b"<!DOCTYPE html>\n<html><head><title>Sandbox page</title></head>"
             b"<body><p>This is an HTML page served as image/jpeg.</p></body></html>\n")
# The start of a JPEG (SOI + JFIF APP0), so that a streamed body looks like an image.
JPEG_HEAD = bytes.fromhex("ffd8ffe000104a46494600010100000100010000")


@dataclass(frozen=True)
class Picture:
    """How to render one image: everything random about it is derived from ``seed``."""

    seed: int
    width: int
    height: int
    fmt: str = "jpeg"
    quality: int = 90
    frames: int = 1
    hue: float = 0.0
    shape_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)


@dataclass(frozen=True)
class Entry:
    """One URL path of the sandbox. ``kind`` is ``"clean"`` or a fault name.

    ``original`` is the path of the image a duplicate copies, or the other hop of a redirect loop.
    """

    path: str
    kind: str
    label: str
    picture: Picture | None = None
    original: str = ""

    @property
    def content_type(self) -> str:
        if self.kind == "html_as_jpeg":
            return "image/jpeg"
        if self.kind == "bomb":
            return "image/png"
        if self.picture is None:
            return "application/octet-stream"
        if self.kind in (CLEAN, "exact_duplicate"):
            return CONTENT_TYPES[self.picture.fmt]
        return "image/jpeg"


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts; stable across processes (unlike ``hash``)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def slugify(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def _words(text: str) -> str:
    return " ".join(re.sub(r"[_\-]+", " ", text.lower()).split())


class Corpus:
    """The catalogue of a sandbox web: search results per class, and every servable path."""

    def __init__(self, classes: Sequence[str], images_per_class: int, *, seed: int = 0,
                 faults: bool = True, fault_every: int = 6, bench_images: int = 0):
        classes = tuple(classes)
        if not classes:
            raise ValueError("classes is empty: give at least one class name")
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes has duplicates: {classes}")
        if images_per_class < 0 or bench_images < 0:
            raise ValueError("images_per_class and bench_images must be >= 0")
        if fault_every < 1:
            raise ValueError(f"fault_every must be >= 1, got {fault_every}")
        self.classes = classes
        self.images_per_class = images_per_class
        self.seed = seed
        self.faults = faults
        self.fault_every = fault_every
        self.bench_images = bench_images
        self.slugs = self._make_slugs(classes)
        self.entries: dict[str, Entry] = {}
        self.clean: dict[str, list[Entry]] = {}
        self.results: dict[str, list[Entry]] = {}
        self.url_only: list[Entry] = []
        self._build()
        self.probes: dict[str, Entry] = self._build_probes()

    @staticmethod
    def _make_slugs(classes: tuple[str, ...]) -> dict[str, str]:
        slugs: dict[str, str] = {}
        taken: set[str] = set()
        for k, label in enumerate(classes):
            slug = slugify(label) or f"class-{k}"
            if slug in taken:
                slug = f"{slug}-{k}"
            taken.add(slug)
            slugs[label] = slug
        return slugs

    def _style(self, label: str) -> tuple[float, tuple[float, float, float, float]]:
        """A class's hue centre and shape preferences (ellipse, rectangle, polygon, line)."""
        rng = random.Random(derive_seed(self.seed, "style", label))
        hue = rng.random()
        w = [rng.uniform(0.2, 3.0) for _ in range(4)]
        return hue, (w[0], w[1], w[2], w[3])

    def _picture(self, label: str, *parts: object, fmt: str = "jpeg", frames: int = 1,
                 size: tuple[int, int] | None = None) -> Picture:
        s = derive_seed(self.seed, label, *parts)
        rng = random.Random(s)
        long_side = rng.randint(200, 640)
        short_side = max(160, round(long_side / rng.uniform(1.0, 1.8)))
        w, h = (long_side, short_side) if rng.random() < 0.6 else (short_side, long_side)
        if size is not None:
            w, h = size
        hue, weights = self._style(label)
        return Picture(seed=s, width=w, height=h, fmt=fmt, quality=rng.randint(82, 95),
                       frames=frames, hue=hue, shape_weights=weights)

    def _add(self, entry: Entry) -> Entry:
        self.entries[entry.path] = entry
        return entry

    def _build(self) -> None:
        cursor = 0  # the fault cycle continues from one class to the next
        for label in self.classes:
            slug = self.slugs[label]
            clean: list[Entry] = []
            results: list[Entry] = []
            n_faults = 0
            for i in range(self.images_per_class):
                fmt = FORMAT_CYCLE[i % len(FORMAT_CYCLE)]
                gif_ordinal = i // len(FORMAT_CYCLE)
                frames = (2 + gif_ordinal % 2) if fmt == "gif" and gif_ordinal % 2 == 0 else 1
                pic = self._picture(label, "clean", i, fmt=fmt, frames=frames)
                entry = self._add(Entry(f"/img/{slug}/{i:04d}.{EXTENSIONS[fmt]}", CLEAN, label,
                                        pic))
                clean.append(entry)
                results.append(entry)
                if self.faults and (i + 1) % self.fault_every == 0:
                    kind = FAULT_NAMES[cursor % len(FAULT_NAMES)]
                    cursor += 1
                    results.append(self._fault(kind, label, slug, n_faults, clean))
                    n_faults += 1
            self.clean[label] = clean
            self.results[label] = results

    def _fault(self, kind: str, label: str, slug: str, n: int, clean: list[Entry]) -> Entry:
        """Make (and register) fault instance ``n`` of ``kind``; duplicates copy from ``clean``."""
        stem = f"/f/{kind}/{slug}/{n:03d}"
        if kind == "exact_duplicate":
            orig = clean[-1]
            assert orig.picture is not None
            return self._add(Entry(f"{stem}.{EXTENSIONS[orig.picture.fmt]}", kind, label,
                                   orig.picture, original=orig.path))
        if kind == "near_duplicate":
            # GIF palettes shift colours; resample a non-GIF original where there is one.
            orig = next((e for e in reversed(clean) if e.picture and e.picture.fmt != "gif"),
                        clean[-1])
            return self._add(Entry(f"{stem}.jpg", kind, label, orig.picture, original=orig.path))
        if kind == "redirect_loop":
            a, b = f"{stem}/a", f"{stem}/b"
            self._add(Entry(b, kind, label, original=a))
            return self._add(Entry(a, kind, label, original=b))
        if kind in URL_ONLY_FAULTS:
            entry = Entry(f"{stem}.jpg", kind, label)
            self.url_only.append(entry)
            return entry
        size = {"tiny": (16, 16), "panorama": (1000, 100)}.get(kind)
        pic = self._picture(label, "fault", kind, slug, n, size=size)
        if kind == "robots_disallowed":
            return self._add(Entry(f"/private/{slug}/{n:03d}.jpg", kind, label, pic))
        ext = "png" if kind == "bomb" else "jpg"
        return self._add(Entry(f"{stem}.{ext}", kind, label, pic))

    def _build_probes(self) -> dict[str, Entry]:
        label = self.classes[0]
        originals = self.clean[label][:1]
        if not originals:
            pic = self._picture(label, "probe-original")
            originals = [self._add(Entry(f"/img/{PROBE_SLUG}/0000.jpg", CLEAN, label, pic))]
        return {kind: self._fault(kind, label, PROBE_SLUG, 0, originals) for kind in FAULT_NAMES}

    def class_for_query(self, query: str) -> str | None:
        """The class whose name appears in ``query`` as a word (plural -s/-es allowed, case and
        ``_``/``-`` vs space ignored); the longest name wins; None when no class matches."""
        q = _words(query)
        best: str | None = None
        for label in self.classes:
            name = _words(label)
            if not name:
                continue
            if re.search(rf"(?<![0-9a-z]){re.escape(name)}(?:e?s)?(?![0-9a-z])", q):
                if best is None or len(name) > len(_words(best)):
                    best = label
        return best

    def bench_picture(self, i: int) -> Picture:
        """Benchmark image ``i``: a 512x384 JPEG of about 40 KB."""
        return Picture(seed=derive_seed(self.seed, "bench", i), width=512, height=384,
                       quality=90, hue=(i * 0.61803) % 1.0)

    def body(self, entry: Entry) -> bytes:
        """The bytes ``entry`` serves (for kinds with a fixed body); deterministic.

        Raises ValueError for kinds with no fixed body (statuses, streams, redirects, URL-only).
        """
        kind, pic = entry.kind, entry.picture
        if kind in (CLEAN, "exact_duplicate") and pic is not None:
            return encode(pic)
        if kind in _VALID_IMAGE_FAULTS and pic is not None:
            return encode(pic)
        if kind == "near_duplicate" and pic is not None:
            return near_duplicate(pic)
        if kind == "truncated" and pic is not None:
            data = encode(pic)
            return data[: int(len(data) * 0.6)]
        if kind == "corrupt" and pic is not None:
            return corrupt_jpeg(pic.seed)
        if kind == "html_as_jpeg":
            return HTML_BODY
        if kind == "bomb":
            return bomb_png(BOMB_SIDE, BOMB_SIDE)
        raise ValueError(f"{kind!r} has no fixed body")


# ---------------------------------------------------------------------------------------------
# Rendering


def _colour(rng: random.Random, hue: float) -> tuple[int, int, int]:
    h = (hue + rng.uniform(-0.3, 0.3)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(0.3, 1.0), rng.uniform(0.1, 1.0))
    return round(r * 255), round(g * 255), round(b * 255)


def draw(pic: Picture, frame: int = 0, noise: bool = True) -> Image.Image:
    """Render ``pic`` (frame ``frame``): a gradient, large random shapes, and mild noise."""
    rng = random.Random(pic.seed)
    w, h = pic.width, pic.height
    c1 = np.array(_colour(rng, pic.hue), dtype=np.float32)
    c2 = np.array(_colour(rng, pic.hue + 0.5), dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xs * np.cos(angle) + ys * np.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    bg = c1 * (1.0 - t[..., None]) + c2 * t[..., None]
    img = Image.fromarray(bg.astype(np.uint8), "RGB")
    canvas = ImageDraw.Draw(img)
    side = min(w, h)
    shift = frame * side * 0.06
    for _ in range(rng.randint(5, 9)):
        shape = rng.choices(range(4), weights=pic.shape_weights)[0]
        fill = _colour(rng, pic.hue + rng.choice((0.0, 0.5)))
        cx, cy = rng.uniform(0, w) + shift, rng.uniform(0, h)
        rx, ry = rng.uniform(0.12, 0.45) * side, rng.uniform(0.12, 0.45) * side
        if shape == 0:
            canvas.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)
        elif shape == 1:
            canvas.rectangle((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)
        elif shape == 2:
            pts = [(cx + rng.uniform(-rx, rx) * 1.5, cy + rng.uniform(-ry, ry) * 1.5)
                   for _ in range(rng.randint(3, 6))]
            canvas.polygon(pts, fill=fill)
        else:
            canvas.line((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill,
                        width=max(3, int(side * rng.uniform(0.03, 0.1))))
    if noise:
        nrng = np.random.default_rng(pic.seed)
        arr = np.asarray(img, dtype=np.int16) + nrng.integers(-8, 9, (h, w, 3), dtype=np.int16)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img


def encode(pic: Picture) -> bytes:
    """``pic`` in its format. Lossless formats get no noise (it would only bloat them)."""
    out = io.BytesIO()
    if pic.fmt == "jpeg":
        draw(pic).save(out, "JPEG", quality=pic.quality)
    elif pic.fmt == "webp":
        draw(pic).save(out, "WEBP", quality=pic.quality - 5, method=2)
    elif pic.fmt == "png":
        draw(pic, noise=False).save(out, "PNG", compress_level=6)
    elif pic.fmt == "gif":
        frames = [draw(pic, f, noise=False).quantize(colors=128) for f in range(pic.frames)]
        if len(frames) > 1:
            frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=200,
                           loop=0)
        else:
            frames[0].save(out, "GIF")
    else:
        raise ValueError(f"unknown sandbox image format {pic.fmt!r}")
    return out.getvalue()


def near_duplicate(pic: Picture) -> bytes:
    """The same picture, resized to 90% and re-encoded as JPEG at another quality."""
    img = draw(pic, noise=pic.fmt not in ("png", "gif"))
    img = img.resize((round(pic.width * 0.9), round(pic.height * 0.9)), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=70 if pic.quality >= 80 else 92)
    return out.getvalue()


def corrupt_jpeg(seed: int, size: int = 4096) -> bytes:
    """JPEG magic bytes followed by garbage (no valid marker after them)."""
    garbage = bytearray(random.Random(seed).randbytes(size))
    garbage[0] = 0x00  # a JPEG marker must follow FF D8 FF; 0x00 is none
    return b"\xff\xd8\xff" + bytes(garbage)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` grey pixels (one row of data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1), 9)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))
