"""Peak memory of a job whose URLs all answer large bodies, with and without the byte budget.

The issue's hostile case: 400 URLs, each answering ~19 MB (just under the default
``download.max_bytes``) that start like a JPEG and do not decode. Before the fetcher had a byte
budget, memory grew with requests in flight x ``max_bytes``: ~10 GB PSS on an embedded Ray and
4 GB with ``--local``.

The bodies come from the sandbox web's ``/heavy/`` route, served by ``pixcrawler sandbox`` in a
separate process (its memory and CPU are not measured). Each run is a whole command,
``pixcrawler build spec.yaml --ray`` (embedded Ray) or ``pixcrawler build spec.yaml --local``, in
a subprocess; the peak RSS and PSS of its whole process tree (every descendant, and every
process naming the run's own RAY_TMPDIR) are sampled from /proc by
``bench_vs_img2dataset.TreeMonitor``. The spec's download settings are a hostile spec's:
``concurrency`` and ``per_host_concurrency`` 128 (as if the 400 URLs were on 128 hosts),
``retries`` 0. "budget off" sets ``download.max_bytes_in_flight``
to 10**12, which never binds: the fetcher then behaves as it did before the budget existed.
"budget on" leaves the default (256 MB).

    .venv/bin/python bench/bench_hostile_memory.py [--n 400] [--size 19000000]
        [--runners local,ray] [--budgets off,on] [--batch-size B --max-in-flight-batches M]

A run whose tree passes ``--max-rss-gib`` (default 14) is stopped there (SIGINT, then SIGKILL
to every process of the tree), so the unbounded case cannot take a shared machine down; its
figures then read "at least". Outputs (specs, logs, datasets, bench_hostile_memory.json) go
under bench/out/hostile/.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_vs_img2dataset import TreeMonitor, TreeStats  # noqa: E402
from loopback import wait_healthy  # noqa: E402
from builder.ports import free_port  # noqa: E402
from builder.spec import DownloadSpec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "hostile"
BUDGETS = {"off": 10**12, "on": DownloadSpec().max_bytes_in_flight}


def start_sandbox(port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cluster.cli", "sandbox", "--host", "127.0.0.1",
           "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    return wait_healthy(proc, port, "the sandbox", log, timeout_s=60)


def run_capped(cmd: list[str], env: dict[str, str], log_path: Path, marker: str,
               timeout_s: float, max_rss_kib: int) -> tuple[float, int, TreeStats, bool]:
    """Run ``cmd``; (wall seconds, exit code, tree stats, stopped at the RSS cap)."""
    with log_path.open("w") as log:
        log.write(f"# {shlex.join(cmd)}\n")
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        monitor = TreeMonitor(proc.pid, marker, every_s=0.25, pss_every_s=0.5)
        monitor.start()
        capped = False
        while proc.poll() is None:
            over = monitor.stats.peak_rss_kib > max_rss_kib
            if over or time.perf_counter() - t0 > timeout_s:
                capped = over
                log.write(f"# stopped: {'RSS cap' if over else 'timeout'}\n")
                log.flush()
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    for pid in list(monitor.stats.cpu_by_pid):
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except OSError:
                            pass
                break
            time.sleep(0.25)
        code = proc.wait()
        wall = time.perf_counter() - t0
    return wall, code, monitor.stop(), capped


def spec(urls: Path, budget: int, args: argparse.Namespace) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if args.batch_size:
        resources["batch_size"] = args.batch_size
    if args.max_in_flight_batches:
        resources["max_in_flight_batches"] = args.max_in_flight_batches
    return {
        "name": "hostile", "target": args.n,
        "classes": {"heavy": None},
        "sources": [{"engine": "urllist", "path": str(urls), "per_page": 500}],
        "download": {"allow_private_networks": True, "timeout_s": 120, "retries": 0,
                     "concurrency": 128, "per_host_concurrency": 128,
                     "max_bytes_in_flight": budget},
        "validation": {"level": "fast"},
        "output": {"formats": ["parquet"]},
        "resources": resources,
    }


def run(runner: str, budget_name: str, urls: Path, args: argparse.Namespace) -> dict[str, Any]:
    name = f"{runner}-budget-{budget_name}"
    spec_path = OUT / f"{name}.yaml"
    spec_path.write_text(yaml.safe_dump(spec(urls, BUDGETS[budget_name], args)))
    out = OUT / "datasets" / name
    shutil.rmtree(out, ignore_errors=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="pxhm-", dir="/tmp"))  # short: Ray's socket paths
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "cluster.cli", "build", str(spec_path), "--output", str(out)]
    cmd.append("--local" if runner == "local" else "--ray")
    log = OUT / f"{name}.log"
    try:
        wall, code, tree, capped = run_capped(cmd, env, log, str(ray_tmp), args.timeout,
                                              int(args.max_rss_gib * 2**20))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    stats_path = out / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    fetch = stats.get("fetch", {})
    return {"run": name, "runner": runner, "budget": BUDGETS[budget_name], "exit": code,
            "stopped_at_rss_cap": capped,
            "wall_s": round(wall, 1), "cpu_s": round(tree.cpu_s, 1),
            "peak_rss_mib": round(tree.peak_rss_kib / 1024),
            "peak_pss_mib": round(tree.peak_pss_kib / 1024), "procs": tree.peak_procs,
            "candidates": stats.get("candidates"), "rejected": stats.get("rejected"),
            "by_reason": stats.get("rejected_by_reason"),
            "body_bytes_peak_mib": round(fetch.get("body_bytes_peak", 0) / 2**20),
            "budget_waits": fetch.get("budget_waits"), "cmd": shlex.join(cmd), "log": str(log)}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=400, help="URLs, each answering --size bytes")
    p.add_argument("--size", type=int, default=19_000_000)
    p.add_argument("--chunked", action="store_true", help="bodies without Content-Length")
    p.add_argument("--runners", default="local,ray")
    p.add_argument("--budgets", default="off,on")
    p.add_argument("--batch-size", type=int, default=0, help="resources.batch_size")
    p.add_argument("--max-in-flight-batches", type=int, default=0,
                   help="resources.max_in_flight_batches")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--max-rss-gib", type=float, default=14.0,
                   help="stop a run whose process tree passes this RSS")
    args = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    port = free_port()
    sandbox = start_sandbox(port, OUT / "sandbox.log")
    results = []
    try:
        mode = "&chunked=1" if args.chunked else ""
        urls = OUT / "urls.txt"
        urls.write_text("".join(f"http://127.0.0.1:{port}/heavy/{i:05d}.jpg?bytes={args.size}"
                                f"{mode}\n" for i in range(args.n)))
        print(f"{args.n} URLs x {args.size / 1e6:.1f} MB "
              f"({'chunked' if args.chunked else 'Content-Length'}), load "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        for runner in args.runners.split(","):
            for budget in args.budgets.split(","):
                r = run(runner, budget, urls, args)
                results.append(r)
                cap = " (stopped at the RSS cap)" if r["stopped_at_rss_cap"] else ""
                print(f"{r['run']:18s} exit {r['exit']}{cap}  wall {r['wall_s']:6.1f} s  "
                      f"CPU {r['cpu_s']:6.1f} s  peak RSS {r['peak_rss_mib']:6d} MiB  "
                      f"peak PSS {r['peak_pss_mib']:6d} MiB  bodies in flight peak "
                      f"{r['body_bytes_peak_mib']:5d} MiB  budget waits {r['budget_waits']}  "
                      f"rejected {r['rejected']} {r['by_reason']}", flush=True)
    finally:
        sandbox.terminate()
        sandbox.wait(30)
    (OUT / "bench_hostile_memory.json").write_text(json.dumps(
        {"args": vars(args), "load_after": os.getloadavg()[0], "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
