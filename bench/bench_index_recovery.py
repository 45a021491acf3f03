"""What a recovering index partition spends turning the journal into its ``load`` payloads.

A partition that restarts (its node was lost) or starts a resumed job reads the whole journal:
every committed unit's URL claims and every written image's stored signatures, since any of
them may hold keys it owns. This writes a journal of ``--n`` unit rows and ``--n`` shard rows
(random 64-bit URL hashes, claims and ids, ``--signatures`` stored signatures an image) to a
temporary directory, then times ``builder.pipeline.index_payloads`` over it for each K: with
``only`` (what a partition actor does: its own payloads alone) and without (every partition's
share). It prints CPU microseconds per unit row and per written image, reading and decoding
the journal's files included, the best of ``--repeats``.

    .venv/bin/python bench/bench_index_recovery.py [--n 20000] [--partitions 1,8,50,200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder.dedup import DedupClient  # noqa: E402
from builder.journal import SHARD_SCHEMA, UNIT_SCHEMA, Journal  # noqa: E402
from builder.pipeline import index_payloads  # noqa: E402
from builder.units import UnitReport, WorkUnit  # noqa: E402

THRESHOLD = 4
ROWS_A_FILE = 1_000


def _full(schema: pa.Schema, columns: dict[str, pa.Array], n: int) -> pa.Table:
    """``columns``, and the schema's others null (a unit row's ``key``, which takes no
    nulls, empty)."""
    given = {"key": pa.array([""] * n), **columns}
    return pa.table({f.name: given.get(f.name, pa.nulls(n, f.type)) for f in schema})


def write_journal(uri: str, n: int, signatures: int) -> None:
    """``n`` unit rows and ``n`` shard rows, ``ROWS_A_FILE`` to a file."""
    rnd = np.random.default_rng(1)
    journal = Journal(uri, "bench", None)
    for f, start in enumerate(range(0, n, ROWS_A_FILE)):
        m = min(ROWS_A_FILE, n - start)
        uid = f"l00-{f:05d}"
        journal.write_unit(WorkUnit(uid=uid, seq=f, kind="list", source=0, start=start),
                           UnitReport(uid), _full(UNIT_SCHEMA, {
                               "url_hash": pa.array(rnd.integers(1, 2**63, m, dtype=np.uint64)),
                               "claim": pa.array(rnd.integers(1, 2**63, m, dtype=np.uint64))},
                               m))
        sigs = rnd.integers(1, 2**63, (m, 2, signatures), dtype=np.uint64)
        journal.write_shard(f"train-{f:05d}", _full(SHARD_SCHEMA, {
            "id": pa.array([f"{x:016x}" for x in rnd.integers(1, 2**63, m)]),
            "claim": pa.array(rnd.integers(1, 2**63, m, dtype=np.uint64)),
            "sig_a": pa.array(sigs[:, 0].tolist(), pa.list_(pa.uint64())),
            "sig_b": pa.array(sigs[:, 1].tolist(), pa.list_(pa.uint64()))}, m))


def best_us(uri: str, k: int, only: Optional[int], n: int, repeats: int) -> float:
    """Best CPU µs per row over ``repeats`` reads of the whole journal."""
    best = float("inf")
    for _ in range(repeats):
        client = DedupClient(THRESHOLD, True, k, None)
        t = time.process_time()
        for _ in index_payloads(client, uri, "bench", None, merge=False, retry=False,
                                journal=True, only=only):
            pass
        best = min(best, time.process_time() - t)
    return best / n * 1e6


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="unit rows, and shard rows")
    ap.add_argument("--partitions", default="1,8,50,200", help="values of K, comma-separated")
    ap.add_argument("--signatures", type=int, default=4, help="stored signatures an image")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"{tmp}/ds"
        write_journal(uri, args.n, args.signatures)
        best_us(uri, 1, None, args.n, 1)  # warm up
        print(f"a journal of {args.n} unit rows and {args.n} written images "
              f"({args.signatures} signatures each); CPU µs a unit row + a written image, "
              f"best of {args.repeats}")
        for k in (int(x) for x in args.partitions.split(",")):
            every = best_us(uri, k, None, args.n, args.repeats)
            alone = best_us(uri, k, k - 1, args.n, args.repeats)
            print(f"  K={k:4d}  every partition's share {every:5.1f}  |  its own alone "
                  f"{alone:5.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
