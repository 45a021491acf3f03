"""Filling an empty ``Multimap`` (every rebuild of a dedup index table) with keys that repeat.

A table is rebuilt by inserting its live keys into an empty one. Stepping (every key probes
one slot per vectorised pass) takes one pass per row of the most popular key, and its work
grows with the square of a key's rows; ``Multimap._fill`` places them all at once. Keys are
drawn from ``distinct`` random 64-bit values with zipf weights (``a``; 0: uniform). For each
case this times the stepping path (forced: the table is marked non-empty) and ``insert`` as it
chooses, checks that both put every key in the same slot, and prints CPU seconds.

    .venv/bin/python bench/bench_multimap_fill.py [--large]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder.dedup import Multimap  # noqa: E402

CASES = [(30_000, 300, 1.1), (100_000, 5_000, 1.3), (1_000_000, 1_000_000, 0.0)]
LARGE = [(1_000_000, 50_000, 1.2)]  # stepping takes minutes here


def draw(rnd: np.random.Generator, n: int, distinct: int, a: float) -> np.ndarray:
    pool = rnd.integers(1, 2**63, size=distinct, dtype=np.uint64)
    if not a:
        return pool[rnd.integers(0, distinct, size=n)]
    weights = 1.0 / np.arange(1, distinct + 1) ** a
    return pool[rnd.choice(distinct, size=n, p=weights / weights.sum())]


def timed_insert(keys: np.ndarray, stepping: bool) -> tuple[float, np.ndarray]:
    m = Multimap(2 * len(keys))
    if stepping:
        m.count = 1  # a table that is not empty is never filled at once
    start = time.process_time()
    m.insert(keys, np.arange(len(keys), dtype=np.int32))
    return time.process_time() - start, m.keys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", action="store_true", help="also 1M keys of 50k (minutes)")
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    rnd = np.random.default_rng(args.seed)
    for n, distinct, a in CASES + (LARGE if args.large else []):
        keys = draw(rnd, n, distinct, a)
        step_s, step_keys = timed_insert(keys, stepping=True)
        now_s, now_keys = timed_insert(keys, stepping=False)
        if not np.array_equal(step_keys, now_keys):
            print(f"placements differ for {n} keys of {distinct}", file=sys.stderr)
            return 1
        print(f"{n:>9} keys of {distinct:>9} distinct, zipf {a}: stepping {step_s:8.3f} s, "
              f"insert {now_s:.3f} s (same slots)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
