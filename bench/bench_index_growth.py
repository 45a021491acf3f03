"""Growing a dedup index table as a job does, with and without numpy's huge pages.

A job's near-duplicate table (``builder.dedup.Multimap``) takes every unit's keys and, when
it is half full, is rebuilt into a table twice the size (``Multimap.make_room``). numpy
asks for transparent huge pages for every array of 4 MiB and more unless
``NUMPY_MADVISE_HUGEPAGE=0`` (which ``builder/__init__.py`` sets by default); each new table
then faults in 2 MiB pages that the kernel zeroes. This grows one table to ``--keys`` keys in
units of ``--unit`` keys (256 images x 4 stored views x 50 keys at the default threshold), in
fresh processes, the two settings alternated ``--rounds`` times, and prints the CPU seconds
of the rebuilds and of the whole growth, the page faults, and the CPU seconds of looking up
``LOOKUPS`` units of keys in the grown table, per setting (min, median, max).

    .venv/bin/python bench/bench_index_growth.py [--keys 4000000] [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOOKUPS = 40
"""Units of keys looked up in the grown table, half of them filed (the steady state)."""
SETTINGS = {"huge pages (numpy's default)": "1", "4 KiB pages (the package's default)": "0"}


def grow(keys: int, unit: int, seed: int) -> dict[str, float]:
    """One growth in this process (numpy loaded with the environment's setting)."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from builder.dedup import Multimap

    rnd = np.random.default_rng(seed)
    drawn = rnd.integers(1, 2**63, size=keys, dtype=np.uint64) | np.uint64(1)
    rows = np.arange(keys, dtype=np.int32)
    alive = np.ones(keys, dtype=bool)
    table = Multimap()
    rebuild_s = 0.0
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.process_time()
    for start in range(0, keys, unit):
        part = slice(start, start + unit)
        t1 = time.process_time()
        if table.make_room(len(drawn[part]), lambda: alive):
            rebuild_s += time.process_time() - t1
        table.insert(drawn[part], rows[part])
    total_s = time.process_time() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    probes = rnd.integers(1, 2**63, size=LOOKUPS * unit, dtype=np.uint64) | np.uint64(1)
    probes[::2] = drawn[rnd.integers(0, keys, size=len(probes[::2]))]  # half of them filed
    t1 = time.process_time()
    for start in range(0, len(probes), unit):
        table.lookup(probes[start:start + unit])
    return {"total_s": total_s, "rebuild_s": rebuild_s, "faults": faults,
            "lookup_s": time.process_time() - t1,
            "huge": bool((getattr(np, "_core", None) or np.core)  # numpy.core before 2.0
                         .multiarray._get_madvise_hugepage())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=4_000_000)
    ap.add_argument("--unit", type=int, default=256 * 4 * 50)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(grow(args.keys, args.unit, args.seed)))
        return 0
    results: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, value in SETTINGS.items():
            env = {**os.environ, "NUMPY_MADVISE_HUGEPAGE": value}
            out = subprocess.run([sys.executable, __file__, "--one", "--keys", str(args.keys),
                                  "--unit", str(args.unit), "--seed", str(args.seed)],
                                 env=env, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout)
            if r["huge"] != (value == "1"):
                raise SystemExit(f"numpy did not take NUMPY_MADVISE_HUGEPAGE={value}")
            results[name].append(r)
    print(f"one table grown to {args.keys:,} keys in units of {args.unit:,}, "
          f"{args.rounds} rounds alternated; CPU s and page faults, min / median / max")
    for name, runs in results.items():
        cells = []
        for key in ("rebuild_s", "total_s", "faults", "lookup_s"):
            v = sorted(r[key] for r in runs)
            fmt = "{:,.0f}" if key == "faults" else "{:.2f}"
            cells.append(f"{key} " + " / ".join(fmt.format(x) for x in
                                                (v[0], statistics.median(v), v[-1])))
        print(f"  {name}: " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
