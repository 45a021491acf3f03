"""Hashing speed: decode + sha256 + pHash + dHash of 512 px JPEGs, on one core.

    .venv/bin/python bench/bench_hashing.py [--n 2000] [--repeat 3]

Prints images/s for PixCrawler's hashing (``builder.hashing.hash_bytes``: a reduced decode via
Image.draft) and, in the same run as a baseline, the same hashes on a full-size decode; and
the medium-level validator (``builder.validate.ImageValidator``), which does the format/size
checks and the hashes on one decode. The process is pinned to one CPU.
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

from PIL import Image  # noqa: E402

from builder.hashing import dhash_gray, hash_bytes, phash_gray  # noqa: E402
from builder.records import Candidate, Record  # noqa: E402
from builder.spec import ValidationSpec  # noqa: E402
from builder.validate import ImageValidator  # noqa: E402
from tests.images import jpeg  # noqa: E402


def corpus(n: int) -> list[bytes]:
    sizes = [(512, 384), (384, 512), (512, 512), (512, 341)]
    return [jpeg(i, sizes[i % len(sizes)], quality=85) for i in range(n)]


def full_decode_hashes(data: bytes) -> tuple[str, int, int]:
    with Image.open(io.BytesIO(data)) as img:
        gray = img.convert("L")
    return hashlib.sha256(data).hexdigest(), phash_gray(gray), dhash_gray(gray)


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
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    items = corpus(args.n)
    kb = sum(map(len, items)) / len(items) / 1024
    validator = ImageValidator(ValidationSpec(level="medium"))
    ours = rate(hash_bytes, items, args.repeat)
    base = rate(full_decode_hashes, items, args.repeat)
    medium = rate(lambda d: validator.check(Record(Candidate("u", "x"), data=d)), items,
                  args.repeat)
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"corpus: {args.n} JPEGs, 512 px long side, mean {kb:.1f} KB; 1 core; median of "
          f"{args.repeat}")
    print(f"hash_bytes (draft decode + sha256 + pHash + dHash): {ours:8.0f} images/s")
    print(f"baseline, full decode + same hashes:               {base:8.0f} images/s")
    print(f"medium validator (checks + hashes, one decode):     {medium:8.0f} images/s")
    print(f"speed-up over the full-decode baseline: {ours / base:.2f}x (target: >= 800 images/s)")


if __name__ == "__main__":
    main()
