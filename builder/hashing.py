"""Content hashes: sha256 of the bytes, and the perceptual signatures used for near-duplicates.

Every format is hashed from the same reduced pixels: a ``GRID`` x ``GRID`` luma grid in which
each cell is the exact area average of its part of the picture. JPEGs get there through a
reduced DCT decode (``Image.draft``: 1/2, 1/4 or 1/8 scale, each output pixel about the mean of
its block) and every other format through ``Image.reduce`` (a k x k block mean in the image's own
mode, so no full-size converted copy is made); an exact area-weighted matrix takes either to the
grid. Pillow's BOX resize is not exact at fractional ratios (cells take whole pixels), which put a
JPEG and a PNG of the same pixels up to 19 grey levels apart; the area matrices remove that.

From the grid come *views* (the whole picture, centred crops, the mirror, small rotations) and
from each view two 64-bit codes: pHash (the sign of the 8x8 low-frequency DCT block of a 32x32
view against its median) and dHash (the sign of horizontal gradients on a 9x8 view). An image's
``stored`` signatures and ``probes`` are listed in ``STORED_VIEWS`` and ``PROBE_VIEWS``; the rule
that compares them is ``builder.similarity.near_distance``. Why these views: bench/README.md.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image

from builder.similarity import Signature

GRID = 64
"""Side of the luma grid every perceptual code is computed from."""


@dataclass(frozen=True)
class View:
    """A region of the grid: a centred crop keeping ``keep`` of each side, maybe mirrored or
    rotated by ``degrees`` (counter-clockwise) before the crop."""

    keep: float = 1.0
    mirror: bool = False
    degrees: float = 0.0


FULL, CROP90, CROP80 = View(1.0), View(0.9), View(0.8)
MIRROR = View(1.0, mirror=True)
STORED_VIEWS = (FULL, CROP90, CROP80, MIRROR)
"""What a kept image offers: itself, its centre 90% and 80% (for copies cropped 5-10% off each
border), and its mirror image."""
PROBE_VIEWS = (FULL, CROP90, CROP80, MIRROR, View(0.9, degrees=3.5), View(0.9, degrees=-3.5))
"""What a newcomer is looked up with: the stored views (so the rule holds whichever copy
arrives first), plus its centre 90% turned 3.5 degrees either way (for copies rotated 2-5
degrees and cropped)."""


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0, :] = np.sqrt(1.0 / n)
    return m


_DCT8 = _dct_matrix(32)[:8]
_ODD = np.where(np.arange(8) % 2, -1.0, 1.0)[None, :]
"""Mirroring a picture flips the sign of its odd horizontal DCT frequencies."""
_LUMA = np.array([0.299, 0.587, 0.114])
TIE = 1e-6
"""How much larger a value (a gradient or DCT coefficient of grey levels) must be to set
its bit. Flat parts of a picture give equal gradients and coefficients, which float rounding
makes a little larger or smaller at random: without this margin up to 12 of a dHash's 64 bits
(1.1% of all codes on 4,000 photos) changed with the order of the arithmetic. A tie now sets
no bit, whatever the order."""


@lru_cache(maxsize=64)
def area_matrix(n_out: int, n_in: int, lo: float = 0.0, hi: float = -1.0) -> np.ndarray:
    """(n_out, n_in) weights: row o is the exact area mean of input span o of [lo, hi)."""
    hi = float(n_in) if hi < 0 else hi
    edges = lo + (hi - lo) * np.arange(n_out + 1) / n_out
    left, right = edges[:-1, None], edges[1:, None]
    i = np.arange(n_in)[None, :]
    w = np.clip(np.minimum(right, i + 1) - np.maximum(left, i), 0.0, None)
    return w / w.sum(axis=1, keepdims=True)


def cell_edges(n: int, full: int) -> np.ndarray:
    """Where the ``n`` cells of a reduced axis start and end on the ``full``-pixel axis.

    A JPEG DCT-scaled decode and ``Image.reduce`` both give each output pixel a block of ``c``
    pixels, the last block holding what is left; any other reduction is taken as uniform.
    """
    c = -(-full // n)
    if n * c >= full > (n - 1) * c:
        return np.minimum(np.arange(n + 1) * c, full).astype(np.float64)
    return np.linspace(0.0, full, n + 1)


@lru_cache(maxsize=32)
def grid_weights(n: int, full: int, n_out: int) -> np.ndarray:
    """(n_out, n) weights taking an axis of ``n`` cells covering ``full`` pixels (``cell_edges``)
    to ``n_out`` equal spans: row o holds each cell's share of span o, so a product with them is
    the exact area mean. Two small matrix products cost a third of what interpolating the
    running integral did (on one BLAS thread: ``builder.NUMPY_THREAD_ENV``). The last 32 sizes
    are kept (25-75 us to work out again; each is 64 x ``n`` floats, 192 KB at 375 cells)."""
    edges = cell_edges(n, full)
    at = np.linspace(edges[0], edges[-1], n_out + 1)
    lo, hi = at[:-1, None], at[1:, None]
    overlap = np.minimum(hi, edges[None, 1:]) - np.maximum(lo, edges[None, :-1])
    weights = np.clip(overlap, 0.0, None) / np.diff(at)[:, None]
    if np.array_equal(weights, IDENTITY):
        return IDENTITY
    weights.flags.writeable = False  # shared by every image of this size
    return weights


IDENTITY = np.eye(GRID)
"""The weights of an axis whose cells are the grid's own (a 512-pixel side decoded at 1/8 is
64 cells): ``grid_weights`` returns this very array, and ``luma_grid`` skips its product,
which leaves every value as it was to the bit."""
IDENTITY.flags.writeable = False


@lru_cache(maxsize=16)
def _view_matrices(keep: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo, hi = GRID * (1 - keep) / 2, GRID * (1 + keep) / 2
    return (_DCT8 @ area_matrix(32, GRID, lo, hi), area_matrix(8, GRID, lo, hi),
            area_matrix(9, GRID, lo, hi))


def _pack_rows(bits: np.ndarray) -> list[int]:
    """Each row of 64 booleans as a 64-bit integer, the first bit highest."""
    packed = np.packbits(bits.reshape(len(bits), 64), axis=1)
    return packed.view(">u8").ravel().tolist()


def _products(grids: np.ndarray, keep: float) -> tuple[np.ndarray, np.ndarray]:
    """The low 8x8 DCT block and the 8x9 gradient cells of one crop of each grid of a stack."""
    dct, rows, cols = _view_matrices(keep)
    return dct @ grids @ dct.T, rows @ grids @ cols.T


@dataclass(frozen=True)
class TurnPlan:
    """Where each pixel of a ``GRID`` x ``GRID`` picture turned by some degrees samples the
    picture (the four neighbours of ``idx``, as flat indices; ``GRID * GRID`` for a pixel that
    falls outside, which reads a zero) and its bilinear weights ``dx``, ``dy``."""

    idx: np.ndarray
    dx: np.ndarray
    dy: np.ndarray


@lru_cache(maxsize=8)
def turn_plan(degrees: float) -> TurnPlan:
    """The plan of Pillow's ``Image.rotate(degrees, BILINEAR)`` (same size, turned about the
    centre): the same affine map, rounded as Pillow rounds it, and the same edge rules (a
    pixel whose source lies off the picture is 0; a neighbour past the edge repeats the edge,
    and a source on the last row takes that row's value, not a blend with the row below)."""
    n = GRID
    angle = -math.radians(degrees % 360.0)
    cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
    centre = n / 2
    shift_x = cos * -centre + sin * -centre + 0.0 + centre
    shift_y = -sin * -centre + cos * -centre + 0.0 + centre
    xo = np.arange(n, dtype=np.float64)[None, :] + 0.5
    yo = np.arange(n, dtype=np.float64)[:, None] + 0.5
    xin = cos * xo + sin * yo + shift_x
    yin = -sin * xo + cos * yo + shift_y
    inside = ((xin >= 0) & (xin < n) & (yin >= 0) & (yin < n)).ravel()
    xin, yin = xin - 0.5, yin - 0.5
    x, y = np.floor(xin), np.floor(yin)
    dx, dy = xin - x, yin - y
    x, y = x.astype(np.intp), y.astype(np.intp)
    x0, x1 = np.clip(x, 0, n - 1), np.clip(x + 1, 0, n - 1)
    row0 = np.clip(y, 0, n - 1)
    below = (y + 1 >= 0) & (y + 1 < n)
    row1 = np.where(below, y + 1, row0)
    idx = np.stack([(row * n + col).ravel() for row, col in
                    ((row0, x0), (row0, x1), (row1, x0), (row1, x1))])
    idx[:, ~inside] = n * n
    dx, dy = dx.ravel(), np.where(below, dy, 0.0).ravel()
    dx[~inside] = dy[~inside] = 0.0
    for array in (idx, dx, dy):
        array.flags.writeable = False  # shared by every batch
    return TurnPlan(idx, dx, dy)


_TURN_CHUNK = 16
"""Grids turned per pass: the intermediates of 16 stay in a core's cache (64 at once took
2.5x as long per grid)."""


def turn_many(stack: np.ndarray, degrees: float) -> np.ndarray:
    """Each ``GRID`` x ``GRID`` grid of ``stack`` turned ``degrees`` counter-clockwise, equal to
    the bit to Pillow's bilinear ``rotate`` of its float32 copy (the arithmetic is Pillow's:
    float32 differences along a row, float64 weights, a float32 result), at about half the
    CPU: Pillow's per-image conversions and per-pixel calls cost more than the sampling."""
    plan = turn_plan(degrees)
    out = np.empty((len(stack), GRID * GRID), np.float64)
    buffer = np.zeros((min(len(stack), _TURN_CHUNK), GRID * GRID + 1), np.float32)
    for start in range(0, len(stack), _TURN_CHUNK):
        part = stack[start:start + _TURN_CHUNK]
        pixels = buffer[:len(part)]  # its last column stays 0: what an outside pixel reads
        pixels[:, :-1] = part.reshape(len(part), -1)
        a, b, c, d = (np.take(pixels, i, axis=1) for i in plan.idx)
        b -= a
        d -= c
        top = b * plan.dx
        top += a
        bottom = d * plan.dx
        bottom += c
        bottom -= top
        bottom *= plan.dy
        bottom += top
        out[start:start + len(part)] = bottom.astype(np.float32)
    return out.reshape(stack.shape)


Signatures = tuple[tuple[Signature, ...], tuple[Signature, ...]]


def signatures_many(grids: Sequence[np.ndarray]) -> list[Signatures]:
    """(stored, probes) of each luma grid of a batch.

    The matrix products of a crop run on the whole stack of grids in one call, each turn of a
    grid is made once, and a mirrored view reuses its unmirrored products (mirroring flips the
    sign of the odd horizontal frequencies and the order of the gradients): per image, this
    costs half of what one image at a time did, with the same codes to the bit."""
    stack = np.stack(grids)
    views = tuple(dict.fromkeys(STORED_VIEWS + PROBE_VIEWS))
    turned = {d: stack if not d else turn_many(stack, d)
              for d in dict.fromkeys(v.degrees for v in views)}
    products: dict[tuple[float, float], tuple[np.ndarray, np.ndarray]] = {}
    lows, grads = [], []
    for view in views:
        key = (view.degrees, view.keep)
        if key not in products:
            products[key] = _products(turned[view.degrees], view.keep)
        low, grad = products[key]
        if view.mirror:
            low, grad = low * _ODD, grad[..., ::-1]
        lows.append(low)
        grads.append(grad)
    low = np.concatenate(lows).reshape(-1, 64)
    grad = np.concatenate(grads)
    ordered = np.sort(low, axis=1)
    median = (ordered[:, 31] + ordered[:, 32]) / 2
    codes = list(zip(_pack_rows(low > median[:, None] + TIE),
                     _pack_rows(grad[..., 1:] > grad[..., :-1] + TIE)))
    n = len(stack)
    at = {view: k * n for k, view in enumerate(views)}
    return [(tuple(codes[at[v] + i] for v in STORED_VIEWS),
             tuple(codes[at[v] + i] for v in PROBE_VIEWS)) for i in range(n)]


MIN_CELLS = 40
"""The fewest reduced pixels a side may keep: a 512x384 JPEG still takes the 1/8 decode (64x48),
whose rows the grid then shares out exactly."""


def block_scale(size: tuple[int, int]) -> int:
    """The 1/2/4/8 block reduction for an image of ``size``: the largest that keeps both sides
    at ``MIN_CELLS`` or more. A JPEG takes it as a DCT-scaled decode (where it is 8), other
    formats as ``Image.reduce``, so a PNG and a JPEG of the same pixels reach the grid through
    the same cells."""
    short = min(size)
    return next(f for f in (8, 4, 2, 1) if short // f >= MIN_CELLS or f == 1)


def prepare(img: Image.Image) -> None:
    """Ask an opened, not yet loaded JPEG for a reduced DCT decode where that is exact enough.

    Only the 1/8 scale is used: it keeps just each 8x8 block's DC coefficient, which *is* the
    block's mean, so the result equals ``reduce(8)`` of a full decode (to rounding) and a PNG of
    the same pixels reaches the same grid. The 1/2 and 1/4 scales run a smaller inverse DCT whose
    pixels are not block means (a JPEG and its PNG copy then differed by up to 12 bits); images
    too small for 1/8 (a side under 8 x ``MIN_CELLS``) are decoded in full, which costs little
    at that size.
    """
    if img.format in ("JPEG", "MPO") and img.mode in ("L", "RGB") and \
            block_scale(img.size) == 8:
        img.draft(img.mode, (img.width // 8, img.height // 8))


def luma_grid(img: Image.Image, full_size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """The ``GRID`` x ``GRID`` luma grid of a loaded image, and whether it has colour.

    ``full_size`` is the image's size before ``prepare`` (a JPEG's reduced decode is smaller).

    Alpha is ignored (the colour under a transparent pixel counts as drawn). No full-size copy
    is made for L, LA, RGB and RGBA images; other modes are converted first, which costs one
    full-size copy (a palette image without transparency to grey: one byte a pixel).
    """
    palette_colour = None
    if img.mode not in ("L", "LA", "RGB", "RGBA"):
        if img.mode == "P" and "transparency" not in img.info:
            palette = img.getpalette() or []
            used = [i for _, i in img.getcolors(256) or []]
            palette_colour = any(len(set(palette[3 * i:3 * i + 3])) > 1 for i in used)
            img = img.convert("L")  # one byte a pixel, where RGB would take three
        elif img.mode.startswith("I;16") or img.mode == "I":
            scaled = np.asarray(img, dtype=np.float32) / 257.0
            img = Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L")
        elif img.mode == "F":
            img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
        else:
            has_alpha = "A" in img.mode or "transparency" in img.info
            img = img.convert("RGBA" if has_alpha else "RGB")
    small = img
    if small.size == full_size and block_scale(full_size) > 1:
        small = small.reduce(block_scale(full_size))
    again = min(small.size) // (4 * GRID)
    if again > 1:
        small = small.reduce(again)
    px = np.asarray(small, dtype=np.float64)
    if px.ndim == 2:
        luma, colour = px, False
    else:
        rgb = px[..., :3] if small.mode.startswith("RGB") else px[..., :1]
        luma = rgb @ _LUMA if rgb.shape[-1] == 3 else rgb[..., 0]
        colour = False
        if rgb.shape[-1] == 3:
            spread = rgb - luma[..., None]
            colour = bool(np.abs(spread, out=spread).mean() > 2.0)
    if palette_colour is not None:
        colour = palette_colour
    rows, cols = luma.shape
    down, across = grid_weights(rows, full_size[1], GRID), grid_weights(cols, full_size[0], GRID)
    grid = luma if down is IDENTITY else down @ luma
    return grid if across is IDENTITY else grid @ across.T, colour


def to_hex(h: int) -> str:
    return f"{h:016x}"


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


@dataclass(frozen=True)
class ImageHashes:
    sha256: str
    phash: int
    dhash: int
    stored: tuple[Signature, ...]
    probes: tuple[Signature, ...]
    colour: bool


def _decoded_grid(data: bytes) -> tuple[np.ndarray, bool]:
    with Image.open(io.BytesIO(data)) as img:
        full_size = img.size
        prepare(img)
        img.load()
        return luma_grid(img, full_size)


def hash_many(datas: Sequence[bytes]) -> list[ImageHashes]:
    """sha256 and perceptual signatures of each of a batch of encoded images (the first frame
    of an animation), the batch's signatures worked out together as the validator works them
    out (``signatures_many``). An image that does not decode raises for the whole batch (the
    validator rejects it alone instead)."""
    if not datas:
        return []
    grids = [_decoded_grid(data) for data in datas]
    return [ImageHashes(hashlib.sha256(data).hexdigest(), stored[0][0], stored[0][1], stored,
                        probes, colour)
            for data, (_, colour), (stored, probes) in
            zip(datas, grids, signatures_many([grid for grid, _ in grids]))]


def hash_bytes(data: bytes) -> ImageHashes:
    """sha256 and perceptual signatures of encoded image bytes (first frame of an animation)."""
    return hash_many([data])[0]
