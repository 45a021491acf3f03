"""The fixed cost of an embedded Ray on this machine, with no PixCrawler work in it.

Times ``import ray``, ``ray.init`` (plain: 127.0.0.1, ``num_cpus`` = the machine's cores,
dashboard as asked; with ``--connect``, through ``cluster.connect`` as ``pixcrawler build --ray``
starts its embedded Ray, lean without the dashboard), three tiny actors answering one call
each, optionally one trivial Ray Data execution (``--data``: its stats and autoscaling actors
and a worker that imports Ray Data), and ``ray.shutdown``. This is the floor under any
embedded-Ray ``pixcrawler build``: compare it with the whole-command times of
``bench_vs_img2dataset.py``.

    .venv/bin/python bench/bench_ray_floor.py [--dashboard] [--data] [--connect] [--runs 3]

Each run is a fresh subprocess with its own RAY_TMPDIR, so no run reuses another's Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
import ray
t1 = time.perf_counter()
if CONNECT:
    from cluster.connect import connect, shutdown
    connect(None, dashboard=DASHBOARD)
else:
    shutdown = ray.shutdown
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=DASHBOARD,
             dashboard_host="127.0.0.1", log_to_driver=False, configure_logging=False)
t2 = time.perf_counter()

@ray.remote(num_cpus=0.1)
class Tiny:
    def ping(self):
        return 1

actors = [Tiny.remote() for _ in range(3)]
ray.get([a.ping.remote() for a in actors])
t3 = time.perf_counter()
if DATA:
    import ray.data
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.from_items([{"x": i} for i in range(4)], override_num_blocks=4).map_batches(
        lambda b: b, batch_size=1, num_cpus=0.5).take_all()
t4 = time.perf_counter()
shutdown()
t5 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "init": t2 - t1, "actors": t3 - t2, "data": t4 - t3,
                  "shutdown": t5 - t4, "total": t5 - t0}))
"""


def run_once(dashboard: bool, data: bool, connect: bool = False) -> dict[str, float]:
    ray_tmp = tempfile.mkdtemp(prefix="pxfloor", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    code = CHILD.replace("DASHBOARD", str(dashboard)).replace("DATA", str(data)).replace(
        "CONNECT", str(connect))
    try:
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=300, cwd=ROOT)
        wall = time.perf_counter() - started
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if out.returncode != 0:
        raise RuntimeError(f"the floor run failed ({out.returncode}):\n{out.stderr[-2000:]}")
    times = json.loads(out.stdout.strip().splitlines()[-1])
    times["process"] = wall
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dashboard", action="store_true", help="start the dashboard too")
    parser.add_argument("--data", action="store_true", help="add one trivial Ray Data run")
    parser.add_argument("--connect", action="store_true",
                        help="start Ray through cluster.connect, as pixcrawler build --ray does")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    runs = []
    for k in range(args.runs):
        t = run_once(args.dashboard, args.data, args.connect)
        runs.append(t)
        print(f"run {k + 1}: " + "  ".join(f"{name} {value:.2f}s" for name, value in t.items()),
              flush=True)
    med = {name: statistics.median(r[name] for r in runs) for name in runs[0]}
    print("median: " + "  ".join(f"{name} {value:.2f}s" for name, value in med.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
