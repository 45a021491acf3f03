"""The job API under load: status and list endpoints, 50 concurrent clients, while a job runs.

Starts an embedded Ray (with its dashboard, for Ray jobs), the sandbox web and the Serve app on
127.0.0.1 (auth on, a real key, rate limit off), submits a job paced to outlast the run, waits
until it is running, then lets ``--clients`` clients loop for ``--duration`` seconds on
``GET /v1/jobs/{id}`` and ``GET /v1/jobs?limit=20``, half and half. Prints p50/p90/p99/max
latency, requests/s and errors per endpoint, the CPU each process used meanwhile (and the
replica's CPU per request), then cancels the job. Target: p99 < 100 ms and zero errors on 2
cores.

Before that, the same clients loop on ``GET /healthz`` (no auth; its store check runs at most
once a second) for ``--baseline`` seconds: the floor of this ingress and FastAPI's routes on
this machine under the same job, to read the endpoints' figures against. The clients are closed
loops with no think time: each sends its next request when the last one is answered.
``--ingress haproxy`` starts the embedded Ray with Serve's HAProxy ingress (as
``pixcrawler serve --ingress haproxy`` does) instead of its Python proxy actor.

``--client aiohttp`` (the default) runs the clients in this process, each alternating the two
paths; they take about 0.4 of a core at 1,000 requests/s, out of the 2 the server has.
``--client wrk`` runs wrk (``apt-get install wrk``), a C load generator, one process per path
with half the clients each; it takes a fraction of that.

    .venv/bin/python bench/bench_serve.py [--clients 50] [--duration 30] [--baseline 30]
                                          [--replicas 1] [--ingress proxy|haproxy]
                                          [--client aiohttp|wrk]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder.ports import free_port  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")



def paced_spec(base_url: str) -> dict[str, Any]:
    """A job that keeps running for minutes: one fetch at a time per host, 0.2 s apart."""
    return {
        "name": "benchjob",
        "target": 400,
        "classes": {c: [f"{c} photo"] for c in ("cat", "dog", "bird")},
        "sources": [{"engine": "sandbox", "url": base_url, "per_page": 20}],
        "download": {"timeout_s": 2.0, "retries": 1, "backoff_s": 0.05,
                     "allow_private_networks": True, "per_host_concurrency": 1,
                     "per_host_delay_s": 0.2},
        "resources": {"batch_size": 16},
    }


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_ticks() -> dict[int, tuple[str, int]]:
    """CPU clock ticks (user + system) of every process this machine shows, by pid, with a
    short name: Ray's process title (``ray::ServeReplica:...``) or the program's file name."""
    ticks: dict[int, tuple[str, int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            argv0 = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        name = argv0.strip().split(" ")[0] if argv0.startswith("ray::") else \
            Path(argv0.split(" ")[0]).name or stat[stat.index("(") + 1:stat.rindex(")")]
        if int(d.name) == os.getpid():
            name = "bench client"
        ticks[int(d.name)] = (name, int(fields[11]) + int(fields[12]))
    return ticks


def cpu_used(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]],
             seconds: float) -> list[tuple[str, float]]:
    """Cores used per process name between two ``cpu_ticks`` snapshots, busiest first."""
    hz = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {}
    for pid, (name, t) in after.items():
        t0 = before.get(pid, (name, 0))[1]
        used[name] = used.get(name, 0.0) + (t - t0) / hz / seconds
    return sorted(used.items(), key=lambda kv: -kv[1])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def load(base: str, key: str, paths: dict[str, str], clients: int, duration: float
               ) -> dict[str, dict[str, Any]]:
    """Each client loops over ``paths`` in turn (starting at a different one)."""
    lat: dict[str, list[float]] = {name: [] for name in paths}
    errors: dict[str, list[str]] = {name: [] for name in paths}
    headers = {"Authorization": f"Bearer {key}"}
    deadline = time.perf_counter() + duration

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        names = list(paths)
        n = i
        while time.perf_counter() < deadline:
            name = names[n % len(names)]
            n += 1
            t0 = time.perf_counter()
            try:
                async with session.get(base + paths[name], headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        errors[name].append(f"HTTP {r.status}")
                        continue
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                errors[name].append(type(exc).__name__)
                continue
            lat[name].append((time.perf_counter() - t0) * 1000.0)

    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(client(i, session) for i in range(clients)))
    out = {}
    for name in paths:
        ms = lat[name]
        out[name] = {"n": len(ms), "rps": len(ms) / duration, "p50": pct(ms, 0.50),
                     "p90": pct(ms, 0.90), "p99": pct(ms, 0.99), "max": max(ms, default=0.0),
                     "mean": statistics.fmean(ms) if ms else float("nan"),
                     "errors": len(errors[name]), "error_kinds": sorted(set(errors[name]))}
    return out


# wrk's Lua hook at the end of a run: its summary as one JSON line (latencies in microseconds).
WRK_REPORT = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%f,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def load_wrk(base: str, key: str, paths: dict[str, str], clients: int, duration: float
             ) -> dict[str, dict[str, Any]]:
    """The same load from wrk, a C load generator: one wrk process per path, each with its
    share of the clients (connections), all at once; each connection is a closed loop, as
    with ``load``."""
    script = Path(tempfile.mkstemp(prefix="pxwrk", suffix=".lua")[1])
    script.write_text(WRK_REPORT)
    per = max(1, clients // len(paths))
    procs = {name: subprocess.Popen(
        ["wrk", "-t1", f"-c{per}", f"-d{int(round(duration))}s", "--timeout", "10s",
         "-H", f"Authorization: Bearer {key}", "-s", str(script), base + path],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, path in paths.items()}
    out = {}
    try:
        for name, proc in procs.items():
            text, _ = proc.communicate(timeout=duration + 60)
            line = next((ln for ln in reversed(text.splitlines()) if ln.startswith("{")), None)
            if proc.returncode != 0 or line is None:
                raise RuntimeError(f"wrk for {name} failed ({proc.returncode}): {text[-2000:]}")
            r = json.loads(line)
            kinds = {k: r[k] for k in ("connect", "read", "write", "status", "timeout") if r[k]}
            out[name] = {"n": r["requests"], "rps": r["requests"] / (r["duration_us"] / 1e6),
                         "p50": r["p50"] / 1000, "p90": r["p90"] / 1000,
                         "p99": r["p99"] / 1000, "max": r["max"] / 1000,
                         "mean": r["mean"] / 1000, "errors": sum(kinds.values()),
                         "error_kinds": [f"{k} {v}" for k, v in sorted(kinds.items())]}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        script.unlink(missing_ok=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--baseline", type=float, default=30.0,
                    help="seconds of GET /healthz first (0: none)")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--ingress", choices=("proxy", "haproxy"), default="proxy")
    ap.add_argument("--client", choices=("aiohttp", "wrk"), default="aiohttp",
                    help="the load generator: this process's aiohttp clients, or wrk "
                    "(apt-get install wrk), which takes a fraction of their CPU")
    args = ap.parse_args()
    if args.client == "wrk" and shutil.which("wrk") is None:
        ap.error("--client wrk: wrk is not installed (Debian: apt-get install -y wrk)")
    run_load = load_wrk if args.client == "wrk" else \
        (lambda *a: asyncio.run(load(*a)))

    from serve.cli import connect_with_jobs, use_haproxy

    use_haproxy(args.ingress, None)  # before Ray Serve is imported anywhere

    from ray import serve as ray_serve

    from builder.sandbox import SandboxWeb
    from serve.app import APP_NAME, build_app
    from serve.store import JobStore

    tmp = Path(tempfile.mkdtemp(prefix="pxbench"))
    os.environ.setdefault("RAY_TMPDIR", str(tmp))
    store = f"sqlite:///{tmp / 'jobs.db'}"
    key, _ = JobStore(store).create_key("bench")
    with SandboxWeb(classes=("cat", "dog", "bird"), images_per_class=400) as web:
        info = connect_with_jobs(None, ingress=args.ingress)
        port = free_port()
        ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
        # The job fetches from the sandbox web on 127.0.0.1: the API policy must allow it.
        app = build_app({"store": store, "rate_limit_per_s": 0, "max_concurrent_jobs": 4,
                         "num_replicas": args.replicas,
                         "policy": {"source_urls": [web.base_url],
                                    "allow_private_networks": True, "max_running_jobs": 1}})
        ray_serve.run(app, name=APP_NAME, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {key}"}
        r = requests.post(f"{base}/v1/jobs", json=paced_spec(web.base_url), headers=auth,
                          timeout=60)
        r.raise_for_status()
        job_id = r.json()["id"]
        deadline = time.time() + 120
        while True:
            job = requests.get(f"{base}/v1/jobs/{job_id}", headers=auth, timeout=30).json()
            if job["state"] == "running" and job["progress"].get("candidates"):
                break
            if job["state"] in ("succeeded", "failed", "cancelled") or time.time() > deadline:
                print(f"the job did not get running: {job}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        before = job["progress"].get("accepted", 0)
        print(f"Ray: {info['resources'].get('CPU', 0):g} CPUs; job {job_id} running; "
              f"{args.clients} {args.client} clients, {args.replicas} replica(s), "
              f"ingress {args.ingress}; "
              f"load average {loadavg()} ...", flush=True)
        floor = {}
        if args.baseline > 0:
            floor = run_load(base, key, {"healthz": "/healthz"}, args.clients, args.baseline)
        paths = {"status": f"/v1/jobs/{job_id}", "list": "/v1/jobs?limit=20"}
        ticks = cpu_ticks()
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        results = run_load(base, key, paths, args.clients, args.duration)
        elapsed = time.perf_counter() - t0
        cores = cpu_used(ticks, cpu_ticks(), elapsed)
        if args.client == "wrk":  # exited by now: its CPU is in this process's reaped children
            done = resource.getrusage(resource.RUSAGE_CHILDREN)
            cores.append(("wrk", (done.ru_utime + done.ru_stime - reaped.ru_utime
                                  - reaped.ru_stime) / elapsed))
            cores.sort(key=lambda kv: -kv[1])
        job = requests.get(f"{base}/v1/jobs/{job_id}", headers=auth, timeout=30).json()
        print(f"\n{'endpoint':<8} {'seconds':>7} {'requests':>8} {'req/s':>7} {'p50 ms':>7} "
              f"{'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} {'errors':>6}")
        for name, s in {**floor, **results}.items():
            secs = args.baseline if name in floor else args.duration
            print(f"{name:<8} {secs:>7g} {s['n']:>8} {s['rps']:>7.0f} {s['p50']:>7.1f} "
                  f"{s['p90']:>7.1f} {s['p99']:>7.1f} {s['max']:>7.1f} {s['errors']:>6}"
                  + (f"  {', '.join(s['error_kinds'])}" if s["errors"] else ""))
        if floor:
            total = sum(s["rps"] for s in results.values())
            print(f"\nstatus + list: {total:.0f} req/s = {total / floor['healthz']['rps']:.2f}"
                  f" x the /healthz floor; load average now {loadavg()}")
        busy = [(n, c) for n, c in cores if c >= 0.01][:8]
        print("\nCPU during the status + list run, cores: "
              + ", ".join(f"{n} {c:.2f}" for n, c in busy))
        replica = sum(c for n, c in cores if n.startswith("ray::ServeReplica"))
        served = sum(s["n"] + s["errors"] for s in results.values())
        if served:
            print(f"replica CPU per request: {replica * elapsed / served * 1000:.2f} ms")
        print(f"\njob during the run: state {job['state']}, accepted {before} -> "
              f"{job['progress'].get('accepted')}, candidates "
              f"{job['progress'].get('candidates')}")
        ok = all(s["p99"] < 100 and s["errors"] == 0 for s in results.values())
        print("target p99 < 100 ms and zero errors:", "met" if ok else "NOT met")
        requests.delete(f"{base}/v1/jobs/{job_id}", headers=auth, timeout=30)
        end = time.time() + 60
        while time.time() < end:
            state = requests.get(f"{base}/v1/jobs/{job_id}", headers=auth, timeout=30
                                 ).json()["state"]
            if state in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(1)
        ray_serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
