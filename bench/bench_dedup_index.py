"""The partitioned dedup index at scale: decisions per second and memory per kept image.

Fills the index with ``--sizes`` kept images (written state, ``--stored`` signatures each),
then times units of ``--unit`` new images (``--probes`` signatures each) through
``DedupClient.decide`` + ``settle`` (what a worker does per unit). Per size it prints:

* decisions/s per partition: decisions over the CPU time spent inside that partition's methods
  (what one ``DedupPartitionActor`` would do), the busiest partition;
* decisions/s per core: decisions over the CPU time of all partitions together;
* decisions/s end to end in one process (client routing and deciding included, K partitions);
* memory per kept image (the partitions' numpy arrays over the kept images);
* the bytes of numpy arrays sent to the partitions per decision (check and settle payloads:
  what crosses Ray's object store when the partitions are actors);
* the share of the timed partition's CPU spent in ``settle`` (``settle%``);
* the stored entries a probe key meets in its bucket (mean, and the most for one key) in
  partition 0: the lookup work, which skewed hashes make grow with the index.

``--ray`` runs the K partitions as the job's ``DedupPartitionActor``s on a local Ray (filled
through their ``load``, as a restarted partition recovers) and reports, per size, each actor
process's resident and unique memory (RSS, USS; the most of the K, and per kept image over all
K less the same actors empty), the actors' CPU per decision (their processes' CPU clocks) and
decisions/s end to end from this process, object store transfers included.

``--one-partition`` fills only partition 0 of ``K`` with its share of the index (the others
stay empty, so the end-to-end figures do not apply) and times it alone: the per-actor figure
at sizes whose whole index does not fit this machine (10M kept images at ``t`` = 8 take
about 70-80 GB with K = 1).

Hashes: ``--hashes skewed`` (default) draws them like real photos' pHash/dHash: per-bit
biases measured on real photographs (``--photos``, a folder of JPEG/PNG; every stored view's
signature of tiles of them, as ``builder.hashing.hash_bytes`` computes it), a third of them as
near copies (6-14 bits off) of earlier ones; ``uniform`` draws random 64-bit codes. The
figures in bench/README.md used the photos of Debian's mate-backgrounds, ukui-wallpapers and
lomiri-wallpapers packages (``apt-get download PKG && dpkg -x PKG_*.deb /tmp/bg``):

    python bench/bench_dedup_index.py --sizes 100000,1000000 --partitions 1,1 --photos /tmp/bg
    python bench/bench_dedup_index.py --sizes 100000,1000000,10000000 --partitions 32,32,32 \\
        --one-partition --photos /tmp/bg
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_driver import driver_sample  # noqa: E402
from builder.dedup import (DedupClient, DedupDecision, DedupItem,  # noqa: E402
                           DedupPartition, KeyScheme, mix64, partition_of)

U64 = np.uint64


def photo_bits(folder: str, limit: int = 400) -> np.ndarray:
    """Per-bit frequency of 1s in pHash and dHash ([2, 64]) over tiles of real photos (every
    stored view's signature, as the validator computes them: ``builder.hashing.hash_bytes``)."""
    from PIL import Image

    from builder.hashing import hash_bytes

    codes = []
    paths = [p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    for path in sorted(paths)[:limit]:
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            step = max(256, min(w, h) // 4)
            for x in range(0, w - step + 1, step):
                for y in range(0, h - step + 1, step):
                    tile = img.crop((x, y, x + step, y + step))
                    buf = io.BytesIO()
                    tile.save(buf, "JPEG", quality=90)
                    codes.extend(hash_bytes(buf.getvalue()).stored)
    if not codes:
        raise SystemExit(f"no photos under {folder}")
    arr = np.array(codes, dtype=U64)
    bits = ((arr[:, :, None] >> np.arange(63, -1, -1, dtype=U64)) & U64(1)).astype(np.float64)
    print(f"per-bit frequencies from {len(codes)} tiles of {min(len(paths), limit)} photos")
    return bits.mean(axis=0)


def draw(n: int, rng: np.random.Generator, freq: np.ndarray | None,
         chunk: int = 1_000_000) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (a, b) codes: from per-bit frequencies (or uniform), a third near copies of earlier
    ones. Drawn ``chunk`` codes at a time, so 40M codes fit in memory."""
    if freq is None:
        a = rng.integers(0, 2**63, n, dtype=U64) | (rng.integers(0, 2, n, dtype=U64) << U64(63))
        b = rng.integers(0, 2**63, n, dtype=U64) | (rng.integers(0, 2, n, dtype=U64) << U64(63))
        return a, b
    weights = U64(1) << np.arange(63, -1, -1, dtype=U64)
    a, b = np.empty(n, dtype=U64), np.empty(n, dtype=U64)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        for arr, row in zip((a, b), freq):
            bits = rng.random((m, 64)) < row[None, :]
            arr[start:start + m] = (bits.astype(U64) * weights[None, :]).sum(axis=1, dtype=U64)
    copies = rng.random(n) < 1 / 3
    src = rng.integers(0, n, copies.sum())
    flips = rng.integers(6, 15, copies.sum())
    for arr in (a, b):
        noise = np.zeros(copies.sum(), dtype=U64)
        for k in range(14):
            bit = U64(1) << rng.integers(0, 64, copies.sum()).astype(U64)
            noise ^= np.where(flips > k, bit, U64(0))
        arr[copies] = arr[src] ^ noise
    return a, b


def fill(load: Callable[[int, dict], None], k: int, scheme: KeyScheme, a: np.ndarray,
         b: np.ndarray, per_image: int, only: int | None = None, chunk: int = 500_000) -> None:
    """Load kept images (``per_image`` consecutive signatures each) straight into the
    partitions (``load(partition, payload)``), vectorised (as a journal rebuild does); ``only``:
    into that partition alone (what it would hold of the whole index; the others stay empty)."""
    filled = range(k) if only is None else [only]
    for start in range(0, len(a), chunk):
        ca, cb = a[start:start + chunk], b[start:start + chunk]
        ids = (np.arange(start, start + len(ca), dtype=U64) // U64(per_image)) + U64(1)
        keys, _ = scheme.keys(ca, cb)
        flat = keys.ravel()
        rep = np.repeat(np.arange(len(ca)), scheme.n_keys)
        part = partition_of(flat, k)
        for p in filled:
            sel = part == p
            r = rep[sel]
            load(p, {"n_key": flat[sel], "n_a": ca[r], "n_b": cb[r], "n_id": ids[r],
                     "n_claim": ids[r]})
        first = ids[np.arange(len(ids)) % per_image == 0] if per_image > 1 else ids
        xp = partition_of(mix64(first), k)
        for p in filled:
            load(p, {"x_id": first[xp == p], "x_claim": first[xp == p]})


class Timed:
    """Partitions in this process, timing the CPU each spends in its methods; for partition 0
    also counts (untimed) the stored entries each probe key meets in its bucket."""

    def __init__(self, parts: list[DedupPartition]):
        self.parts = parts
        self.cpu = [0.0] * len(parts)
        self.by_method: dict[tuple[int, str], float] = {}
        self.probe_keys = self.met = self.met_max = 0
        self.sent = 0

    async def call(self, p: int, method: str, payload: dict) -> object:
        self.sent += sum(getattr(v, "nbytes", 0) for v in payload.values())
        if p == 0 and method == "check" and len(payload.get("q_key", ())):
            qi, _ = self.parts[0]._near.lookup(payload["q_key"])
            self.probe_keys += len(payload["q_key"])
            self.met += len(qi)
            self.met_max = max(self.met_max, int(np.bincount(qi).max()) if len(qi) else 0)
        t0 = time.process_time()
        result = getattr(self.parts[p], method)(payload)
        spent = time.process_time() - t0
        self.cpu[p] += spent
        self.by_method[p, method] = self.by_method.get((p, method), 0.0) + spent
        return result


def unit_batches(rng: np.random.Generator, freq: np.ndarray | None, unit: int, units: int,
                 stored: int, probes: int) -> list[list[DedupItem]]:
    """``units`` units of ``unit`` new images, each with ``probes`` signatures (the first
    ``stored`` of them its stored ones)."""
    items_a, items_b = draw(unit * units * probes, rng, freq)
    sig = [(int(x), int(y)) for x, y in zip(items_a, items_b)]
    batches = []
    for u in range(units):
        batch = []
        for i in range(unit):
            n = u * unit + i
            j = n * probes
            batch.append(DedupItem(10**12 + n, n, 10**12 + n, sig[j:j + stored],
                                   sig[j:j + probes]))
        batches.append(batch)
    return batches


async def decide_unit(client: DedupClient, batch: list[DedupItem]) -> list[DedupDecision]:
    """A unit's final decisions, as a worker makes them: each round settled (the held as
    dropped), the held decided again until none is (no later stage refuses an image here)."""
    final: dict[int, DedupDecision] = {}
    while batch:
        out = await client.decide(batch)
        keep = [not d.duplicate and not d.held for d in out]
        await client.settle(batch, keep, [not k for k in keep])
        final.update({id(it): d for it, d in zip(batch, out) if not d.held})
        batch = [it for it, d in zip(batch, out) if d.held]
    return list(final.values())


def run(size: int, k: int, unit: int, units: int, t: int, freq: np.ndarray | None,
        seed: int, stored: int, probes: int, one: bool) -> dict:
    """Fill, then time ``units`` units; ``one``: only partition 0 holds its share of the kept
    images and only its CPU is timed (the end-to-end figures then do not apply)."""
    rng = np.random.default_rng(seed)
    scheme = KeyScheme(t)
    parts = [DedupPartition(t, True) for _ in range(k)]
    a, b = draw(size * stored, rng, freq)
    t0 = time.monotonic()
    fill(lambda p, payload: parts[p].load(payload), k, scheme, a, b, stored,
         0 if one else None)
    load_s = time.monotonic() - t0
    del a, b
    part_bytes = [p.stats()["bytes"] for p in parts]
    mem = part_bytes[0] * k if one else sum(part_bytes)
    timed = Timed(parts)
    client = DedupClient(t, True, k, timed.call)
    decisions = dups = 0
    cpu0 = time.process_time()
    for batch in unit_batches(rng, freq, unit, units, stored, probes):
        out = asyncio.run(decide_unit(client, batch))
        decisions += len(out)
        dups += sum(d.duplicate for d in out)
    total_cpu = time.process_time() - cpu0
    busiest = 0 if one else int(np.argmax(timed.cpu))
    timed_cpu = timed.cpu[busiest]
    settle_cpu = timed.by_method.get((busiest, "settle"), 0.0)
    return {"kept": size, "partitions": k, "one": one, "load_s": round(load_s, 1),
            "per_partition_decisions_s": round(decisions / timed_cpu) if timed_cpu else 0,
            "per_core_decisions_s": None if one else round(decisions / sum(timed.cpu)),
            "end_to_end_decisions_s": None if one else round(decisions / total_cpu),
            "partition_mib": round(max(part_bytes) / 2**20),
            "met_per_probe_key": round(timed.met / max(timed.probe_keys, 1), 2),
            "met_max": timed.met_max,
            "sent_per_decision": round(timed.sent / max(decisions, 1)),
            "settle_share": round(100 * settle_cpu / timed_cpu) if timed_cpu else 0,
            "bytes_per_kept": round(mem / size), "duplicates": dups, "decisions": decisions}


class ProcSample(NamedTuple):
    cpu: float
    """User + system CPU seconds."""
    rss: int
    uss: int
    """Resident bytes in no other process."""


def proc_sample(pid: int) -> ProcSample:
    """CPU and memory of a live process (``bench_driver.driver_sample``, plus its USS)."""
    sample = driver_sample(pid)
    if sample is None:
        raise SystemExit(f"process {pid} is gone: a partition actor died")
    uss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                uss += int(line.split()[1]) * 1024
    return ProcSample(*sample, uss)


def run_ray(size: int, k: int, unit: int, units: int, t: int, freq: np.ndarray | None,
            seed: int, stored: int, probes: int) -> dict:
    """The same fill and units through ``k`` ``DedupPartitionActor``s on the local Ray."""
    import ray

    from actors.dedup import DedupPartitionActor

    rng = np.random.default_rng(seed)
    scheme = KeyScheme(t)
    actors = [DedupPartitionActor.options(num_cpus=0.1).remote(p, k, t, True)
              for p in range(k)]
    pids = ray.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in actors])
    empty = [proc_sample(pid) for pid in pids]
    a, b = draw(size * stored, rng, freq)
    pending: list[Any] = []

    def load(p: int, payload: dict) -> None:
        pending.append(actors[p].call.remote("load", payload))
        if len(pending) >= 2 * k:  # a bounded share of the object store in flight
            ray.get(pending)
            pending.clear()

    t0 = time.monotonic()
    fill(load, k, scheme, a, b, stored)
    ray.get(pending)
    load_s = time.monotonic() - t0
    del a, b
    index_bytes = sum(st["bytes"] for st in ray.get([x.stats.remote() for x in actors]))
    filled = [proc_sample(pid) for pid in pids]

    async def call(p: int, method: str, payload: dict) -> Any:
        return (await actors[p].call.remote(method, payload))[1]

    client = DedupClient(t, True, k, call)
    batches = unit_batches(rng, freq, unit, units, stored, probes)

    async def decide_all() -> tuple[int, int]:
        decisions = dups = 0
        for batch in batches:
            out = await decide_unit(client, batch)
            decisions += len(out)
            dups += sum(d.duplicate for d in out)
        return decisions, dups

    t0 = time.monotonic()
    decisions, dups = asyncio.run(decide_all())
    wall = time.monotonic() - t0
    after = [proc_sample(pid) for pid in pids]
    for actor in actors:
        ray.kill(actor)
    actor_cpu = sum(m.cpu for m in after) - sum(m.cpu for m in filled)
    grown_rss = sum(m.rss for m in after) - sum(m.rss for m in empty)
    grown_uss = sum(m.uss for m in after) - sum(m.uss for m in empty)
    return {"kept": size, "partitions": k, "load_s": round(load_s, 1),
            "end_to_end_decisions_s": round(decisions / wall),
            "actor_cpu_us_per_decision": round(1e6 * actor_cpu / decisions),
            "index_bytes_per_kept": round(index_bytes / size),
            "rss_filled_mib": round(max(m.rss for m in filled) / 2**20),
            "rss_max_mib": round(max(m.rss for m in after) / 2**20),
            "uss_max_mib": round(max(m.uss for m in after) / 2**20),
            "rss_per_kept": round(grown_rss / size), "uss_per_kept": round(grown_uss / size),
            "duplicates": dups, "decisions": decisions}


COLUMNS = [("kept", "kept", 10), ("K", "partitions", 3),
           ("per-partition/s", "per_partition_decisions_s", 16),
           ("per-core/s", "per_core_decisions_s", 11),
           ("end-to-end/s", "end_to_end_decisions_s", 13), ("part MiB", "partition_mib", 9),
           ("B/kept", "bytes_per_kept", 7), ("dups", "duplicates", 6),
           ("met/key", "met_per_probe_key", 8), ("met max", "met_max", 8),
           ("sent B/d", "sent_per_decision", 9), ("settle%", "settle_share", 8),
           ("load s", "load_s", 7)]
"""(header, result key, width) of each column of the in-process table."""
RAY_COLUMNS = [("kept", "kept", 10), ("K", "partitions", 3),
               ("end-to-end/s", "end_to_end_decisions_s", 13),
               ("actor CPU us/d", "actor_cpu_us_per_decision", 15),
               ("index B/kept", "index_bytes_per_kept", 13), ("RSS B/kept", "rss_per_kept", 11),
               ("USS B/kept", "uss_per_kept", 11), ("RSS filled", "rss_filled_mib", 11),
               ("RSS max", "rss_max_mib", 8), ("USS max", "uss_max_mib", 8),
               ("dups", "duplicates", 6), ("load s", "load_s", 7)]


def print_row(columns: list[tuple[str, str, int]], result: dict | None = None) -> None:
    """The header (no ``result``) or one result's row; a figure that does not apply is -."""
    cells = [head if result is None else result[key] for head, key, _ in columns]
    print(" ".join(f"{'-' if cell is None else cell:>{width}}"
                   for cell, (_, _, width) in zip(cells, columns)), flush=True)


def main_ray(args: argparse.Namespace, sizes: list[int], ks: list[int],
             freq: np.ndarray | None) -> None:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(include_dashboard=False, logging_level="ERROR")
    print_row(RAY_COLUMNS)
    for size, k in zip(sizes, ks):
        print_row(RAY_COLUMNS, run_ray(size, k, args.unit, args.units, args.threshold, freq,
                                       args.seed, args.stored, args.probes))
    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--partitions", default="1,1", help="K per size (comma-separated)")
    ap.add_argument("--one-partition", action="store_true",
                    help="fill and time partition 0 alone (its share of the whole index): "
                         "per-actor figures for indexes too big for this machine")
    ap.add_argument("--unit", type=int, default=256)
    ap.add_argument("--units", type=int, default=40)
    ap.add_argument("--threshold", type=int, default=8)
    ap.add_argument("--stored", type=int, default=4, help="stored signatures per image")
    ap.add_argument("--probes", type=int, default=6, help="probe signatures per image")
    ap.add_argument("--hashes", choices=("skewed", "uniform"), default="skewed")
    ap.add_argument("--photos", default="/usr/share/backgrounds")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--ray", action="store_true",
                    help="the partitions as DedupPartitionActors on a local Ray: their "
                         "processes' memory and CPU")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    ks = [int(k) for k in args.partitions.split(",")]
    freq = photo_bits(args.photos) if args.hashes == "skewed" else None
    if args.ray:
        if args.one_partition:
            raise SystemExit("--ray fills every partition: drop --one-partition")
        main_ray(args, sizes, ks, freq)
        return
    print_row(COLUMNS)
    for size, k in zip(sizes, ks):
        print_row(COLUMNS, run(size, k, args.unit, args.units, args.threshold, freq, args.seed,
                               args.stored, args.probes, args.one_partition))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB; pid {os.getpid()}")


if __name__ == "__main__":
    main()
