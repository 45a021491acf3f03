"""Peak memory of a job whose URLs all answer large valid photos, by ``resources.max_held_mb``.

A unit keeps each image it validates until the whole unit is decided, so a worker running
several units held up to units x ``batch_size`` x the images' size, whatever the fetcher's
byte budget (which counts only bodies not yet validated). ``resources.max_held_mb``
(``builder.held``) makes a unit's next download wait while its worker holds more, unless the
unit is the worker's oldest.

The bodies: ``--images`` distinct noise JPEGs of ``--side`` px a side (about 3 MB at 1600),
each served under many of the ``--n`` URLs by a server in its own process (this script with
``--serve``), so most candidates are exact duplicates: still held until their unit is
decided, then rejected. The spec keeps the download defaults: 16 downloads per host at once,
so a unit of 64 candidates asks for its turn 48 times. Each run is the whole command,
``pixcrawler build spec.yaml --local`` (two worker processes here), its process tree's peak RSS
and PSS sampled from /proc (``bench_vs_img2dataset.TreeMonitor``), the limits alternated
``--rounds`` times. "off" is ``max_held_mb`` at its upper bound, which never binds.

    .venv/bin/python bench/bench_held_memory.py [--n 384] [--side 1600] [--limits off,64]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Optional

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_hostile_memory import run_capped  # noqa: E402
from loopback import wait_healthy  # noqa: E402
from builder.ports import free_port  # noqa: E402
from builder.spec import MAX_BUFFERED_MB  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "held"


def photos(count: int, side: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    out = []
    for seed in range(count):
        pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def serve(port: int, count: int, side: int) -> None:
    """GET /big/{i}.jpg answers photo i mod ``count``; /healthz ok."""
    import asyncio

    from aiohttp import web

    bodies = photos(count, side)

    async def handler(request: web.BaseRequest) -> web.Response:
        path = request.path
        if path == "/healthz":
            return web.Response(text="ok")
        if path.startswith("/big/") and path.endswith(".jpg") and path[5:-4].isdigit():
            return web.Response(body=bodies[int(path[5:-4]) % count],
                                content_type="image/jpeg")
        return web.Response(status=404)

    async def main() -> None:
        server = web.Server(handler)
        runner = web.ServerRunner(server)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    asyncio.run(main())


def start_server(port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--images",
                             str(args.images), "--side", str(args.side)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    return wait_healthy(proc, port, "the photo server", log)


def spec(urls: Path, held_mb: int, n: int) -> dict[str, Any]:
    return {
        "name": "held", "target": n, "classes": {"big": None},
        "sources": [{"engine": "urllist", "path": str(urls)}],
        "download": {"allow_private_networks": True, "timeout_s": 120, "retries": 0,
                     "respect_robots": False, "respect_optouts": False},
        "output": {"formats": ["parquet"]},
        "resources": {"max_held_mb": held_mb},
    }


def run(limit: str, round_: int, urls: Path, args: argparse.Namespace) -> dict[str, Any]:
    held_mb = MAX_BUFFERED_MB if limit == "off" else int(limit)
    name = f"held-{limit}-{round_}"
    spec_path = OUT / f"{name}.yaml"
    spec_path.write_text(yaml.safe_dump(spec(urls, held_mb, args.n)))
    out = OUT / "datasets" / name
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "cluster.cli", "build", str(spec_path), "--output", str(out),
           "--local"]
    wall, code, tree, capped = run_capped(cmd, env, OUT / f"{name}.log", str(out),
                                          args.timeout, int(args.max_rss_gib * 2**20))
    stats_path = out / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    fetch = stats.get("fetch", {})
    shutil.rmtree(out, ignore_errors=True)
    return {"run": name, "limit": limit, "exit": code, "stopped_at_rss_cap": capped,
            "wall_s": round(wall, 1), "cpu_s": round(tree.cpu_s, 1),
            "peak_rss_mib": round(tree.peak_rss_kib / 1024),
            "peak_pss_mib": round(tree.peak_pss_kib / 1024),
            "candidates": stats.get("candidates"), "accepted": stats.get("accepted"),
            "rejected": stats.get("rejected"),
            "held_bytes_peak_mib": round(fetch.get("held_bytes_peak", 0) / 2**20),
            "held_waits": fetch.get("held_waits", 0), "cmd": shlex.join(cmd)}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=384, help="URLs")
    p.add_argument("--images", type=int, default=12, help="distinct photos behind them")
    p.add_argument("--side", type=int, default=1600, help="each photo's side, px")
    p.add_argument("--limits", default="off,64", help="max_held_mb values; off: never binds")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--max-rss-gib", type=float, default=12.0,
                   help="stop a run whose process tree passes this RSS")
    p.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.images, args.side)
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_server(port, args, OUT / "server.log")
    results = []
    try:
        urls = OUT / "urls.txt"
        urls.write_text("".join(f"http://127.0.0.1:{port}/big/{i}.jpg\n" for i in range(args.n)))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/big/0.jpg") as r:
            size = len(r.read())
        print(f"{args.n} URLs over {args.images} photos of {size / 1e6:.1f} MB, load "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        for round_ in range(args.rounds):
            for limit in args.limits.split(","):
                r = run(limit, round_, urls, args)
                results.append(r)
                ok = (r["accepted"] or 0) + (r["rejected"] or 0) == r["candidates"]
                print(f"max_held_mb {limit:>4s}  exit {r['exit']}  wall {r['wall_s']:6.1f} s  "
                      f"CPU {r['cpu_s']:6.1f} s  peak RSS {r['peak_rss_mib']:6d} MiB  PSS "
                      f"{r['peak_pss_mib']:6d} MiB  held peak {r['held_bytes_peak_mib']:5d} MiB "
                      f"(summed over workers)  waits {r['held_waits']}  {r['accepted']} accepted"
                      f" + {r['rejected']} rejected = {r['candidates']} candidates "
                      f"({'ok' if ok else 'MISMATCH'})", flush=True)
    finally:
        server.terminate()
        server.wait(30)
    (OUT / "bench_held_memory.json").write_text(json.dumps(
        {"args": vars(args), "image_bytes": size, "load_after": os.getloadavg()[0],
         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
