import io

import numpy as np
from PIL import Image

from builder.hashing import (FULL, GRID, MIRROR, STORED_VIEWS, Signatures, hamming, hash_bytes,
                             hash_many, luma_grid, prepare, signatures_many, turn_many)
from tests.images import encode, jpeg, picture


def signatures(grid: np.ndarray) -> Signatures:
    """The codes of one grid, worked out alone."""
    return signatures_many([grid])[0]


def test_hashes_stable_and_discriminative():
    a, a2 = hash_bytes(jpeg(1)), hash_bytes(jpeg(1))
    assert a == a2 and len(a.sha256) == 64
    others = [hash_bytes(jpeg(s)) for s in range(2, 12)]
    assert min(hamming(a.phash, o.phash) for o in others) > 8


def test_near_duplicates_are_close():
    img = picture(7, (400, 300))
    orig = hash_bytes(encode(img, "JPEG", quality=90))
    small = img.resize((360, 270), Image.Resampling.LANCZOS)
    near = hash_bytes(encode(small, "JPEG", quality=60))
    png = hash_bytes(encode(img, "PNG"))
    assert hamming(orig.phash, near.phash) <= 4 and hamming(orig.dhash, near.dhash) <= 4
    assert hamming(orig.phash, png.phash) <= 2
    assert orig.sha256 != near.sha256


def _grids() -> list[np.ndarray]:
    grids = []
    for seed, size, fmt in ((1, (512, 384), "JPEG"), (2, (300, 420), "PNG"),
                            (3, (1200, 800), "JPEG"), (4, (90, 60), "PNG")):
        with Image.open(io.BytesIO(encode(picture(seed, size), fmt))) as img:
            full = img.size
            prepare(img)
            img.load()
            grids.append(luma_grid(img, full)[0])
    return grids + [np.full((GRID, GRID), 7.0)]


def test_a_batch_gives_each_grid_the_codes_it_gets_alone():
    grids = _grids()
    assert signatures_many(grids) == [signatures(g) for g in grids]
    assert signatures_many(grids[::-1]) == [signatures(g) for g in grids[::-1]]


def test_hashing_a_batch_gives_each_image_what_it_gets_alone():
    datas = [jpeg(1), encode(picture(2, (300, 420)), "PNG"), jpeg(3, (1200, 800)), jpeg(1)]
    assert hash_many(datas) == [hash_bytes(d) for d in datas]
    assert hash_many(datas[::-1]) == [hash_bytes(d) for d in datas[::-1]]
    assert hash_many([]) == []


def test_turning_a_batch_equals_pillows_bilinear_rotate_to_the_bit():
    """The probes' turned views must be what they were when each grid went through Pillow:
    real grids, noise with values of every size, and a batch longer than one pass."""
    rng = np.random.default_rng(5)
    noise = [rng.random((GRID, GRID)) * 10.0 ** rng.integers(-3, 4) for _ in range(35)]
    grids = np.stack(_grids() + noise)
    for degrees in (3.5, -3.5, 0.25, 17.3, -90.0, 181.0):
        want = np.stack([np.asarray(Image.fromarray(g.astype(np.float32), "F").rotate(
            degrees, Image.Resampling.BILINEAR), dtype=np.float64) for g in grids])
        assert np.array_equal(turn_many(grids, degrees), want), degrees


def test_the_mirror_view_is_the_full_view_of_the_mirrored_grid():
    """The mirrored view reuses the full view's products; it must equal hashing the mirror."""
    for grid in _grids()[:4]:
        stored, _ = signatures(grid)
        mirrored, _ = signatures(np.ascontiguousarray(grid[:, ::-1]))
        assert stored[STORED_VIEWS.index(MIRROR)] == mirrored[STORED_VIEWS.index(FULL)]
        assert stored[STORED_VIEWS.index(MIRROR)] != stored[STORED_VIEWS.index(FULL)]


def test_the_grid_is_the_exact_area_mean_of_the_picture():
    """Sides that the grid does not divide: each cell averages its fractional share of pixels
    (worked out here by repeating every pixel GRID times along each axis)."""
    img = picture(11, (90, 60)).convert("RGB")
    grid, _ = luma_grid(img, img.size)
    luma = np.asarray(img, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])
    rows = np.repeat(luma, GRID, axis=0).reshape(GRID, 60, 90).mean(axis=1)
    want = np.repeat(rows, GRID, axis=1).reshape(GRID, GRID, 90).mean(axis=2)
    assert np.allclose(grid, want, rtol=0, atol=1e-9)


def test_an_axis_of_the_grids_own_cells_skips_its_product_and_changes_no_bit():
    """A 512-pixel side decoded at 1/8 is the grid's 64 cells: its weights are the identity,
    whose product luma_grid skips. The grid must equal the full product to the bit, or the
    codes of such images would change with this shortcut."""
    from builder.hashing import IDENTITY, grid_weights

    assert grid_weights(64, 512, GRID) is IDENTITY and grid_weights(48, 384, GRID) is not IDENTITY
    for size in ((512, 384), (384, 512), (512, 512), (640, 480)):
        with Image.open(io.BytesIO(encode(picture(5, size).convert("RGB"), "JPEG"))) as img:
            prepare(img)
            img.load()
            grid, _ = luma_grid(img, size)
            luma = np.asarray(img, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])
        rows, cols = luma.shape
        down = np.array(grid_weights(rows, size[1], GRID))
        across = np.array(grid_weights(cols, size[0], GRID))
        assert np.array_equal(grid, down @ luma @ across.T)


def test_codes_do_not_depend_on_float_rounding():
    """Flat parts give equal gradients and coefficients; arithmetic done in another order
    (noise far below a grey level) must not set their bits at random."""
    rng = np.random.default_rng(3)
    flat_top = _grids()[0].copy()
    flat_top[: GRID // 2] = 255.0
    for grid in (flat_top, np.full((GRID, GRID), 7.0), _grids()[2]):
        noisy = grid + rng.uniform(-1e-9, 1e-9, grid.shape)
        assert signatures(noisy) == signatures(grid)
