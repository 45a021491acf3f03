"""The CPU a job on Ray pays for its processes before its first image, against the in-process
runner's.

Issue 18 asks for a job on Ray to spend at most 1.25x the in-process runner's CPU per image.
At 4,000 photos a joined Ray run spends about 4 s more than the in-process runner
(``bench_vs_img2dataset.py --tools pxc,pxc-join``), nearly all of it fixed: every actor of a
job is a Ray worker process, and the in-process runner starts only its worker processes.
This measures that floor, each figure the CPU (user + system) of the processes involved:

- a driver's ``import ray`` and ``ray.init`` joining the cluster, in a fresh process, against
  the in-process runner's worker imports (``builder.worker_procs``, in a fresh process: on
  Linux its first worker is one, and forks the others), each next to a bare interpreter's
  start (``python -P -c pass``), which both pay;
- an actor placed on one of the worker processes the cluster started idle when this
  bench's driver connected (a worker per core; a job's driver gets them the same way, within
  its own time): the CPU that worker spends taking the actor on, its start excluded;
- each of a job's actor classes placed once the idle workers are taken: the new worker
  process's CPU from its start to the actor being ready, an empty actor first.

The cluster is started here as ``bench_vs_img2dataset.JoinedRay`` starts the one ``pxc-join``
joins (a head with this machine's cores, no dashboard, its own RAY_TMPDIR):

    PYTHONPATH=$PWD .venv/bin/python bench/bench_ray_fixed.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_img2dataset import (  # noqa: E402
    JoinedRay, _read, _stat, compile_project, cpu_seconds)

SETTLE_S = 1.0
"""How long a new actor's process is left after it is ready before its CPU is read (the
threads Ray starts with it finish their own start)."""
READY_WAIT_S = 120.0
"""How long an actor may take to be placed and ready before the bench gives up."""


@ray.remote(num_cpus=0.05)
class Empty:
    """An actor with nothing to load: what any actor's process costs."""


def child_cpu(code: str, env: dict[str, str]) -> float:
    """CPU seconds of a fresh ``python -P -c code`` (its own rusage, children excluded)."""
    proc = subprocess.Popen([sys.executable, "-P", "-c", code], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"python -c {code!r} failed ({status})")
    return usage.ru_utime + usage.ru_stime


def actor_pid(handle: Any) -> int:
    return ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))


def idle_workers(marker: str) -> list[int]:
    """The idle worker processes of the cluster whose raylet's command line holds ``marker``
    (a worker's own command line is its title, ``ray::IDLE``, once it has started)."""
    title = {int(e): _read(f"/proc/{e}/cmdline") or "" for e in os.listdir("/proc") if e.isdigit()}
    raylets = {pid for pid, cmd in title.items() if "raylet" in cmd and marker in cmd}
    idle = []
    for pid, cmd in title.items():
        stat = _stat(pid) if cmd.startswith("ray::IDLE") else None  # (ppid, cpu)
        if stat is not None and stat[0] in raylets:
            idle.append(pid)
    return idle


def placed(make: Callable[[], Any], known: set[int]) -> tuple[Any, int, bool, float]:
    """(handle, pid, whether its process is new, its CPU from creation to ready + SETTLE_S)."""
    before = {p: cpu_seconds(p) for p in known}
    handle = make()
    ray.get(handle.__ray_ready__.remote(), timeout=READY_WAIT_S)
    pid = actor_pid(handle)
    time.sleep(SETTLE_S)
    return handle, pid, pid not in known, cpu_seconds(pid) - before.get(pid, 0.0)


def job_actors() -> dict[str, Callable[[], Any]]:
    """The actors a job of one class on one node starts (``cluster.coordinator``): its index
    partition, quota ledger, progress actor and a shard worker, with a small job's
    arguments."""
    from actors.dedup import DedupPartitionActor
    from actors.progress import ProgressActor
    from actors.quota import QuotaActor
    from actors.worker import ServiceNames, ShardWorker
    from builder.quota import QuotaLedger
    from builder.spec import parse_spec
    from builder.worker import JobPlan

    spec = parse_spec({"name": "fixed", "target": 10, "classes": {"cat": {"urls": [
        "http://127.0.0.1:9/a.jpg"]}}, "download": {"allow_private_networks": True}})
    plan = JobPlan(spec, "/tmp/unused", "fixed-job")
    names = ServiceNames(partitions=["dedup:fixed-job:0"], quota="quota:fixed-job",
                         limiters={}, scorers=[])
    return {"DedupPartitionActor": lambda: DedupPartitionActor.remote(0, 1, 6, True),
            "QuotaActor": lambda: QuotaActor.remote(QuotaLedger({"cat": 10}), {}),
            "ProgressActor": lambda: ProgressActor.remote("fixed-job", "fixed"),
            "ShardWorker": lambda: ShardWorker.remote(plan, names, 0)}


def one_round(joined: JoinedRay, env: dict[str, str]) -> dict[str, float]:
    out = {"driver: python -P -c pass": child_cpu("pass", env),
           "driver: import ray, ray.init(address)": child_cpu(
               f"import ray; ray.init(address={joined.address!r}, log_to_driver=False)", env),
           "in-process worker: import builder.worker_procs": child_cpu(
               "import builder.worker_procs", env)}
    ray.init(address=joined.address, log_to_driver=False)
    try:
        idle = idle_workers(str(joined.tmp))
        if not idle:
            print("  warning: the cluster has no idle worker to place an actor on", flush=True)
        held = []
        handle, pid, new, cpu = placed(Empty.remote, set(idle))
        held.append(handle)
        if new:
            print("  warning: the first actor started a process of its own, not an idle "
                  "worker's", flush=True)
        else:
            out["empty actor on an idle worker"] = cpu
        while len(held) < len(idle):  # take the rest of the idle workers
            held.append(placed(Empty.remote, set(idle))[0])
        for name, make in {"Empty": Empty.remote, **job_actors()}.items():
            known = set(idle) | {actor_pid(h) for h in held}
            handle, pid, new, cpu = placed(make, known)
            held.append(handle)
            out[f"{name} on a new process" if new else f"{name} on a reused process"] = cpu
        for handle in held:
            ray.kill(handle)
    finally:
        ray.shutdown()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="fresh clusters; medians reported")
    args = p.parse_args()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    compile_project()  # as a user's installed copy is: no process compiles what it imports
    rounds: list[dict[str, float]] = []
    for r in range(args.rounds):
        with JoinedRay() as joined:
            rounds.append(one_round(joined, env))
        print(f"round {r + 1}: load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"CPU seconds, min / median / max ({os.cpu_count()} cores):")
    names = list(dict.fromkeys(name for r in rounds for name in r))
    for name in names:
        values = [r[name] for r in rounds if name in r]
        print(f"  {name:52s} {min(values):5.2f} / {statistics.median(values):5.2f} / "
              f"{max(values):5.2f}  ({len(values)} of {args.rounds} rounds)")
    print(f"this process: {resource.getrusage(resource.RUSAGE_SELF).ru_utime:.1f} s user")
    return 0


if __name__ == "__main__":
    sys.exit(main())
