"""What a recovering index partition spends building its ``load`` payloads.

A partition that restarts (its node was lost) or starts a resumed job reads the whole journal:
every committed unit's URL claims and every written image's stored signatures, since any of
them may hold keys it owns. ``DedupClient.load_payloads`` turns each chunk into payloads; with
``only`` it builds the recovering partition's alone, without it every partition's share. For
each K this times both over the same synthetic chunk (random 64-bit URL hashes and claims,
``--signatures`` stored signatures an image) and prints CPU microseconds per URL and per
written image, the best of ``--repeats``. Reading the journal's files is not included.

    .venv/bin/python bench/bench_index_recovery.py [--n 20000] [--partitions 1,8,50,200]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder.dedup import DedupClient  # noqa: E402

THRESHOLD = 4


def chunk(n: int, signatures: int) -> tuple[list[tuple[int, int]], list]:
    """``n`` URL claims and ``n`` written images, as ``index_payloads`` hands them over."""
    rnd = np.random.default_rng(1)
    ids = rnd.integers(1, 2**63, n, dtype=np.uint64)
    claims = rnd.integers(1, 2**63, n, dtype=np.uint64)
    sigs = rnd.integers(1, 2**63, (n, signatures, 2), dtype=np.uint64)
    urls = [(int(i), int(c)) for i, c in zip(ids, claims)]
    written = [(int(ids[i]), int(claims[i]), [(int(a), int(b)) for a, b in sigs[i]])
               for i in range(n)]
    return urls, written


def best_us(client: DedupClient, urls: list, written: list, only: Optional[int],
            repeats: int) -> tuple[float, float]:
    """Best CPU µs per URL claim and per written image over ``repeats`` runs."""
    per_url = per_image = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        client.load_payloads(urls, [], only=only)
        per_url = min(per_url, time.process_time() - t)
        t = time.process_time()
        client.load_payloads([], written, only=only)
        per_image = min(per_image, time.process_time() - t)
    return per_url / len(urls) * 1e6, per_image / len(written) * 1e6


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="URLs and written images a chunk")
    ap.add_argument("--partitions", default="1,8,50,200", help="values of K, comma-separated")
    ap.add_argument("--signatures", type=int, default=4, help="stored signatures an image")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    urls, written = chunk(args.n, args.signatures)
    DedupClient(THRESHOLD, True, 1, None).load_payloads(urls, written)  # warm up
    print(f"{args.n} URL claims and written images ({args.signatures} signatures each); "
          "CPU µs each, best of", args.repeats)
    for k in (int(x) for x in args.partitions.split(",")):
        client = DedupClient(THRESHOLD, True, k, None)
        every = best_us(client, urls, written, None, args.repeats)
        alone = best_us(client, urls, written, k - 1, args.repeats)
        print(f"  K={k:4d}  every partition's share: URL {every[0]:5.2f}, image {every[1]:5.1f}"
              f"  |  its own alone: URL {alone[0]:5.2f}, image {alone[1]:5.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
