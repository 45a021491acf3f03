"""PixCrawler against img2dataset on the same URL list from a loopback corpus.

A separate process (``bench/loopback.py``) serves the corpus on a free 127.0.0.1 port: by
default (``--corpus photos``) N distinct 512x384 JPEG crops of real photographs
(``bench/photo_corpus.py``, ~32 KB at quality 85), or with ``--corpus generated`` the sandbox
web's generated benchmark pictures; either is built once into a cached pack under bench/out/.
Every URL is fetched once first, so all tools see the same warm server. The same URL list (one
URL a line) then goes through each tool (``--tools``), each run as a whole command in a
subprocess and timed from outside, the tools in the same order every round (interleaved):

- ``pxc``: ``pixcrawler build spec.yaml``, the default command (it chooses its runner: this
  process on a machine of up to 4 cores), this checkout's code (PYTHONPATH); validation
  ``medium`` (full decode check, sha256, pHash/dHash, exact + near-duplicate dedup),
  robots.txt and opt-out headers respected, Parquet output only.
- ``pxc-ray``: the same with ``--ray`` (an embedded local Ray); ``pxc-local``: ``--local``.
- ``pxc-resize``: the default command with ``output.resize`` ``{max_side: S, mode:
  keep_ratio, resample: R}`` (``--resize-side``, ``--resample``, default lanczos) and JPEG
  quality 95: every accepted image is decoded again, resized and re-encoded, to compare with
  ``i2d-resize``.
- ``pxc-join``: the same with ``--address``, joining a local Ray this bench starts before the
  run and stops after it, both untimed (``ray.cluster_utils.Cluster``: one head with the
  machine's cores, no dashboard): the issue's "on Ray, e.g. joining a running local cluster",
  without Ray's start and stop. Its CPU counts the cluster's processes (GCS, raylet, the
  workers it starts for the job) from the start of the run only. The cluster is up only for
  these runs: left running, it slowed the next ``--ray`` run's start by 1.5-2 s.
- ``i2d`` (its own venv, see ``setup_img2dataset.sh``): ``--resize_mode no --output_format
  parquet``, one process per core, sha256 (its default), nothing that changes the work, as the
  issue asks: img2dataset then decodes every image (OpenCV) and re-encodes it as JPEG, quality
  95. ``i2d-raw`` adds ``--disable_all_reencoding True``: bytes kept as fetched, no decode at
  all, img2dataset's fastest path. ``i2d-decode`` adds ``--skip_reencode True`` instead: each
  image is decoded but written unchanged. ``i2d-resize`` resizes instead: ``--resize_mode
  keep_ratio_largest --image_size S --resize_only_if_bigger True`` (the longer side down to
  ``--resize-side`` S, default 256; OpenCV's INTER_AREA), re-encoded as JPEG quality 95.
  img2dataset does not read robots.txt (it honours X-Robots-Tag headers only).
  ``--number_sample_per_shard 1000``: its default (10,000) would put all 4,000 URLs in one
  shard, i.e. one of its processes.

Speed ratios are per round (their wall time over ours for the same N URLs), then the median.
The limit (``bench/work_floor.py``, in its own process before and after the runs) is the CPU
per image no build avoids (fetch, decode + signatures + sha256, Parquet) in one process, times
the cores. ``--fixed-runs K`` first times the default command and ``--ray`` on a one-image job.

Each tool gets the machine's cores (img2dataset ``--processes_count`` = cores, the embedded
Ray sized to ``os.cpu_count()``). The CPU seconds of the whole tree are reported next to the
wall time: on a shared machine they move much less than the wall time does.

Peak memory is that of the whole process tree, sampled from /proc: every descendant of the
command, and for PixCrawler also every process whose command line names the run's own
RAY_TMPDIR (raylet, GCS, workers). Both the RSS sum (from statm, every 0.2 s) and the PSS sum
(shared pages divided among their sharers, from smaps_rollup, every 2 s) are reported; RSS
over-counts what Ray's processes share. smaps_rollup walks each process's page tables: reading
it for a dozen Ray processes costs about 55 ms of CPU, which every 0.2 s took a quarter of a
core from the tool being measured. The monitor's own CPU is printed with each run.

    bash bench/setup_img2dataset.sh                       # once
    PYTHONPATH=$PWD .venv/bin/python bench/bench_vs_img2dataset.py [--n 4000] [--runs 3]
        [--corpus photos|generated] [--tools pxc,pxc-ray,i2d,i2d-raw] [--fixed-runs 3]
        [--resize-side 256] [--resample lanczos|bicubic|bilinear|box]
        [--no-floor] [--batch-size B --workers W ...]

``--store s3`` writes PixCrawler's output to an S3 bucket instead of bench/out/pxc: a moto
server (the test extra's ``moto_server``) on 127.0.0.1, started before the runs and not
timed, like the corpus server; its CPU is printed per run beside the corpus server's. Each run
writes under its own prefix, read back (stats.json, Parquet rows) and deleted after it.
img2dataset still writes to local disk. ``--store-mbps M`` puts ``bench/throttle.py`` between
the command and moto: each connection uploads at most M MB/s, so a shard's upload takes time,
as to a store far away, instead of moto's CPU on the cores the command runs on.

Outputs, logs (bench/out/logs/, with each ``--ray`` run's Ray session logs), the spec, the URL
list and bench_vs_img2dataset_<corpus>_<n>.json go under bench/out/ (git-ignored). For
PixCrawler the phases (start-up + ray.init, planning, crawl, write, exit) come from its log's
timestamps and stats.json's started/finished.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import yaml

START_ENV = dict(os.environ)
"""The environment this bench started with: img2dataset runs in it, as its users run it, not
in the one importing ``builder`` gives this process (``builder.ARROW_ALLOCATOR_ENV`` tunes
the allocator of the pyarrow that img2dataset uses too)."""

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loopback import corpus_pack, wait_healthy  # noqa: E402
from photo_corpus import photo_pack  # noqa: E402
from builder.ports import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
I2D_BIN = OUT / "i2d-venv" / "bin" / "img2dataset"
PXC_BIN = Path(sys.executable).parent / "pixcrawler"  # run with PYTHONPATH=<this checkout>
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


# ---------------------------------------------------------------- where PixCrawler writes


class LocalStore:
    """PixCrawler's output under bench/out (the default)."""

    env: dict[str, str] = {}
    pids: list[int] = []

    def uri(self, name: str) -> str:
        return str(OUT / name)

    def clear(self, uri: str) -> None:
        shutil.rmtree(uri, ignore_errors=True)

    def read_json(self, uri: str) -> dict[str, Any]:
        return _json(Path(uri))

    def drop(self, uri: str) -> None:
        """Forget a run's output once it is read: on local disk it stays, to look at."""

    def parquet_rows(self, uri: str) -> int:
        return _parquet_rows(Path(uri))

    def close(self) -> None:
        pass


class MotoStore(LocalStore):
    """PixCrawler's output in an S3 bucket on a moto server on 127.0.0.1 (``--store s3``),
    reached through ``throttle.py`` where ``mbps`` is set: each connection's uploads paced to
    that many MB/s, as a store far away takes time (not this machine's CPU) to take a shard."""

    BUCKET = "pxc-bench"

    def __init__(self, log_path: Path, mbps: float = 0.0) -> None:
        import boto3
        import s3fs

        exe = Path(sys.executable).with_name("moto_server")
        if not exe.exists():
            raise SystemExit("--store s3 needs moto_server: .venv/bin/pip install -e '.[test]'")
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=log_path.open("w"), stderr=subprocess.STDOUT)
        self.proxy: Optional[subprocess.Popen] = None
        self.pids = [self.proc.pid]
        endpoint = self.endpoint
        if mbps:
            listen = free_port()
            self.proxy = subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "throttle.py"), "--listen", str(listen),
                 "--upstream", str(port), "--mbps", str(mbps)], stdout=subprocess.PIPE,
                text=True)
            self.pids.append(self.proxy.pid)
            assert self.proxy.stdout is not None
            if self.proxy.stdout.readline().strip() != "listening":
                self.close()
                raise SystemExit("bench/throttle.py did not start")
            endpoint = f"http://127.0.0.1:{listen}"
        self.env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                    "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise SystemExit(f"moto_server did not start (log: {log_path})")
                time.sleep(0.2)
        self.fs = s3fs.S3FileSystem(key="bench", secret="bench",
                                    client_kwargs={"endpoint_url": self.endpoint,
                                                   "region_name": "us-east-1"})
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                     aws_access_key_id="bench",
                     aws_secret_access_key="bench").create_bucket(Bucket=self.BUCKET)

    def uri(self, name: str) -> str:
        return f"s3://{self.BUCKET}/{name}"

    def clear(self, uri: str) -> None:
        if self.fs.exists(uri):
            self.fs.rm(uri, recursive=True)
        self.fs.invalidate_cache()

    def drop(self, uri: str) -> None:
        """moto holds every object in memory: a run's output goes once it is read."""
        self.clear(uri)

    def read_json(self, uri: str) -> dict[str, Any]:
        try:
            return json.loads(self.fs.cat_file(uri))
        except (OSError, ValueError):
            return {}

    def parquet_rows(self, uri: str) -> int:
        import pyarrow.parquet as pq

        total = 0
        for path in sorted(self.fs.glob(f"{uri}/**/*.parquet")):
            with self.fs.open(path, "rb") as f:
                total += pq.ParquetFile(f).metadata.num_rows
        return total

    def close(self) -> None:
        for proc in (self.proxy, self.proc):
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------- the loopback corpus



def start_server(corpus: str, n: int, port: int, log_path: Path) -> subprocess.Popen:
    """The loopback corpus server in its own process (``bench/loopback.py``), serving ``n``
    JPEGs from a cached pack: crops of real photos (``photo_corpus``) or the sandbox's
    generated pictures (``loopback.corpus_pack``)."""
    pack, _ = photo_pack(n) if corpus == "photos" else corpus_pack(n)
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "loopback.py"), str(pack),
                                 str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return wait_healthy(proc, port, "the corpus server", log_path)


def check_corpus(urls: list[str], threads: int = 8) -> tuple[float, int]:
    """Fetch every URL once (all must answer 200); returns (seconds, total bytes)."""
    def get(url: str) -> int:
        with urllib.request.urlopen(url, timeout=60) as r:
            return len(r.read())

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        sizes = list(pool.map(get, urls))
    return time.perf_counter() - t0, sum(sizes)


# ---------------------------------------------------------------- process-tree sampling


def _read(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return None


def _stat(pid: int) -> Optional[tuple[int, float]]:
    """(ppid, cpu seconds) from /proc/pid/stat."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK


def _mem_kib(pid: int, pss_too: bool = True) -> tuple[int, int]:
    """(RSS, PSS) in KiB; PSS from smaps_rollup (0 when unreadable or not asked for)."""
    rss = pss = 0
    text = _read(f"/proc/{pid}/smaps_rollup") if pss_too else None
    if text:
        for line in text.splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
        return rss, pss
    statm = _read(f"/proc/{pid}/statm")
    if statm:
        rss = int(statm.split()[1]) * PAGE_KIB
    return rss, pss


def _label(cmdline: str) -> str:
    """A short name for a process: Ray's ``ray::Actor`` titles, else the program's name."""
    args = cmdline.split("\0")
    first = args[0].strip()
    if first.startswith("ray::"):
        # ray::Downloader.fetch, ray::progress:job:ProgressActor.__init__ -> ray::Downloader, ...
        title = first[5:].split()[0] if first[5:].strip() else "?"
        return "ray::" + title.split(":")[-1].split(".")[0]
    prog = os.path.basename(first.split()[0]) if first else "?"
    if prog.startswith("python") and "-c" in args[1:-1]:
        code = args[args.index("-c", 1) + 1]
        if "spawn_main" in code:
            return "multiprocessing worker"
        return "resource_tracker" if "resource_tracker" in code else "python -c"
    if prog.startswith("python") and len(args) > 1:
        script = next((a for a in args[1:] if a and not a.startswith("-")), args[1])
        if "ray/_private/workers" in script or script.endswith("default_worker.py"):
            return "ray::IDLE"
        return os.path.basename(script) or prog
    return prog


@dataclass
class TreeStats:
    peak_rss_kib: int = 0
    peak_pss_kib: int = 0
    peak_procs: int = 0
    samples: int = 0
    monitor_cpu_s: float = 0.0  # the sampler's own CPU (in the bench process, not the tree)
    load: tuple[float, float] = (0.0, 0.0)  # the machine's 1-min load average, before and after
    cpu_by_pid: dict[int, float] = field(default_factory=dict)
    label_by_pid: dict[int, str] = field(default_factory=dict)

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu_by_pid.values())

    def cpu_by_label(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, cpu in self.cpu_by_pid.items():
            label = self.label_by_pid.get(pid, "?")
            out[label] = out.get(label, 0.0) + cpu
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


class TreeMonitor(threading.Thread):
    """Samples a process tree's memory and CPU every ``every_s`` until ``stop()``."""

    def __init__(self, root: int, marker: Optional[str] = None, every_s: float = 0.2,
                 pss_every_s: float = 2.0):
        super().__init__(daemon=True)
        self.root = root
        self.marker = marker
        self.every_s = every_s
        self.pss_every = max(1, round(pss_every_s / every_s))
        self.stats = TreeStats()
        self._done = threading.Event()
        self._marked: dict[int, bool] = {}
        self._base: Optional[dict[int, float]] = None

    def stop(self) -> TreeStats:
        self._done.set()
        self.join()
        return self.stats

    def run(self) -> None:
        start = time.thread_time()
        n = 0
        while True:
            self.sample(pss_too=n % self.pss_every == 0)
            n += 1
            if self._done.wait(self.every_s):
                self.sample()
                self.stats.monitor_cpu_s = time.thread_time() - start
                return

    def _has_marker(self, pid: int) -> bool:
        if self.marker is None:
            return False
        if pid not in self._marked:
            self._marked[pid] = self.marker in (_read(f"/proc/{pid}/cmdline") or "")
        return self._marked[pid]

    def sample(self, pss_too: bool = True) -> None:
        parents: dict[int, int] = {}
        cpu: dict[int, float] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                st = _stat(int(entry))
                if st is not None:
                    parents[int(entry)], cpu[int(entry)] = st
        members = {p for p in parents if p == self.root or self._has_marker(p)}
        grew = True
        while grew:
            more = {p for p, pp in parents.items() if pp in members and p not in members}
            members |= more
            grew = bool(more)
        if self._base is None:  # a joined cluster's processes count from the run's start
            self._base = {p: cpu[p] for p in members if p != self.root}
        rss = pss = 0
        for pid in members:
            r, p = _mem_kib(pid, pss_too)
            rss, pss = rss + r, pss + p
            self.stats.cpu_by_pid[pid] = cpu[pid] - self._base.get(pid, 0.0)
            # Ray workers retitle themselves (ray::IDLE, then ray::Actor): keep the last real name.
            cmdline = _read(f"/proc/{pid}/cmdline")
            if cmdline:  # empty once a process has exited
                label = _label(cmdline)
                if label != "ray::IDLE" or pid not in self.stats.label_by_pid:
                    self.stats.label_by_pid[pid] = label
        s = self.stats
        s.samples += 1
        s.peak_rss_kib = max(s.peak_rss_kib, rss)
        s.peak_pss_kib = max(s.peak_pss_kib, pss)
        s.peak_procs = max(s.peak_procs, len(members))


def cpu_seconds(pid: int) -> float:
    st = _stat(pid)
    return st[1] if st else 0.0


# ---------------------------------------------------------------- the tools


@dataclass
class RunResult:
    tool: str
    run: int
    wall_s: float
    images: int
    exit_code: int
    tree: TreeStats
    server_cpu_s: float
    log: Path
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s else 0.0


PACKAGES = ("builder", "cluster", "actors", "serve")


def compile_project() -> None:
    """Bring the project's cached bytecode up to date before timing, as a user's first run
    does. Without it, a shell with ``PYTHONDONTWRITEBYTECODE`` set (or a read-only checkout)
    has every PixCrawler process compile the modules changed since their last cached copy at
    every start: about 0.15 s of CPU a process here. img2dataset's venv was compiled when pip
    installed it."""
    for package in PACKAGES:
        if not compileall.compile_dir(ROOT / package, quiet=1):
            raise SystemExit(f"could not compile {ROOT / package}: see the errors above")


def run_command(cmd: list[str], env: dict[str, str], log_path: Path, server_pid: int,
                timeout_s: float, marker: Optional[str] = None) -> tuple[float, int, TreeStats,
                                                                         float]:
    """Run ``cmd`` to its end; (wall seconds, exit code, tree stats, server CPU seconds).

    Past ``timeout_s`` the command gets SIGINT (PixCrawler then writes a partial dataset), and
    SIGKILL 60 s later; its exit code says so.
    """
    server_cpu0 = cpu_seconds(server_pid)
    load0 = os.getloadavg()[0]
    with log_path.open("w") as log:
        log.write(f"# {datetime.now().isoformat()} {shlex.join(cmd)}\n")
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        monitor = TreeMonitor(proc.pid, marker)
        monitor.start()
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.write(f"# timed out after {timeout_s:g} s: SIGINT\n")
            log.flush()
            proc.send_signal(signal.SIGINT)
            try:
                code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        wall = time.perf_counter() - t0
        log.write(f"# {datetime.now().isoformat()} exit {code} after {wall:.2f} s\n")
    tree = monitor.stop()
    tree.load = (load0, os.getloadavg()[0])
    return wall, code, tree, cpu_seconds(server_pid) - server_cpu0


def pxc_spec(n: int, urls: Path, out: str, args: argparse.Namespace) -> dict[str, Any]:
    """The PixCrawler spec: one class, the URL list as its only source, Parquet only."""
    resources: dict[str, Any] = {}
    for key in ("workers", "worker_cpus", "batch_size", "max_in_flight_batches",
                "max_buffered_mb", "dedup_partitions"):
        value = getattr(args, key)
        if value is not None:
            resources[key] = value
    return {
        "name": "bench",
        "description": f"{n} loopback JPEGs, PixCrawler vs img2dataset benchmark",
        "target": n,
        "classes": {"bench": {}},
        # per_page x max_pages must cover the list: the urllist engine pages through it.
        "sources": [{"engine": "urllist", "path": str(urls), "per_page": 500,
                     "max_pages": max(20, n // 500 + 2)}],
        "download": {"allow_private_networks": True, "timeout_s": 10, "retries": 0,
                     "concurrency": args.concurrency, "per_host_concurrency": args.per_host,
                     "respect_robots": not args.no_robots},
        "validation": {"level": args.level},
        "output": {"uri": out, "formats": ["parquet"], "shard_size": args.shard_size},
        "resources": resources,
    }


PXC_FLAGS = {"pxc": [], "pxc-ray": ["--ray"], "pxc-local": ["--local"], "pxc-join": [],
             "pxc-resize": []}
"""PixCrawler's commands: the default (the runner it chooses: in this process on a machine of
up to 4 cores), Ray forced, this process forced, a local Ray joined (``--address`` of a
``JoinedRay``, added per run), and the default over the resizing spec (``resize_spec``)."""


def resize_spec(spec: dict[str, Any], side: int, resample: str) -> dict[str, Any]:
    """``spec`` with every accepted image resized to ``side`` on its longer side (never up,
    with the filter ``resample``) and re-encoded as JPEG quality 95, as ``i2d-resize`` does."""
    return {**spec, "output": {**spec["output"], "resize": {"max_side": side,
                                                            "mode": "keep_ratio",
                                                            "resample": resample},
                               "encode": {"format": "jpeg", "quality": 95}}}


class JoinedRay:
    """A local Ray cluster for a ``pxc-join`` run (a head with this machine's cores, no
    dashboard), in its own RAY_TMPDIR: that path, in its processes' command lines, is how the
    tree monitor finds them. Up after ``SETTLE_S`` more, so that its daemons have finished
    starting before the run. It starts no idle worker until a driver connects: the run's
    own driver gets them, and the run pays for them as a job on a running cluster does."""

    SETTLE_S = 3.0

    def __init__(self) -> None:
        from ray.cluster_utils import Cluster

        self.tmp = Path(tempfile.mkdtemp(prefix="pxcj-", dir="/tmp"))  # short: socket paths
        env = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_TMPDIR": str(self.tmp)}
        self._env = {name: os.environ.get(name) for name in env}  # put back by close()
        os.environ.update(env)
        self.cluster: Optional[Any] = None
        try:
            t0 = time.perf_counter()
            self.cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": os.cpu_count(), "include_dashboard": False})
            self.cluster.wait_for_nodes()
            self.start_s = time.perf_counter() - t0
            self.address = self.cluster.address
            time.sleep(self.SETTLE_S)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "JoinedRay":
        print(f"  a local Ray to join at {self.address}, up in {self.start_s:.1f} s", flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the cluster and put this process's environment back as it was."""
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
        for name, value in self._env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(self.tmp, ignore_errors=True)


def run_pixcrawler(tool: str, run: int, spec_path: Path, out: str, server_pid: int,
                   timeout_s: float, store: LocalStore,
                   joined: Optional[JoinedRay] = None) -> RunResult:
    """``pixcrawler build spec.yaml`` with the flags of ``tool`` (``PXC_FLAGS``), this
    checkout's code (PYTHONPATH), its own RAY_TMPDIR when it starts Ray, writing to ``out``
    in ``store``; ``pxc-join`` joins ``joined``."""
    store.clear(out)
    ray_tmp = Path(tempfile.mkdtemp(prefix="pxcb-", dir="/tmp"))  # short: Ray's socket paths
    env = {**os.environ, **store.env, "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(PXC_BIN), "build", str(spec_path), "--output", out] + PXC_FLAGS[tool]
    marker = str(ray_tmp)
    if tool == "pxc-join":
        assert joined is not None, "pxc-join runs only with a JoinedRay"
        cmd += ["--address", joined.address]
        marker = str(joined.tmp)
    log_path = OUT / "logs" / f"{tool}-{spec_path.stem}-run{run}.log"
    store_cpu0 = sum(map(cpu_seconds, store.pids))
    wall, code, tree, server_cpu = run_command(cmd, env, log_path, server_pid, timeout_s,
                                               marker=marker)
    store_cpu = sum(map(cpu_seconds, store.pids)) - store_cpu0
    stats = store.read_json(f"{out}/stats.json")
    images = int(stats.get("accepted", 0))
    detail = {"stats": stats, "rows": store.parquet_rows(f"{out}/data"),
              "cmd": shlex.join(cmd), "ray_tmp": str(ray_tmp), "store_cpu_s": store_cpu,
              "phases": pxc_phases(log_path, stats, wall)}
    store.drop(out)
    if tool == "pxc-ray":
        _keep_ray_logs(ray_tmp, OUT / "logs" / f"{tool}-{spec_path.stem}-run{run}-ray")
    shutil.rmtree(ray_tmp, ignore_errors=True)
    return RunResult(tool, run, wall, images, code, tree, server_cpu, log_path, detail)


I2D_MODES = {"i2d": "issue", "i2d-raw": "raw", "i2d-decode": "decode", "i2d-resize": "resize"}


def i2d_command(urls: Path, out: Path, mode: str, args: argparse.Namespace) -> list[str]:
    resize = (["--resize_mode", "keep_ratio_largest", "--image_size", str(args.resize_side),
               "--resize_only_if_bigger", "True"] if mode == "resize" else
              ["--resize_mode", "no"])
    cmd = [str(I2D_BIN), "--url_list", str(urls), "--input_format", "txt",
           "--output_folder", str(out), "--output_format", "parquet", *resize,
           "--processes_count", str(os.cpu_count() or 2),
           "--thread_count", str(args.i2d_threads),
           "--number_sample_per_shard", str(args.i2d_shard), "--timeout", "10",
           "--retries", "0", "--enable_wandb", "False"]
    if mode == "raw":
        cmd += ["--disable_all_reencoding", "True"]
    elif mode == "decode":
        cmd += ["--skip_reencode", "True"]
    return cmd


def run_img2dataset(tool: str, run: int, urls: Path, out: Path, server_pid: int,
                    args: argparse.Namespace) -> RunResult:
    shutil.rmtree(out, ignore_errors=True)
    env = {**START_ENV, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled",
           "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    cmd = i2d_command(urls, out, I2D_MODES[tool], args)
    log_path = OUT / "logs" / f"{tool}-run{run}.log"
    wall, code, tree, server_cpu = run_command(cmd, env, log_path, server_pid, args.timeout)
    successes = failures = 0
    for path in sorted(out.glob("*_stats.json")):
        st = _json(path)
        successes += int(st.get("successes", 0))
        failures += int(st.get("failed_to_download", 0)) + int(st.get("failed_to_resize", 0))
    detail = {"failures": failures, "rows": _parquet_rows(out, success_only=True),
              "cmd": shlex.join(cmd)}
    return RunResult(tool, run, wall, successes, code, tree, server_cpu, log_path, detail)


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _parquet_rows(folder: Path, success_only: bool = False) -> int:
    """Rows (with image bytes) across the Parquet files under ``folder``: a cross-check."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    total = 0
    for path in sorted(folder.rglob("*.parquet")):
        if success_only:
            table = pq.read_table(path, columns=["status"])
            total += int(pc.sum(pc.equal(table["status"], "success")).as_py() or 0)
        else:
            total += pq.ParquetFile(path).metadata.num_rows
    return total


def _keep_ray_logs(ray_tmp: Path, dest: Path) -> None:
    """Keep the session's logs (for profiling); the rest of RAY_TMPDIR is removed."""
    shutil.rmtree(dest, ignore_errors=True)
    for logs in ray_tmp.glob("ray/session_*/logs"):
        shutil.copytree(logs, dest, dirs_exist_ok=True)


# ---------------------------------------------------------------- PixCrawler's phases

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _stamp(line: str) -> Optional[float]:
    m = _STAMP.match(line)
    if not m:
        return None
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def pxc_phases(log_path: Path, stats: dict[str, Any], wall: float) -> dict[str, float]:
    """Seconds per phase, from the job log's timestamps and stats.json's started/finished.

    start-up (Python imports, spec) + ray.init (for the in-process runner: until it says so),
    planning (pools, actors), crawl (search + fetch + validate + dedup + shard writes), write
    (manifests, publish), exit (Ray shutdown and interpreter exit).
    """
    lines = log_path.read_text(errors="replace").splitlines()
    began = re.match(r"^# (\S+) ", lines[0]) if lines else None
    t0 = datetime.fromisoformat(began.group(1)).timestamp() if began else None
    marks: dict[str, float] = {}
    for line in lines:
        t = _stamp(line)
        if t is None:
            continue
        if "Ray embedded" in line or "Ray cluster" in line or "running in this process" in line:
            marks["ray_up"] = t
        elif re.search(r"\] (succeeded|cancelled):", line):
            marks["written"] = t
    started, finished = stats.get("started"), stats.get("finished")
    if t0 is None or not {"ray_up", "written"} <= marks.keys() or not started:
        return {}
    return {
        "startup+ray.init": round(marks["ray_up"] - t0, 2),
        "planning": round(started - marks["ray_up"], 2),
        "crawl": round(finished - started, 2),
        "write": round(marks["written"] - finished, 2),
        "exit": round(t0 + wall - marks["written"], 2),
    }


# ---------------------------------------------------------------- report


def mib(kib: int) -> float:
    return kib / 1024


def print_run(r: RunResult) -> None:
    t = r.tree
    print(f"  {r.tool:<11} run {r.run}: {r.wall_s:7.2f} s wall, {r.images:5d} images, "
          f"{r.images_per_s:7.1f} images/s, peak RSS {mib(t.peak_rss_kib):7.0f} MiB "
          f"(PSS {mib(t.peak_pss_kib):6.0f} MiB, {t.peak_procs} procs), exit {r.exit_code}, "
          f"server CPU {r.server_cpu_s:.1f} s"
          + (f", S3 server CPU {r.detail['store_cpu_s']:.1f} s" if r.detail.get("store_cpu_s")
             else "") + f", load {t.load[0]:.1f}->{t.load[1]:.1f}", flush=True)
    top = ", ".join(f"{k} {v:.1f}" for k, v in list(t.cpu_by_label().items())[:8])
    print(f"      CPU {t.cpu_s:.1f} s in the tree (sampled; "
          f"{1000 * t.cpu_s / max(1, r.images):.1f} ms per image): {top}; "
          f"the sampler itself {t.monitor_cpu_s:.1f} s")
    if r.detail.get("phases"):
        print("      phases (s): " + ", ".join(f"{k} {v}" for k, v in r.detail["phases"].items()))


def _mmm(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarise(tool: str, runs: list[RunResult], n: int) -> dict[str, Any]:
    """min / median / max of each figure of ``tool``'s runs over a job of ``n`` URLs."""
    if not runs:
        return {}
    return {
        "tool": tool,
        "runs": len(runs),
        "wall_s": _mmm([r.wall_s for r in runs]),
        "images": _mmm([r.images for r in runs]),
        "urls_per_s": _mmm([n / r.wall_s for r in runs]),
        "cpu_s": _mmm([r.tree.cpu_s for r in runs]),
        "cpu_ms_per_url": _mmm([1000 * r.tree.cpu_s / n for r in runs]),
        "peak_rss_mib": _mmm([mib(r.tree.peak_rss_kib) for r in runs]),
        "peak_pss_mib": _mmm([mib(r.tree.peak_pss_kib) for r in runs]),
        "load": _mmm([r.tree.load[0] for r in runs]),
        "cmd": runs[0].detail.get("cmd", ""),
    }


PAIRS = [("pxc", "i2d", 1.5), ("pxc", "i2d-raw", 1.0), ("pxc-ray", "i2d", None),
         ("pxc-ray", "i2d-raw", None), ("pxc-join", "i2d", None), ("pxc-local", "i2d", None),
         ("pxc-resize", "i2d-resize", None)]
"""(ours, theirs, the issue's target for ours / theirs in speed, if it sets one)."""


def pair_ratios(results: dict[str, list[RunResult]]) -> list[dict[str, Any]]:
    """Speed of ours over theirs (their wall time / ours) for each round of interleaved runs,
    and the median of those per-round ratios."""
    out = []
    for ours, theirs, target in PAIRS:
        a, b = results.get(ours, []), results.get(theirs, [])
        per_run = [y.wall_s / x.wall_s for x, y in zip(a, b) if x.wall_s]
        if per_run:
            out.append({"ours": ours, "theirs": theirs, "per_run": per_run,
                        "median": statistics.median(per_run), "target": target})
    return out


def run_floor(url_file: Path, tag: str) -> dict[str, float]:
    """``work_floor.py`` in its own process over the job's URLs: the limit for this machine."""
    dest = OUT / f"floor-{tag}.json"
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "work_floor.py"), str(url_file),
                          "--json", str(dest)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        raise RuntimeError(f"work_floor.py failed ({out.returncode}):\n{out.stderr[-2000:]}")
    print("  " + out.stdout.strip(), flush=True)
    return json.loads(dest.read_text())


def fixed_cost(args: argparse.Namespace, port: int, server_pid: int,
               store: LocalStore) -> dict[str, Any]:
    """The default command and ``--ray`` on a job of one image, ``--fixed-runs`` times each,
    interleaved: start to exit with (almost) nothing to do."""
    one = OUT / "urls-1.txt"
    one.write_text(f"http://127.0.0.1:{port}/bench/00000.jpg\n")
    spec_path = OUT / "pxc_spec_1.yaml"
    out = store.uri("pxc-1")
    spec_path.write_text(yaml.safe_dump(pxc_spec(1, one, out, args), sort_keys=False))
    runs: dict[str, list[RunResult]] = {"pxc": [], "pxc-ray": []}
    for k in range(1, args.fixed_runs + 1):
        for tool in runs:
            r = run_pixcrawler(tool, k, spec_path, out, server_pid, 300, store)
            runs[tool].append(r)
            print(f"  fixed cost, {tool:<8} run {k}: {r.wall_s:6.2f} s wall, CPU "
                  f"{r.tree.cpu_s:5.1f} s, peak RSS {mib(r.tree.peak_rss_kib):5.0f} MiB, "
                  f"{r.images} image(s), exit {r.exit_code}", flush=True)
    return {tool: {"wall_s": _mmm([r.wall_s for r in rs]), "cpu_s": _mmm([r.tree.cpu_s
                                                                          for r in rs]),
                   "peak_rss_mib": _mmm([mib(r.tree.peak_rss_kib) for r in rs])}
            for tool, rs in runs.items()}


TOOLS = ["pxc", "pxc-ray", "i2d", "i2d-raw"]


def _side(text: str) -> int:
    side = int(text)
    if side < 8:
        raise argparse.ArgumentTypeError(f"{side} is below 8, the least output.resize.max_side")
    return side


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4000, help="distinct images in the corpus")
    p.add_argument("--corpus", default="photos", choices=["photos", "generated"],
                   help="photos: crops of real photographs (photo_corpus.py); generated: the "
                        "sandbox's benchmark pictures (loopback.corpus_pack)")
    p.add_argument("--runs", type=int, default=1, help="rounds of interleaved runs; medians")
    p.add_argument("--tools", default=",".join(TOOLS),
                   help="comma-separated, run in this order each round: pxc (the default "
                        "command), pxc-ray (--ray), pxc-local (--local), pxc-join (--address "
                        "of a local Ray started before each run), i2d (img2dataset's "
                        "default), i2d-raw (--disable_all_reencoding), i2d-decode "
                        "(--skip_reencode), pxc-resize and i2d-resize (both resizing to "
                        "--resize-side)")
    p.add_argument("--no-floor", action="store_true",
                   help="skip the one-process floor (work_floor.py) before and after the runs")
    p.add_argument("--fixed-runs", type=int, default=0,
                   help="first, time the default command and --ray on a job of one image, "
                        "this many times each (the fixed cost of each runner)")
    p.add_argument("--store", default="local", choices=["local", "s3"],
                   help="where PixCrawler writes: local disk (bench/out/pxc) or an S3 bucket "
                        "on a moto server on 127.0.0.1, started untimed")
    p.add_argument("--store-mbps", type=float, default=0.0,
                   help="with --store s3: each connection's uploads paced to this many MB/s "
                        "(bench/throttle.py between the command and moto), as a store far "
                        "away takes time but no CPU here to take a shard; 0: loopback speed")
    p.add_argument("--timeout", type=float, default=600,
                   help="seconds before a command is interrupted (a hung run reports exit 130)")
    g = p.add_argument_group("PixCrawler spec knobs (unset: the spec's defaults)")
    g.add_argument("--level", default="medium", choices=["fast", "medium"])
    g.add_argument("--concurrency", type=int, default=256, help="download.concurrency")
    g.add_argument("--per-host", type=int, default=256, help="download.per_host_concurrency "
                   "(the corpus is one host; img2dataset has no per-host cap)")
    g.add_argument("--no-robots", action="store_true", help="download.respect_robots false")
    g.add_argument("--shard-size", type=int, default=1000, help="output.shard_size")
    g.add_argument("--workers", type=int, help="resources.workers")
    g.add_argument("--worker-cpus", type=float, help="resources.worker_cpus")
    g.add_argument("--batch-size", type=int, help="resources.batch_size")
    g.add_argument("--max-in-flight-batches", type=int, help="resources.max_in_flight_batches")
    g.add_argument("--max-buffered-mb", type=int, help="resources.max_buffered_mb")
    g.add_argument("--dedup-partitions", type=int, help="resources.dedup_partitions")
    g = p.add_argument_group("resizing (pxc-resize and i2d-resize)")
    g.add_argument("--resize-side", type=_side, default=256,
                   help="the longer side of every image written (at least 8)")
    g.add_argument("--resample", default="lanczos",
                   choices=["lanczos", "bicubic", "bilinear", "box"],
                   help="pxc-resize's output.resize.resample (box is the filter of "
                        "img2dataset's default, INTER_AREA)")
    g = p.add_argument_group("img2dataset knobs")
    g.add_argument("--i2d-threads", type=int, default=32, help="--thread_count")
    g.add_argument("--i2d-shard", type=int, default=1000,
                   help="--number_sample_per_shard (its default, 10000, would leave one of "
                        "the 2 processes idle on 4,000 URLs)")
    return p


def print_summary(args: argparse.Namespace, summaries: dict[str, dict[str, Any]],
                  ratios: list[dict[str, Any]], floor: list[dict[str, float]],
                  fixed: dict[str, Any]) -> None:
    cores = os.cpu_count()
    print(f"\nN = {args.n} ({args.corpus}), {args.runs} round(s), interleaved in the order "
          f"{args.tools}; {cores} cores; figures min / median / max")
    for s in summaries.values():
        if not s:
            continue
        f = lambda key, fmt: "/".join(format(s[key][m], fmt) for m in ("min", "median",  # noqa
                                                                       "max"))
        print(f"  {s['tool']:<10} wall {f('wall_s', '.1f')} s  {f('urls_per_s', '.0f')} URLs/s"
              f"  images {f('images', '.0f')}  CPU {f('cpu_s', '.1f')} s "
              f"({f('cpu_ms_per_url', '.2f')} ms/URL)  peak RSS {f('peak_rss_mib', '.0f')} MiB"
              f"  PSS {f('peak_pss_mib', '.0f')} MiB  load {f('load', '.1f')}")
    for r in ratios:
        met = r["target"] is not None and r["median"] >= r["target"]
        verdict = ("" if r["target"] is None else
                   f" (target >= {r['target']}: {'met' if met else 'MISSED'})")
        print(f"  {r['ours']} / {r['theirs']} speed: per round "
              + ", ".join(f"{x:.2f}" for x in r["per_run"]) + f"; median {r['median']:.2f}"
              + verdict)
    if floor:
        best = min(floor, key=lambda x: x["floor"])
        limit = best["limit_images_per_s"]
        print(f"  limit (least of {len(floor)} floor measures): {best['floor']:.2f} ms CPU per "
              f"image x {cores} cores = {limit:.0f} images/s")
        for s in summaries.values():
            if s:
                share = s["urls_per_s"]["median"] / limit
                print(f"    {s['tool']:<10} {100 * share:5.1f}% of the limit; CPU per URL "
                      f"{s['cpu_ms_per_url']['median'] / best['floor']:.2f}x the floor")
    cpu = {t: summaries[t]["cpu_ms_per_url"]["median"]
           for t in ("pxc", "pxc-ray", "pxc-join", "pxc-local") if summaries.get(t)}
    local = cpu.get("pxc-local", cpu.get("pxc"))
    for tool, how in (("pxc-ray", "embedded"), ("pxc-join", "joined")):
        if tool in cpu and local:
            ratio = cpu[tool] / local
            print(f"  CPU per image, Ray ({how}) / in-process: {ratio:.2f} (target <= 1.25: "
                  f"{'met' if ratio <= 1.25 else 'MISSED'})")
    if fixed:
        ray = fixed["pxc-ray"]["wall_s"]["median"]
        print(f"  one-image job, median wall: default {fixed['pxc']['wall_s']['median']:.2f} s,"
              f" --ray {ray:.2f} s (embedded Ray's fixed cost target <= 5 s: "
              f"{'met' if ray <= 5 else 'MISSED'})")
    print("commands:")
    for s in summaries.values():
        if s:
            print(f"  {s['cmd']}")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    tools = [t for t in args.tools.split(",") if t]
    unknown = [t for t in tools if t not in PXC_FLAGS and t not in I2D_MODES]
    if unknown:
        print(f"unknown tool(s) {', '.join(unknown)}; known: "
              f"{', '.join([*PXC_FLAGS, *I2D_MODES])}", file=sys.stderr)
        return 2
    if any(t in I2D_MODES for t in tools) and not I2D_BIN.exists():
        print(f"img2dataset is not installed at {I2D_BIN}: run `bash bench/setup_img2dataset.sh`"
              " first, or leave the i2d tools out of --tools", file=sys.stderr)
        return 2
    (OUT / "logs").mkdir(parents=True, exist_ok=True)
    compile_project()
    port = free_port()
    server = start_server(args.corpus, args.n, port, OUT / "logs" / "corpus-server.log")
    store = LocalStore()
    results: dict[str, list[RunResult]] = {tool: [] for tool in tools}
    floor: list[dict[str, float]] = []
    fixed: dict[str, Any] = {}
    try:
        if args.store == "s3":
            store = MotoStore(OUT / "logs" / "moto-server.log", args.store_mbps)
        urls = [f"http://127.0.0.1:{port}/bench/{i:05d}.jpg" for i in range(args.n)]
        check_s, total = check_corpus(urls)
        print(f"corpus ({args.corpus}): {args.n} distinct JPEGs, {total / args.n / 1024:.1f} KiB"
              f" on average, served by pid {server.pid} at http://127.0.0.1:{port} "
              f"(each fetched once in {check_s:.1f} s before timing)", flush=True)
        load = os.getloadavg()
        print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} "
              "cores", flush=True)
        url_file = OUT / "urls.txt"
        url_file.write_text("\n".join(urls) + "\n")
        if not args.no_floor:
            floor.append(run_floor(url_file, "before"))
        if args.fixed_runs:
            fixed = fixed_cost(args, port, server.pid, store)
        spec = pxc_spec(args.n, url_file, store.uri("pxc"), args)
        spec_path = OUT / "pxc_spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
        resize_path = OUT / "pxc_resize_spec.yaml"
        resize_path.write_text(yaml.safe_dump(resize_spec(spec, args.resize_side, args.resample),
                                              sort_keys=False))
        for k in range(1, args.runs + 1):
            for tool in tools:
                if tool in I2D_MODES:
                    r = run_img2dataset(tool, k, url_file, OUT / "i2d", server.pid, args)
                else:
                    with JoinedRay() if tool == "pxc-join" else nullcontext() as joined:
                        r = run_pixcrawler(tool, k, resize_path if tool == "pxc-resize"
                                           else spec_path, store.uri("pxc"), server.pid,
                                           args.timeout, store, joined)
                results[tool].append(r)
                print_run(r)
        if not args.no_floor:
            floor.append(run_floor(url_file, "after"))
    finally:
        store.close()
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()

    summaries = {tool: summarise(tool, runs, args.n) for tool, runs in results.items()}
    ratios = pair_ratios(results)
    print_summary(args, summaries, ratios, floor, fixed)
    print(f"  spec: {spec_path}")
    if "pxc-resize" in tools:
        print(f"  pxc-resize spec: {resize_path}")
    (OUT / f"bench_vs_img2dataset_{args.corpus}_{args.n}.json").write_text(json.dumps({
        "n": args.n, "args": vars(args), "cores": os.cpu_count(), "summaries": summaries,
        "ratios": ratios, "floor": floor, "fixed_cost": fixed,
        "runs": [{"tool": r.tool, "run": r.run, "wall_s": r.wall_s, "images": r.images,
                  "exit": r.exit_code, "peak_rss_mib": mib(r.tree.peak_rss_kib),
                  "peak_pss_mib": mib(r.tree.peak_pss_kib), "cpu_s": r.tree.cpu_s,
                  "server_cpu_s": r.server_cpu_s,
                  "store_cpu_s": r.detail.get("store_cpu_s"), "load": r.tree.load,
                  "cpu_by_process": r.tree.cpu_by_label(), "phases": r.detail.get("phases"),
                  "parquet_rows": r.detail.get("rows"),
                  "stats": {k: v for k, v in r.detail.get("stats", {}).items()
                            if isinstance(v, (int, float, str))}}
                 for rs in results.values() for r in rs],
    }, indent=2, default=str))
    bad = [r for rs in results.values() for r in rs if r.exit_code != 0]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
