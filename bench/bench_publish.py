"""The publish step alone (issue 14): driver CPU per committed unit, and peak RSS, over a
journal of many unit files.

It writes a journal with the real ``Journal`` API, as a crawl of a mostly-404 URL list leaves
it: ``--units`` unit files of ``--per-unit`` candidates each, one candidate in
``--accept-every`` accepted (the others rejected by the fetch stage), and the accepted images
in journal shards of ``--shard-size`` rows (an intent, then the shard), with their Parquet
shards under ``data/``. The journal is written once per shape (kept under
bench/out/publish/), and copied for each measured run: publishing removes it.

Each run is a fresh process that calls ``JobLifecycle.publish`` (orphan intents, manifests,
rejects, stats, card, marker, journal removal) and reports its CPU time (user + system,
``getrusage``; the sampler's share is negligible), CPU per unit, and its RSS: before
publishing, and the peak while publishing (sampled from /proc every 10 ms).

    python bench/bench_publish.py --units 8000 --per-unit 125 [--runs 3] [--profile FILE]

``--profile FILE`` writes a cProfile of the last run (read it with ``pstats``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builder.job import JobCounts, RunOutcome  # noqa: E402
from builder.journal import Journal  # noqa: E402
from builder.pipeline import JobLifecycle  # noqa: E402
from builder.spec import parse_spec  # noqa: E402
from builder.units import ClassTally, UnitReport, WorkUnit  # noqa: E402
from builder.writers import DatasetPublisher  # noqa: E402

OUT = ROOT / "bench" / "out" / "publish"
JOB = "publishbench-00000000"


def spec_for(out: Path, images: int) -> Any:
    return parse_spec({
        "name": "publishbench", "description": "the publish step over a long journal",
        "target": max(1, images), "classes": {"bench": {}},
        "sources": [{"engine": "urllist", "path": str(out / "urls.txt")}],
        "output": {"uri": str(out), "formats": ["parquet"]},
    })


def unit_rows(u: int, per_unit: int, every: int) -> tuple[pa.Table, list[int]]:
    """A unit's decisions, and the candidate numbers it accepted."""
    first = u * per_unit
    nums = range(first, first + per_unit)
    accepted = [i % every == every - 1 for i in nums]
    rows = {
        "key": [f"bench\thttp://127.0.0.1:9/gone/{i}.jpg" for i in nums],
        "url": [f"http://127.0.0.1:9/gone/{i}.jpg" for i in nums],
        "label": ["bench"] * per_unit, "query": [""] * per_unit,
        "engine": ["urllist"] * per_unit,
        "stage": [None if a else "fetch" for a in accepted],
        "reason": [None if a else "http_client_error" for a in accepted],
        "detail": [None if a else "HTTP 404" for a in accepted],
        "duplicate_of": [None] * per_unit,
        "http_status": [None if a else 404 for a in accepted],
        "accepted": accepted,
        "image_id": [f"{i:016x}" if a else None for i, a in zip(nums, accepted)],
        "url_hash": [i + 1 for i in nums], "claim": [i * 7 + 1 for i in nums],
    }
    return pa.table(rows), [i for i, a in zip(nums, accepted) if a]


def shard_rows(name: str, images: list[tuple[str, int]]) -> pa.Table:
    n = len(images)
    return pa.table({
        "id": [f"{i:016x}" for _, i in images], "uid": [uid for uid, _ in images],
        "claim": [i * 7 + 1 for _, i in images], "label": ["bench"] * n,
        "split": ["train"] * n, "path": [f"data/{name}.parquet"] * n, "format": ["jpeg"] * n,
        "width": [512] * n, "height": [384] * n, "bytes": [40_000] * n,
        "sha256": [f"{i:064x}" for _, i in images],
        "url": [f"http://127.0.0.1:9/bench/{i}.jpg" for _, i in images],
        "license": [""] * n, "author": [""] * n,
        "sig_a": [[i, i + 1] for _, i in images], "sig_b": [[i, i + 2] for _, i in images],
    })


def build(dest: Path, units: int, per_unit: int, every: int, shard_size: int) -> None:
    """Write the journal (and the data/ shards its shards name) into ``dest``."""
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "data").mkdir(parents=True)
    journal = Journal(str(dest), JOB)
    journal.start(spec_for(dest, units * per_unit // every))
    pending: list[tuple[str, int]] = []
    shard = 0

    def flush() -> None:
        nonlocal shard, pending
        name = f"train-{shard:05d}"
        journal.write_shard_intent(name, [f"data/{name}.parquet"])
        (dest / "data" / f"{name}.parquet").write_bytes(b"PAR1")
        journal.write_shard(name, shard_rows(name, pending))
        shard, pending = shard + 1, []

    for u in range(units):
        unit = WorkUnit(uid=f"l00-{u:07d}", seq=u, kind="list", source=0, slice=u,
                        start=u * per_unit, stop=(u + 1) * per_unit)
        rows, accepted = unit_rows(u, per_unit, every)
        report = UnitReport(unit.uid)
        report.classes["bench"] = ClassTally(
            per_unit, len(accepted), {"http_client_error": per_unit - len(accepted)})
        report.by_stage["fetch"] = per_unit - len(accepted)
        pending += [(unit.uid, i) for i in accepted]
        if len(pending) >= shard_size:
            flush()
        journal.write_unit(unit, report, rows)
    if pending:
        flush()


def publish_once(work: Path) -> dict[str, Any]:
    """Publish the journal in ``work`` (this process) and measure it."""
    images = sum(1 for _ in (work / "data").iterdir())
    spec = spec_for(work, images)
    journal = Journal(str(work), JOB)
    life = JobLifecycle(spec, uri=str(work), job_id=JOB)
    life.job_id, life.journal = JOB, journal
    life.publisher = DatasetPublisher(spec.output, str(work), JOB, None, spec.labels)
    counts = JobCounts(spec)
    units = 0
    for _, report in journal.iter_unit_reports():
        counts.add(report)
        units += 1
    outcome = RunOutcome(counts.stats(partial=False), cancelled=False)
    rss_before = _rss_mib()
    peak = [rss_before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], _rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    life.publish(outcome, {})
    ru1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    done.set()
    sampler.join()
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    stats = json.loads((work / "stats.json").read_text())
    return {"units": units, "candidates": stats["candidates"], "rejected": stats["rejected"],
            "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "cpu_ms_per_unit": round(1e3 * cpu / max(1, units), 3),
            "rss_before_mib": round(rss_before, 1), "peak_rss_mib": round(peak[0], 1)}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--units", type=int, default=8000)
    ap.add_argument("--per-unit", type=int, default=125)
    ap.add_argument("--accept-every", type=int, default=250)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--profile", help="write a cProfile of the last run here")
    ap.add_argument("--publish", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.publish:
        print(json.dumps(publish_once(Path(args.publish))))
        return
    shape = f"u{args.units}_p{args.per_unit}_a{args.accept_every}_s{args.shard_size}"
    template = OUT / f"journal_{shape}"
    if not (template / "_journal").is_dir():
        t0 = time.perf_counter()
        build(template, args.units, args.per_unit, args.accept_every, args.shard_size)
        print(f"journal written in {time.perf_counter() - t0:.1f} s: {template}", flush=True)
    results = []
    for run in range(args.runs):
        work = OUT / f"run_{shape}"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(template, work)
        cmd = [sys.executable]
        if args.profile and run == args.runs - 1:
            cmd += ["-m", "cProfile", "-o", args.profile]
        cmd += [str(Path(__file__).resolve()), "--publish", str(work)]
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep
               + os.environ.get("PYTHONPATH", "")}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        print(json.dumps(r), flush=True)
        shutil.rmtree(work, ignore_errors=True)
    best = min(results, key=lambda r: r["cpu_s"])
    print(f"best of {len(results)}: {best['cpu_s']} s CPU for {best['units']} units "
          f"({best['cpu_ms_per_unit']} ms/unit), peak RSS {best['peak_rss_mib']} MiB "
          f"(before publish {best['rss_before_mib']} MiB)")


if __name__ == "__main__":
    main()
