import io

from PIL import Image

from builder.dedup import DedupIndex, _chunks
from builder.hashing import hamming, hash_bytes
from builder.reasons import Reason
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


def test_chunks_cover_64_bits():
    for t in range(0, 33):
        chunks = _chunks(t)
        assert sum(w for _, w in chunks) == 64 and len(chunks) == min(t + 1, 64)


def test_index_exact_near_and_first_wins():
    idx = DedupIndex(threshold=4)
    assert not idx.check_and_add("a", "sha-a", 0xF0F0F0F0F0F0F0F0, 0x1234).duplicate
    d = idx.check_and_add("b", "sha-a", 0x0, 0x0)
    assert d.reason == Reason.EXACT_DUPLICATE and d.kept_id == "a"
    d = idx.check_and_add("c", "sha-c", 0xF0F0F0F0F0F0F0F0 ^ 0b1011, 0x1234 ^ 0b1)
    assert d.reason == Reason.NEAR_DUPLICATE and d.kept_id == "a" and d.distance == 3
    assert not idx.check_and_add("e", "sha-e", 0xF0F0F0F0F0F0F0F0 ^ 0b11111, 0x1234).duplicate
    assert not idx.check_and_add("f", "sha-f", 0xF0F0F0F0F0F0F0F0 ^ 0b1, 0xFFFF0000).duplicate


def test_index_matches_linear_scan():
    import random

    rnd = random.Random(3)
    idx = DedupIndex(threshold=6)
    kept: list[tuple[str, int, int]] = []
    for i in range(1500):
        if kept and rnd.random() < 0.3:
            _, p, d = rnd.choice(kept)
            p ^= sum(1 << rnd.randrange(64) for _ in range(rnd.randrange(9)))
        else:
            p, d = rnd.getrandbits(64), rnd.getrandbits(64)
        expect = any(hamming(p, kp) <= 6 and hamming(d, kd) <= 6 for _, kp, kd in kept)
        got = idx.check_and_add(str(i), f"s{i}", p, d).duplicate
        assert got == expect
        if not got:
            kept.append((str(i), p, d))


def test_remove_and_state_roundtrip():
    idx = DedupIndex(threshold=2)
    idx.check_and_add("a", "sa", 1, 1)
    idx.check_and_add("b", "sb", 1 << 40, 1 << 40)
    again = DedupIndex.from_state(idx.state())
    assert again.find("sa", 99, 99).kept_id == "a"
    assert again.find("zz", 1, 1).reason == Reason.NEAR_DUPLICATE
    idx.remove("a")
    assert not idx.find("sa", 1, 1).duplicate
