from PIL import Image

from builder.hashing import hamming, hash_bytes
from tests.images import encode, jpeg, picture


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
