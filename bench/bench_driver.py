"""The driver's memory and CPU per candidate as a URL list grows (issue 14: the driver holds
counts, not records).

For each ``--sizes`` N it writes a URL list of N lines on a loopback origin: one line in
``--image-every`` is an image of the benchmark corpus (``bench/loopback.py``: distinct 512x384
JPEGs of about 40 KB, so every one is kept), every other line a path the origin answers with a
fast 404. The origin is ``bench/loopback.py`` in its own process. Then it runs

    pixcrawler build SPEC --output OUT --ray     (or --local with ``--runner local``)

as a subprocess and samples the DRIVER process only (the ``pixcrawler`` process itself: not
Ray's daemons, not its workers) from /proc every ``--every`` seconds: resident memory (peak
during the crawl and at its end) and CPU seconds (utime + stime). Reported per size: wall,
candidates (stats.json), driver CPU (before, during and after the crawl: stats.json
``started`` to ``finished``; after it the driver publishes the manifests, streamed over the
unit and shard files), driver CPU per candidate over the whole run and over the crawl alone,
peak RSS; and the largest RSS any process below the driver reached ("child peak": with
``--local`` the shard worker processes). The slope between two sizes,
(CPU(N2) - CPU(N1)) / (N2 - N1), is the marginal cost of a candidate with start-up taken out.

    python bench/bench_driver.py --sizes 10000,100000,1000000 [--runner ray|local]
        [--batch-size B] [--image-every K] [--max-buffered-mb M]

The spec: one class whose target is the number of image lines, so the crawl reads the whole
list (units of work are then sized from that target, 64-256 candidates, unless
``--batch-size``); validation ``medium``; Parquet output; robots.txt not read (one origin).
Results go to bench/out/bench_driver_<runner>.json (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from builder.spec import parse_spec  # noqa: E402
from loopback import OUT, start_origin  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from /proc."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
                out.extend(kids)
                todo.extend(kids)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def rss_of(pid: int) -> Optional[int]:
    """RSS bytes of one process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def driver_sample(pid: int) -> Optional[tuple[float, int]]:
    """(CPU seconds, RSS bytes) of one process (not its children), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rss = rss_of(pid)
    return None if rss is None else ((int(fields[11]) + int(fields[12])) / TICK, rss)


class Sampler(threading.Thread):
    """Samples one pid every ``every_s`` seconds until it exits: (wall time, CPU s, RSS)."""

    def __init__(self, pid: int, every_s: float):
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float, int]] = []
        self.child_peak = 0
        """The largest RSS any process below the driver reached (with ``--local``, the worker
        processes; on Ray, its daemons and workers)."""

    def run(self) -> None:
        while True:
            s = driver_sample(self.pid)
            if s is None:
                return
            self.samples.append((time.time(), s[0], s[1]))
            self.child_peak = max([self.child_peak] +
                                  [rss_of(p) or 0 for p in descendants(self.pid)])
            time.sleep(self.every_s)

    def cpu_at(self, t: float) -> float:
        """Driver CPU seconds at wall time ``t`` (the last sample at or before it)."""
        before = [c for w, c, _ in self.samples if w <= t]
        return before[-1] if before else 0.0


def url_list(n: int, every: int, images: int, port: int, path: Path) -> int:
    """Write ``n`` URLs, one in ``every`` an image (cycling over ``images`` distinct ones, so
    beyond that they are exact duplicates), the rest 404s. Returns the image lines."""
    count = 0
    with open(path, "w") as f:
        for i in range(n):
            if i % every == every - 1:
                f.write(f"http://127.0.0.1:{port}/bench/{count % images:05d}.jpg\n")
                count += 1
            else:
                f.write(f"http://127.0.0.1:{port}/gone/{i}.jpg\n")
    return count


def spec_for(urls: Path, target: int, out: Path, batch: Optional[int],
             buffered_mb: Optional[int] = None) -> dict[str, Any]:
    resources = {k: v for k, v in (("batch_size", batch), ("max_buffered_mb", buffered_mb)) if v}
    return {
        "name": "driverbench",
        "description": "driver memory and CPU per candidate over a mostly-404 URL list",
        "target": max(1, target),
        "classes": {"bench": {}},
        "sources": [{"engine": "urllist", "path": str(urls)}],
        "download": {"allow_private_networks": True, "timeout_s": 10, "retries": 0,
                     "respect_robots": False},
        "validation": {"level": "medium"},
        "output": {"uri": str(out), "formats": ["parquet"]},
        "resources": resources,
    }


def _epoch(stamp: Any) -> Optional[float]:
    if isinstance(stamp, (int, float)):
        return float(stamp)
    if isinstance(stamp, str):
        try:
            return datetime.fromisoformat(stamp).timestamp()
        except ValueError:
            return None
    return None


def run_one(n: int, args: argparse.Namespace, port: int) -> dict[str, Any]:
    work = OUT / "driver"
    work.mkdir(parents=True, exist_ok=True)
    urls = work / f"urls_{n}.txt"
    images = url_list(n, args.image_every, args.images, port, urls)
    out = work / f"out_{n}"
    shutil.rmtree(out, ignore_errors=True)
    spec_path = work / f"spec_{n}.yaml"
    spec = spec_for(urls, min(images, args.images), out, args.batch_size, args.max_buffered_mb)
    spec_path.write_text(yaml.safe_dump(spec))
    ray_tmp = Path(tempfile.mkdtemp(prefix="pxdr-", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "cluster.cli", "build", str(spec_path), "--output", str(out),
           f"--{args.runner}"]
    log = work / f"build_{args.runner}_{n}.log"
    t0 = time.time()
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        sampler = Sampler(proc.pid, args.every)
        sampler.start()
        try:
            code = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        sampler.join()
    wall = time.time() - t0
    shutil.rmtree(ray_tmp, ignore_errors=True)
    stats_path = out / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    cand = int(stats.get("candidates", 0))
    cpu = sampler.samples[-1][1] if sampler.samples else 0.0
    started, finished = _epoch(stats.get("started")), _epoch(stats.get("finished"))
    crawl_cpu = (sampler.cpu_at(finished) - sampler.cpu_at(started)
                 if started and finished else None)
    rss = [r for _, _, r in sampler.samples]
    in_crawl = [r for w, _, r in sampler.samples if started and finished and
                started <= w <= finished]
    rss_end = ([r for w, _, r in sampler.samples if finished and w <= finished] or [0])[-1]
    return {"n": n, "runner": args.runner, "exit": code, "wall_s": round(wall, 1),
            "image_lines": images, "batch_size": parse_spec(spec).batch_size(),
            "candidates": cand, "accepted": stats.get("accepted"),
            "rejected": stats.get("rejected"),
            "crawl_s": round(finished - started, 1) if started and finished else None,
            "driver_cpu_s": round(cpu, 2),
            "before_crawl_cpu_s": round(sampler.cpu_at(started), 2) if started else None,
            "after_crawl_cpu_s": round(cpu - sampler.cpu_at(finished), 2) if finished else None,
            "driver_us_per_candidate": round(1e6 * cpu / cand, 1) if cand else None,
            "crawl_cpu_s": round(crawl_cpu, 2) if crawl_cpu is not None else None,
            "crawl_us_per_candidate": (round(1e6 * crawl_cpu / cand, 1)
                                       if cand and crawl_cpu is not None else None),
            "peak_rss_mib": round(max(rss, default=0) / 2**20, 1),
            "crawl_peak_rss_mib": round(max(in_crawl, default=0) / 2**20, 1),
            "rss_end_of_crawl_mib": round(rss_end / 2**20, 1),
            "child_peak_rss_mib": round(sampler.child_peak / 2**20, 1),
            "samples": len(sampler.samples), "log": str(log)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--runner", choices=("ray", "local"), default="ray")
    ap.add_argument("--image-every", type=int, default=250, help="one image line in this many")
    ap.add_argument("--images", type=int, default=4000, help="distinct corpus images")
    ap.add_argument("--batch-size", type=int,
                    help="resources.batch_size (unset: sized from the target, 64-256)")
    ap.add_argument("--max-buffered-mb", type=int, help="resources.max_buffered_mb (unset: 512)")
    ap.add_argument("--every", type=float, default=0.25, help="sampling period, seconds")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    origin, port = start_origin(args.images, OUT / "driver_origin.log")
    results = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            r = run_one(n, args, port)
            results.append(r)
            print(json.dumps(r), flush=True)
    finally:
        origin.terminate()
        origin.wait()
    print(f"\n{'URLs':>9} {'cands':>9} {'wall s':>7} {'crawl s':>7} {'CPU s':>7} "
          f"{'us/cand':>8} {'crawl us/c':>10} {'before/after s':>14} {'peak RSS MiB':>12} "
          f"{'crawl peak':>10} {'RSS end MiB':>11} {'child peak':>10}")
    for r in results:
        print(f"{r['n']:>9} {r['candidates']:>9} {r['wall_s']:>7} {r['crawl_s'] or '-':>7} "
              f"{r['driver_cpu_s']:>7} {r['driver_us_per_candidate'] or '-':>8} "
              f"{r['crawl_us_per_candidate'] or '-':>10} "
              f"{str(r['before_crawl_cpu_s']) + '/' + str(r['after_crawl_cpu_s']):>14} "
              f"{r['peak_rss_mib']:>12} {r['crawl_peak_rss_mib']:>10} "
              f"{r['rss_end_of_crawl_mib']:>11} {r['child_peak_rss_mib']:>10}")
    for a, b in zip(results, results[1:]):
        if b["candidates"] > a["candidates"]:
            slope = (b["driver_cpu_s"] - a["driver_cpu_s"]) / (b["candidates"] - a["candidates"])
            print(f"marginal driver CPU {a['n']} -> {b['n']}: {1e6 * slope:.1f} us/candidate; "
                  f"peak RSS {b['peak_rss_mib'] - a['peak_rss_mib']:+.1f} MiB")
    dest = OUT / f"bench_driver_{args.runner}.json"
    dest.write_text(json.dumps(results, indent=1))
    print(f"results: {dest}")


if __name__ == "__main__":
    main()
