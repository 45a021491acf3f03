"""The machine's limit for a build: the CPU per image no pipeline can avoid, in one process.

    .venv/bin/python bench/work_floor.py URLS_FILE [--json OUT] [--cores C]

Each stage runs over every URL of the file, one stage after another, on one thread of this one
process, timed by the process's CPU clock:

- fetch: every URL from the loopback server (aiohttp, 64 connections, the body read whole);
- decode + signatures: ``builder.hashing.hash_many`` over batches of ``VALIDATE_BATCH`` images,
  as the validator runs it (the JPEG draft decode to the luma grid, then pHash and dHash of
  the stored and probe views of the batch together, sha256);
- sha256 alone (part of the line above, shown for scale);
- Parquet: the bytes, url, sha256 and both hashes written as Parquet shards of 1,000 rows,
  the image column uncompressed and without statistics, as ``builder.writers`` writes it.

This process fixes glibc's malloc thresholds (``builder.malloc``, which the runner applies to
its own process only): at the defaults, each batch's temporaries were mapped and faulted in
afresh, 0.74 against 0.59 ms of CPU per image for the decode and signatures of the
20,000-photo corpus. The shard worker processes keep the defaults and, as measured, do not pay
that (their page faults and CPU do not change with the thresholds set in the environment), so
the floor is taken at its cheaper figure.

Their sum is the floor per image; cores x 1000 / floor-ms is the most images/s any build can
reach on this machine (``bench_vs_img2dataset.py`` runs this in the same bench, under the same
load, and reports each tool's share of it).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from builder.hashing import hash_many, to_hex  # noqa: E402
from builder.malloc import fix_mmap_threshold  # noqa: E402
from builder.worker import VALIDATE_BATCH  # noqa: E402


async def _fetch_all(urls: list[str], connections: int = 64) -> list[bytes]:
    out: list[bytes] = [b""] * len(urls)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(urls)):
        queue.put_nowait(i)
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections)) as session:
        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                async with session.get(urls[i]) as resp:
                    resp.raise_for_status()
                    out[i] = await resp.read()

        await asyncio.gather(*(worker() for _ in range(connections)))
    return out


def _write_parquet(path: str, urls: list[str], bodies: list[bytes], hashes: list) -> None:
    pq.write_table(pa.table({
        "url": urls,
        "image": pa.array(bodies, pa.binary()),
        "sha256": [h.sha256 for h in hashes],
        "phash": [to_hex(h.phash) for h in hashes],
        "dhash": [to_hex(h.dhash) for h in hashes],
    }), path, compression={"url": "zstd", "image": "none", "sha256": "zstd", "phash": "zstd",
                           "dhash": "zstd"},
        use_dictionary=False, write_statistics=["url", "sha256", "phash", "dhash"])


def _warm_up(url: str) -> None:
    """One image through every stage untimed: first-call costs (lazy imports, the DCT
    matrices, Arrow's writer) are per process, not per image."""
    body = asyncio.run(_fetch_all([url]))
    hashes = hash_many(body)
    with tempfile.TemporaryDirectory(prefix="floor-") as tmp:
        _write_parquet(os.path.join(tmp, "warm.parquet"), [url], body, hashes)


def measure(urls: list[str]) -> dict[str, float]:
    """CPU milliseconds per image of each unavoidable stage, in this process."""
    n = len(urls)
    _warm_up(urls[0])
    t0 = time.process_time()
    bodies = asyncio.run(_fetch_all(urls))
    t1 = time.process_time()
    hashes = [h for at in range(0, n, VALIDATE_BATCH)
              for h in hash_many(bodies[at:at + VALIDATE_BATCH])]
    t2 = time.process_time()
    for b in bodies:
        hashlib.sha256(b).digest()
    t3 = time.process_time()
    with tempfile.TemporaryDirectory(prefix="floor-") as tmp:
        for s in range(0, n, 1000):
            _write_parquet(os.path.join(tmp, f"{s // 1000:05d}.parquet"), urls[s:s + 1000],
                           bodies[s:s + 1000], hashes[s:s + 1000])
        t4 = time.process_time()
    ms = lambda a, b: 1000 * (b - a) / n  # noqa: E731
    out = {"fetch": ms(t0, t1), "decode+signatures+sha256": ms(t1, t2), "sha256": ms(t2, t3),
           "parquet": ms(t3, t4)}
    out["floor"] = out["fetch"] + out["decode+signatures+sha256"] + out["parquet"]
    out["mean_kib"] = sum(map(len, bodies)) / n / 1024
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("urls", type=Path, help="a file of URLs, one a line")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    urls = [u for u in args.urls.read_text().split() if u]
    fix_mmap_threshold()
    figures = measure(urls)
    figures["cores"] = args.cores
    figures["limit_images_per_s"] = args.cores * 1000 / figures["floor"]
    print(f"floor over {len(urls)} images ({figures['mean_kib']:.1f} KiB mean), CPU ms per "
          f"image in one process: fetch {figures['fetch']:.2f} + decode/signatures/sha256 "
          f"{figures['decode+signatures+sha256']:.2f} (sha256 alone {figures['sha256']:.2f}) "
          f"+ Parquet {figures['parquet']:.2f} = {figures['floor']:.2f} ms; x {args.cores} "
          f"cores: limit {figures['limit_images_per_s']:.0f} images/s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
