"""Hashing speed: decode + sha256 + near-duplicate signatures of 512 px JPEGs, on one core.

    .venv/bin/python bench/bench_hashing.py [--n 2000] [--repeat 3] [--corpus photos]

Prints images/s for PixCrawler's hashing (``builder.hashing.hash_bytes``: the luma grid, then
pHash and dHash of 4 stored and 6 probe views) and, in the same run as a baseline, one plain
pHash + dHash pair on a full-size decode (the single-signature hashing of before); and the
medium-level validator (``builder.validate.ImageValidator``), which does the format/size checks
and the signatures on one decode, one image at a time and in batches of 64 (as the shard
workers call it: a batch's signatures are worked out together). The process is pinned to one
CPU. ``--corpus photos`` times the crops of real photographs of ``bench/photo_corpus.py``
(built once; the first ``--n`` of a 4,000-photo pack) instead of generated pictures.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from PIL import Image  # noqa: E402

import numpy as np  # noqa: E402

from builder.hashing import hash_bytes  # noqa: E402
from builder.records import Candidate, Record  # noqa: E402
from builder.spec import ValidationSpec  # noqa: E402
from builder.validate import ImageValidator  # noqa: E402
from tests.images import jpeg  # noqa: E402
from loopback import pack_bodies  # noqa: E402
from photo_corpus import photo_pack  # noqa: E402


def corpus(n: int) -> list[bytes]:
    sizes = [(512, 384), (384, 512), (512, 512), (512, 341)]
    return [jpeg(i, sizes[i % len(sizes)], quality=85) for i in range(n)]


def photos(n: int) -> list[bytes]:
    """The first ``n`` crops of the 4,000-photo pack (``photo_corpus.photo_pack``)."""
    return pack_bodies(*photo_pack(max(n, 4000)), n)


_K = np.arange(32)[:, None]
_DCT8 = (np.cos(np.pi * (2 * np.arange(32)[None, :] + 1) * _K / 64) * np.sqrt(2 / 32))[:8]


def full_decode_hashes(data: bytes) -> tuple[str, int, int]:
    """The baseline: one pHash + dHash pair of a full decode, as hashed before the views."""
    with Image.open(io.BytesIO(data)) as img:
        gray = img.convert("L")
    px = np.asarray(gray.resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float64)
    low = _DCT8 @ px @ _DCT8.T
    d = np.asarray(gray.resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    pack = lambda bits: int.from_bytes(np.packbits(bits.ravel()).tobytes(), "big")  # noqa: E731
    return hashlib.sha256(data).hexdigest(), pack(low > np.median(low)), pack(d[:, 1:] > d[:, :-1])


def rate(fn, items: list[bytes], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for data in items:
            fn(data)
        runs.append(len(items) / (time.perf_counter() - t0))
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--corpus", choices=("generated", "photos"), default="generated")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    items = photos(args.n) if args.corpus == "photos" else corpus(args.n)
    kb = sum(map(len, items)) / len(items) / 1024
    validator = ImageValidator(ValidationSpec(level="medium"))
    ours = rate(hash_bytes, items, args.repeat)
    base = rate(full_decode_hashes, items, args.repeat)
    medium = rate(lambda d: validator.check(Record(Candidate("u", "x"), data=d)), items,
                  args.repeat)
    batches = [items[s:s + 64] for s in range(0, len(items), 64)]
    batched = rate(lambda batch: validator([Record(Candidate("u", "x"), data=d)
                                            for d in batch]), batches, args.repeat)
    batched *= len(items) / len(batches)  # batches/s to images/s
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    what = "crops of real photographs" if args.corpus == "photos" else "generated JPEGs"
    print(f"corpus: {args.n} {what}, 512 px long side, mean {kb:.1f} KB; 1 core; median of "
          f"{args.repeat}")
    print(f"hash_bytes (grid + sha256 + 10 signatures, 6 views): {ours:8.0f} images/s")
    print(f"baseline, full decode + one pHash/dHash pair:       {base:8.0f} images/s")
    print(f"medium validator (checks + signatures, one decode):  {medium:8.0f} images/s")
    print(f"the same in batches of 64:                           {batched:8.0f} images/s "
          f"({1e6 / batched:.0f} us per image)")
    print(f"ratio to the baseline: {ours / base:.2f}x (target: >= 800 images/s)")


if __name__ == "__main__":
    main()
