"""Peak memory and CPU of one worker's fetcher over origins that serve long rule files.

The security review's case (forty-first session): one server, reached under many names (a
wildcard DNS entry does it for an attacker), answers robots.txt and ai.txt with 512 KiB of
wildcard rules and tdmrep.json with 512 KiB of locations; each name has one image. A fetcher
that keeps every origin's parsed files grows by about 32 MB an origin. Each run here is a
fresh process (``--child``) that fetches one image on each of ``N`` names, through
``builder.fetch.Fetcher.fetch_many`` with a resolver that maps every name to 127.0.0.1
(``allow_private_networks`` only because the server is on loopback), with a worker
process's garbage collector settings (``builder.worker.settle_process``: the parsed rules
hold reference cycles, so what a bounded cache drops is freed by the collector, whose
settings change the CPU by half); the parent reports its peak RSS (``ru_maxrss``) and CPU. Run it with ``PYTHONPATH`` naming the tree to measure:

    PYTHONPATH=$PWD .venv/bin/python bench/bench_rules_memory.py [--origins 20,40,80]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import Image

from builder.fetch import Fetcher
from builder.records import Candidate, Record
from builder.robots import MAX_ROBOTS_BYTES
from builder.spec import DownloadSpec
from builder.worker import settle_process


def _rule_files() -> tuple[bytes, bytes]:
    """(512 KiB of wildcard Disallow rules for everyone, a tdmrep.json of as many locations
    as fit in 512 KiB)."""
    lines, size, i = ["User-agent: *\n"], 14, 1
    while size < MAX_ROBOTS_BYTES - 40:
        line = f"Disallow: /p{i}*x\n"
        lines.append(line)
        size, i = size + len(line), i + 1
    tdm = json.dumps([{"location": f"/p{i}/*", "tdm-reservation": 1} for i in range(12000)])
    return "".join(lines).encode(), tdm.encode()[:MAX_ROBOTS_BYTES]


class _EveryName(AbstractResolver):
    """Resolves every name to 127.0.0.1, as a wildcard DNS entry would to the attacker's
    server."""

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        return [ResolveResult(hostname=host, host="127.0.0.1", port=port,
                              family=socket.AF_INET, proto=0, flags=socket.AI_NUMERICHOST)]

    async def close(self) -> None:
        pass


async def _fetch_all(origins: int) -> dict[str, Any]:
    robots, tdm = _rule_files()
    image = io.BytesIO()
    Image.new("RGB", (80, 80), (200, 10, 10)).save(image, "PNG")

    async def handler(request: web.Request) -> web.Response:
        if request.path in ("/robots.txt", "/ai.txt"):
            return web.Response(body=robots, content_type="text/plain")
        if request.path == "/.well-known/tdmrep.json":
            return web.Response(body=tdm, content_type="application/json")
        return web.Response(body=image.getvalue(), content_type="image/png")

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with Fetcher(DownloadSpec(allow_private_networks=True),
                           resolver=_EveryName()) as fetcher:
            records = [Record(Candidate(url=f"http://h{i}.rules.test:{port}/img.png",
                                        label="x")) for i in range(origins)]
            await fetcher.fetch_many(records)
            return {"fetched": sum(not r.rejected for r in records),
                    "rejected": sum(r.rejected for r in records),
                    "robots_fetches": fetcher.stats["robots_fetches"]}
    finally:
        await runner.cleanup()


def _child(origins: int) -> None:
    settle_process()  # a worker process's garbage collector settings
    print(json.dumps(asyncio.run(_fetch_all(origins))))


def _measure(origins: int) -> dict[str, Any]:
    """One child's figures: its own peak RSS and CPU (``os.wait4``), what it fetched."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen([sys.executable, __file__, "--child", str(origins)],
                                 stdout=out)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            raise SystemExit(f"the run of {origins} origins failed ({child.returncode})")
        out.seek(0)
        fetched = json.loads(out.read().strip().splitlines()[-1])
    return {"origins": origins, **fetched, "peak_rss_mib": round(usage.ru_maxrss / 1024),
            "user_cpu_s": round(usage.ru_utime, 1), "sys_cpu_s": round(usage.ru_stime, 1),
            "wall_s": round(time.perf_counter() - started, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--origins", default="20,40,80", help="comma-separated origin counts")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        _child(args.child)
        return 0
    for n in (int(x) for x in args.origins.split(",")):
        print(json.dumps(_measure(n)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
