"""The same URL-list job on one Ray node and on a three-node local Ray cluster: wall, CPU and
where the CPU goes.

The job: ``--n`` distinct loopback JPEGs (``bench/loopback.py``'s corpus, served by its own
process), one class with target ``--n``, validation ``medium``, Parquet output to a local
folder, two shard workers of 0.8 CPU and one index partition on both. (Sized from the
cluster's total, the job asked for two workers of 0.92 CPU; on worker nodes of 1 CPU and a
head of 0, a worker and the 0.05-CPU index, ledger and progress actors together passed one
node's CPU, the second worker was never placed and the job waited without a word: seen
2026-12-02. Planning is per node since: sized from the cluster, it gets one worker of 0.85
CPU per worker node.) Two runs of it, each a ``pixcrawler build`` subprocess:

* ``one``: ``pixcrawler build SPEC --ray`` on an embedded one-node Ray (this machine's CPUs);
* ``three``: a cluster made here with ``ray.cluster_utils.Cluster``: a head with ``--head-cpus``
  and two worker nodes of ``--worker-cpus`` each, then ``pixcrawler build SPEC --address
  ADDR``. The output is declared ``output.shared_filesystem`` (every node is this machine, so
  it truly is; the planner's probe checks it on every node).

All nodes share this machine's cores: the comparison shows what spreading a job over nodes
costs, not a speed-up. CPU is that of every process under this one (the driver, Ray's daemons
and workers, the origin), sampled from /proc every 0.5 s and summed by process title
(``ray::ShardWorker``, ``raylet``, ...).

    python bench/bench_cluster.py --n 40000 [--modes one,three]

Results: bench/out/bench_cluster.json (git-ignored).
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
from pathlib import Path
from typing import Any, Optional

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from loopback import OUT, start_origin  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _label(pid: int) -> str:
    """A process's title: ``ray::Actor`` for Ray workers, else the program or script name."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except (FileNotFoundError, ProcessLookupError):
        return "?"
    first = args[0].strip()
    if first.startswith("ray::"):
        return "ray::" + (first[5:].split() or ["?"])[0].split(":")[-1].split(".")[0]
    prog = os.path.basename(first.split()[0]) if first else "?"
    if prog.startswith("python") and len(args) > 1:
        rest = [a for a in args[1:] if a and not a.startswith("-")]
        if "cluster.cli" in args:
            return "driver (pixcrawler)"
        if rest and ("default_worker.py" in rest[0] or "setup_worker.py" in rest[0]):
            return "ray::IDLE"
        return os.path.basename(rest[0]) if rest else prog
    return prog


class TreeCpu(threading.Thread):
    """CPU seconds of every process under ``root``, by pid (the last value seen)."""

    def __init__(self, root: int, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.every_s = root, every_s
        self.cpu: dict[int, float] = {}
        self.label: dict[int, str] = {}
        self._halt = threading.Event()

    def sample(self) -> None:
        kids = _children()
        todo, seen = [self.root], set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            todo.extend(kids.get(pid, []))
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            self.cpu[pid] = (int(fields[11]) + int(fields[12])) / TICK
            if not self.label.get(pid, "ray::IDLE").startswith("ray::") or \
                    self.label[pid] == "ray::IDLE":
                # a Ray worker starts as setup_worker.py, then takes its actor's title
                self.label[pid] = _label(pid)

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def snapshot(self) -> dict[int, float]:
        return dict(self.cpu)


def by_label(cpu: dict[int, float], base: dict[int, float], labels: dict[int, str]) -> dict:
    out: dict[str, float] = {}
    for pid, c in cpu.items():
        used = c - base.get(pid, 0.0)
        if used > 0.05:
            out[labels.get(pid, "?")] = out.get(labels.get(pid, "?"), 0.0) + used
    return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def spec_for(n: int, urls: Path, out: Path, shared: bool, workers: int,
             worker_cpus: float) -> dict[str, Any]:
    return {
        "name": "clusterbench", "description": f"{n} loopback JPEGs, one node against three",
        "target": n, "classes": {"bench": {}},
        "sources": [{"engine": "urllist", "path": str(urls)}],
        "download": {"allow_private_networks": True, "timeout_s": 10, "retries": 0,
                     "respect_robots": False},
        "validation": {"level": "medium"},
        "output": {"uri": str(out), "formats": ["parquet"], "shared_filesystem": shared},
        "resources": {"workers": workers, "worker_cpus": worker_cpus, "dedup_partitions": 1},
    }


def run_build(mode: str, args: argparse.Namespace, urls: Path, address: Optional[str],
              tree: TreeCpu) -> dict[str, Any]:
    work = OUT / "cluster"
    out = work / f"out_{mode}"
    shutil.rmtree(out, ignore_errors=True)
    spec_path = work / f"spec_{mode}.yaml"
    spec_path.write_text(yaml.safe_dump(spec_for(args.n, urls, out, address is not None,
                                                 args.job_workers, args.job_worker_cpus)))
    ray_tmp = Path(tempfile.mkdtemp(prefix="pxcl-", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "cluster.cli", "build", str(spec_path), "--output", str(out)]
    cmd += ["--address", address] if address else ["--ray"]
    log = work / f"build_{mode}.log"
    tree.sample()
    base = tree.snapshot()
    t0 = time.monotonic()
    with open(log, "w") as logf:
        proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                              timeout=args.timeout)
    wall = time.monotonic() - t0
    tree.sample()
    cpu = by_label(tree.snapshot(), base, tree.label)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    stats_path = out / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    keep = ("candidates", "accepted", "rejected", "duration_s", "workers_by_node",
            "resent_units", "rejected_by_reason")
    return {"mode": mode, "exit": proc.returncode, "wall_s": round(wall, 1),
            "cpu_s": round(sum(cpu.values()), 1), "cpu_by_process": cpu,
            "stats": {k: stats.get(k) for k in keep}, "log": str(log)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=40000)
    ap.add_argument("--modes", default="one,three")
    ap.add_argument("--head-cpus", type=int, default=0)
    ap.add_argument("--worker-cpus", type=int, default=1)
    ap.add_argument("--job-workers", type=int, default=2, help="resources.workers")
    ap.add_argument("--job-worker-cpus", type=float, default=0.8, help="resources.worker_cpus")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    work = OUT / "cluster"
    work.mkdir(parents=True, exist_ok=True)
    origin, port = start_origin(args.n)
    urls = work / f"urls_{args.n}.txt"
    urls.write_text("".join(f"http://127.0.0.1:{port}/bench/{i:05d}.jpg\n"
                            for i in range(args.n)))
    tree = TreeCpu(os.getpid())
    tree.start()
    results = []
    try:
        for mode in args.modes.split(","):
            if mode == "one":
                results.append(run_build(mode, args, urls, None, tree))
            else:
                results.append(run_three(args, urls, tree))
            print(json.dumps(results[-1]), flush=True)
    finally:
        origin.terminate()
        origin.wait()
        tree.stop()
    (OUT / "bench_cluster.json").write_text(json.dumps(results, indent=1))
    for r in results:
        print(f"{r['mode']:>6}: exit {r['exit']}, wall {r['wall_s']} s, CPU {r['cpu_s']} s, "
              f"accepted {r['stats'].get('accepted')} of {r['stats'].get('candidates')}")
        for label, c in list(r["cpu_by_process"].items())[:12]:
            print(f"        {c:>7} s  {label}")


def run_three(args: argparse.Namespace, urls: Path, tree: TreeCpu) -> dict[str, Any]:
    """The job on a head + two worker nodes made here; the cluster's start-up is timed apart."""
    from ray.cluster_utils import Cluster

    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.head_cpus,
                                                            "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=args.worker_cpus)
    cluster.wait_for_nodes()
    up = time.monotonic() - t0
    try:
        r = run_build("three", args, urls, cluster.address, tree)
    finally:
        cluster.shutdown()
    r["cluster_start_s"] = round(up, 1)
    return r


if __name__ == "__main__":
    main()
