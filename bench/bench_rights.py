"""What the rights ledger costs per image: ``pixcrawler build --local`` over N distinct images on
127.0.0.1 with every opt-out signal on, against the same run with every signal off.

The corpus is the loopback pack of ``bench/loopback.py`` (N distinct ~40 KB JPEGs, rendered once
into bench/out/), served with ``--signals``: robots.txt with a group for us, Content-Signal and
per-path Content-Usage lines, a tdmrep.json of three location rules, an ai.txt, and on every
image the X-Robots-Tag, tdm-reservation and Content-Usage headers, all allowing use, so every
image is checked against real rules and kept. Both runs use the same spec (validation medium,
Parquet output) except:

- **on**: the defaults: robots.txt, X-Robots-Tag, TDMRep, Content-Usage, Content-Signal,
  ai.txt and XMP plus:DataMining all read, recorded in each image's ``rights`` column;
- **off**: ``respect_robots: false``, ``respect_optouts: false`` and every ``signals.*`` false: no
  per-origin file is read, no header or XMP looked at, ``rights`` empty.

Each command runs as a subprocess, on and off alternating, ``--runs`` times each; its CPU
seconds (user + system, from the kernel's accounting of the waited child) are steadier than its
wall time on a shared machine. Reported: CPU and wall per run, the medians, the extra CPU per
image and the on/off ratio, and the size of the ``rights`` column in the Parquet shards.

Then a micro-benchmark in this process times the ledger's own steps per image, with no I/O:
the origin entries for a path, the response headers, the XMP walk, the Parquet rows, and the
Arrow conversion of the column.

    flock /tmp/pixcrawler-heavy.lock .venv/bin/python bench/bench_rights.py --n 40000 --runs 2

Outputs (specs, URL list, datasets, bench_rights.json) go under bench/out/rights/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from loopback import (SIGNAL_FILES, SIGNAL_HEADERS, corpus_pack, pack_bodies,  # noqa: E402
                      wait_healthy)
from builder.ports import free_port  # noqa: E402

OUT = ROOT / "bench" / "out" / "rights"
OFF = {"respect_robots": False, "respect_optouts": False,
       "signals": {"tdmrep": False, "content_usage": False, "content_signal": False,
                   "xmp_datamining": False, "ai_txt": False}}


def start_server(n: int, port: int) -> subprocess.Popen:
    pack, _ = corpus_pack(n)
    log = (OUT / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "loopback.py"), str(pack),
                             str(port), "--signals"], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    return wait_healthy(proc, port, "the corpus server", OUT / "server.log")


def write_spec(name: str, urls: Path, n: int, off: bool) -> Path:
    download: dict[str, Any] = {"allow_private_networks": True, "timeout_s": 10, "retries": 0,
                                "concurrency": 256, "per_host_concurrency": 256}
    if off:
        download.update(OFF)
    spec = {"name": f"rights-{name}", "target": n, "classes": {"bench": None},
            "sources": [{"engine": "urllist", "path": str(urls), "per_page": 500}],
            "download": download,
            "output": {"uri": str(OUT / name), "formats": ["parquet"], "overwrite": True}}
    path = OUT / f"spec-{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run(name: str, spec: Path) -> dict[str, Any]:
    """One ``pixcrawler build --local``: its CPU seconds (user + sys) and wall time."""
    shutil.rmtree(OUT / name, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "pixcrawler"), "build", str(spec),
                    "--local"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   stderr=(OUT / f"{name}.log").open("w"))
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    stats = json.loads((OUT / name / "stats.json").read_text())
    return {"name": name, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
            "accepted": stats["accepted"], "rejected": stats["rejected"],
            "rights": stats.get("rights", {}), "rights_bytes": rights_bytes(OUT / name)}


def rights_bytes(root: Path) -> int:
    """Compressed bytes of the ``rights`` column over the dataset's Parquet shards."""
    import pyarrow.parquet as pq

    total = 0
    for path in sorted((root / "data").glob("*.parquet")):
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                if column.path_in_schema.startswith("rights."):
                    total += column.total_compressed_size
    return total


def micro(n: int) -> dict[str, float]:
    """Microseconds per image of each ledger step, in this process, without I/O."""
    import pyarrow as pa
    from multidict import CIMultiDict
    from yarl import URL

    from builder.rights import RIGHTS_TYPE, rights_rows
    from builder.robots import RobotsPolicy
    from builder.signals import OriginSignals, ResponseSignals, embedded_signals, parse_tdmrep
    from builder.spec import DownloadSpec
    from loopback import corpus_pack as pack_of

    cfg = DownloadSpec()
    origin = OriginSignals(
        cfg, RobotsPolicy.from_response(200, SIGNAL_FILES["/robots.txt"].encode()),
        parse_tdmrep(200, SIGNAL_FILES["/.well-known/tdmrep.json"].encode()),
        RobotsPolicy.from_response(200, SIGNAL_FILES["/ai.txt"].encode()))
    headers = CIMultiDict(SIGNAL_HEADERS)
    response_signals = ResponseSignals(cfg)
    pack, offsets = pack_of(n)
    images = pack_bodies(pack, offsets, 2000)
    urls = [URL(f"http://127.0.0.1:8000/bench/{i:05d}.jpg") for i in range(n)]
    out: dict[str, float] = {}

    def timed(label: str, fn: Any) -> Any:
        fn()  # once untimed: first calls pay for imports and caches
        start = time.perf_counter()
        value = fn()
        out[label] = round((time.perf_counter() - start) / n * 1e6, 2)
        return value

    ledgers = timed("origin entries", lambda: [origin.ledger(u) for u in urls])
    timed("response headers", lambda: [response_signals(headers) for _ in urls])
    timed("XMP walk", lambda: [embedded_signals(images[i % len(images)], "jpeg")
                               for i in range(n)])
    full = [ledger + response_signals(headers) + embedded_signals(images[0], "jpeg")
            for ledger in ledgers]
    rows = timed("Parquet rows", lambda: [rights_rows(ledger) for ledger in full])
    timed("Arrow column", lambda: pa.array(rows, RIGHTS_TYPE))
    out["total"] = round(sum(out.values()), 2)
    out["entries per image"] = len(full[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=40_000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--skip-runs", action="store_true", help="the micro-benchmark only")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"n": args.n, "cores": os.cpu_count(),
                               "loadavg_before": os.getloadavg()}
    if not args.skip_runs:
        port = free_port()
        server = start_server(args.n, port)
        try:
            urls = OUT / "urls.txt"
            urls.write_text("".join(f"http://127.0.0.1:{port}/bench/{i:05d}.jpg\n"
                                    for i in range(args.n)))
            specs = {"on": write_spec("on", urls, args.n, off=False),
                     "off": write_spec("off", urls, args.n, off=True)}
            runs = []
            for i in range(args.runs):
                for name in (("on", "off") if i % 2 == 0 else ("off", "on")):
                    r = run(name, specs[name])
                    runs.append(r)
                    print(f"{name:>3}: {r['cpu_s']:7.1f} CPU s  {r['wall_s']:6.1f} s wall  "
                          f"{r['accepted']} accepted  rights column {r['rights_bytes']} B  "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)
        finally:
            server.terminate()
            server.wait()
        med = {name: {k: statistics.median(r[k] for r in runs if r["name"] == name)
                      for k in ("cpu_s", "wall_s")} for name in ("on", "off")}
        extra = (med["on"]["cpu_s"] - med["off"]["cpu_s"]) / args.n * 1e6
        results.update(runs=runs, median=med, extra_cpu_us_per_image=round(extra, 1),
                       cpu_ratio=round(med["on"]["cpu_s"] / med["off"]["cpu_s"], 3),
                       wall_ratio=round(med["on"]["wall_s"] / med["off"]["wall_s"], 3))
        print(f"median CPU on {med['on']['cpu_s']:.1f} s / off {med['off']['cpu_s']:.1f} s = "
              f"{results['cpu_ratio']:.3f}; {extra:+.1f} us CPU per image; wall ratio "
              f"{results['wall_ratio']:.3f}")
    results["micro_us_per_image"] = micro(args.n)
    print("ledger steps, us per image:", json.dumps(results["micro_us_per_image"]))
    results["loadavg_after"] = os.getloadavg()
    (OUT / "bench_rights.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
