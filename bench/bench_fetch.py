"""Fetcher throughput from a loopback server: fetch only, and fetch + full Pillow decode.

A separate process serves N distinct ~40 KB JPEGs (512x384, noise + gradient, generated once with
Pillow and cached under bench/out/). This process fetches them all with ``builder.fetch.Fetcher``
(robots.txt checked, as in a real job), then again while decoding each image in a 2-thread pool
so that decoding overlaps fetching. The issue's target: at least 1,000 images/s for fetch + decode
on 2 cores.

    .venv/bin/python bench/bench_fetch.py [--n 4000] [--concurrency 16] [--rounds 3] [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing as mp
import os
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder.fetch import Fetcher  # noqa: E402
from builder.records import Candidate, Record  # noqa: E402
from builder.spec import DownloadSpec  # noqa: E402
from loopback import pack_bodies  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
WIDTH, HEIGHT = 512, 384


def _image(seed: int) -> Image.Image:
    """A distinct 512x384 picture: a colour gradient under seeded noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    phase = rng.uniform(0, 6.28, size=3)
    base = np.stack([127 + 120 * np.sin(x / (60 + 13 * c) + y / (90 + 7 * c) + phase[c])
                     for c in range(3)], axis=-1)
    noise = rng.normal(0, 28, size=(HEIGHT, WIDTH, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def _encode(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _tune_quality(target: int) -> int:
    """The JPEG quality whose median size over a few samples is closest to ``target`` bytes."""
    samples = [_image(10_000_000 + i) for i in range(5)]
    best, best_err = 75, None
    for quality in range(5, 96, 2):
        size = float(np.median([len(_encode(im, quality)) for im in samples]))
        err = abs(size - target)
        if best_err is None or err < best_err:
            best, best_err = quality, err
    return best


def corpus(n: int, target: int = 40_000) -> tuple[Path, list[int]]:
    """N distinct JPEGs packed in one file (cached): (pack path, n + 1 byte offsets)."""
    OUT.mkdir(parents=True, exist_ok=True)
    pack = OUT / f"fetch_corpus_{n}_{target}.bin"
    index = pack.with_suffix(".json")
    if pack.is_file() and index.is_file():
        return pack, json.loads(index.read_text())["offsets"]
    quality = _tune_quality(target)
    print(f"generating {n} JPEGs (quality {quality}) into {pack} ...", flush=True)
    offsets = [0]
    tmp = pack.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for i in range(n):
            data = _encode(_image(i), quality)
            f.write(data)
            offsets.append(offsets[-1] + len(data))
    tmp.replace(pack)
    index.write_text(json.dumps({"quality": quality, "offsets": offsets}))
    return pack, offsets


def _serve(pack: str, offsets: list[int], port_queue: "mp.Queue[int]") -> None:
    """The server process: GET /img/<i>.jpg answers image i; anything else (robots.txt) is 404.

    aiohttp's low-level server (no router, no middlewares): the server shares the cores with
    the client under test, so it should take as little of them as it can.
    """
    from aiohttp import web

    bodies = pack_bodies(pack, offsets)

    async def handler(request: web.BaseRequest) -> web.Response:
        path = request.path
        if path.startswith("/img/") and path.endswith(".jpg"):
            name = path[5:-4]
            if name.isdigit() and int(name) < len(bodies):
                return web.Response(body=bodies[int(name)], content_type="image/jpeg")
        return web.Response(status=404, text="not found")

    async def main() -> None:
        runner = web.ServerRunner(web.Server(handler), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port_queue.put(runner.addresses[0][1])
        await asyncio.Event().wait()

    asyncio.run(main())


def _decode(data: Optional[bytes]) -> tuple[int, int]:
    with Image.open(io.BytesIO(data or b"")) as im:
        im.load()
        return im.size


def _records(base: str, n: int) -> list[Record]:
    return [Record(Candidate(url=f"{base}/img/{i}.jpg", label="bench")) for i in range(n)]


async def fetch_only(cfg: DownloadSpec, base: str, n: int) -> tuple[float, list[Record]]:
    records = _records(base, n)
    started = time.perf_counter()
    async with Fetcher(cfg) as fetcher:
        await fetcher.fetch_many(records)
    return time.perf_counter() - started, records


async def fetch_and_decode(cfg: DownloadSpec, base: str, n: int,
                           threads: int) -> tuple[float, list[Record], int]:
    """Fetch all; each fetched image goes to the decode pool as soon as it arrives.

    ``pool.submit`` without awaiting the result keeps the event loop free of a thread-safe
    wake-up per image; the results are collected once everything is fetched.
    """
    records = _records(base, n)
    with ThreadPoolExecutor(threads) as pool:
        started = time.perf_counter()
        pending = []

        def on_result(record: Record) -> None:
            if not record.rejected:
                pending.append(pool.submit(_decode, record.data))

        async with Fetcher(cfg) as fetcher:
            await fetcher.fetch_many(records, on_result=on_result)
        decoded = sum(f.result() == (WIDTH, HEIGHT) for f in pending)
        elapsed = time.perf_counter() - started
    return elapsed, records, decoded


def decode_only(bodies: list[bytes], threads: int) -> float:
    """Seconds to decode ``bodies`` already in memory with the same pool: the ceiling that
    fetch + decode can approach on this machine at this moment."""
    with ThreadPoolExecutor(threads) as pool:
        started = time.perf_counter()
        for size in pool.map(_decode, bodies):
            assert size == (WIDTH, HEIGHT)
        return time.perf_counter() - started


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4000, help="distinct images (default 4000)")
    parser.add_argument("--concurrency", type=int, default=16, help="download.concurrency")
    parser.add_argument("--per-host", type=int, default=None,
                        help="download.per_host_concurrency (default: = concurrency; the bench "
                             "has one host)")
    parser.add_argument("--threads", type=int, default=2, help="decode threads")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds of each phase")
    parser.add_argument("--uvloop", action="store_true", help="run the client on uvloop")
    args = parser.parse_args(argv)

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"cpus: {os.cpu_count()}  python: {sys.version.split()[0]}  "
          f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    pack, offsets = corpus(args.n)
    sizes = np.diff(offsets)
    print(f"corpus: {args.n} JPEGs {WIDTH}x{HEIGHT}, mean {sizes.mean() / 1000:.1f} KB "
          f"(min {sizes.min() / 1000:.1f}, max {sizes.max() / 1000:.1f})")
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    ctx = mp.get_context("spawn")
    port_queue: "mp.Queue[int]" = ctx.Queue()
    server = ctx.Process(target=_serve, args=(str(pack), offsets, port_queue), daemon=True)
    server.start()
    try:
        base = f"http://127.0.0.1:{port_queue.get(timeout=60)}"
        cfg = DownloadSpec(concurrency=args.concurrency,
                           per_host_concurrency=args.per_host or args.concurrency,
                           allow_private_networks=True, respect_robots=True, retries=0)
        print(f"fetcher: concurrency {cfg.concurrency}, per-host {cfg.per_host_concurrency}, "
              f"robots on, decode threads {args.threads}, "
              f"loop {'uvloop' if args.uvloop else 'asyncio'}")
        asyncio.run(fetch_only(cfg, base, min(args.n, 500)))  # warm-up (not measured)

        best_fetch = best_both = 0.0
        least_cpu = float("inf")
        best_ceiling = 0.0
        for round_ in range(1, args.rounds + 1):
            cpu0, server0 = time.process_time(), _cpu_seconds(server.pid)
            elapsed, records = asyncio.run(fetch_only(cfg, base, args.n))
            cpu = (time.process_time() - cpu0) / args.n * 1e6
            server_cpu = (_cpu_seconds(server.pid) - server0) / args.n * 1e6
            bad = [r for r in records if r.rejected]
            if bad:
                print(f"  {len(bad)} rejected, e.g. {bad[0].reason}: {bad[0].detail}")
            rate = args.n / elapsed
            best_fetch = max(best_fetch, rate)
            mb_s = sum(len(r.data or b"") for r in records) / elapsed / 1e6
            print(f"round {round_}: fetch only      {rate:6.0f} images/s  ({elapsed:.2f} s, "
                  f"{mb_s:.0f} MB/s; CPU per image: client {cpu:.0f} us, "
                  f"server {server_cpu:.0f} us)")
            cpu0, server0 = time.process_time(), _cpu_seconds(server.pid)
            elapsed, records, decoded = asyncio.run(fetch_and_decode(cfg, base, args.n,
                                                                     args.threads))
            cpu = (time.process_time() - cpu0) / args.n * 1e6
            server_cpu = (_cpu_seconds(server.pid) - server0) / args.n * 1e6
            rate = args.n / elapsed
            best_both = max(best_both, rate)
            least_cpu = min(least_cpu, cpu + server_cpu)
            print(f"round {round_}: fetch + decode  {rate:6.0f} images/s  ({elapsed:.2f} s, "
                  f"{decoded}/{args.n} decoded; CPU per image: fetch+decode {cpu:.0f} us, "
                  f"server {server_cpu:.0f} us)")
            bodies = [r.data for r in records if r.data is not None]
            ceiling = len(bodies) / decode_only(bodies, args.threads)
            best_ceiling = max(best_ceiling, ceiling)
            print(f"round {round_}: decode only     {ceiling:6.0f} images/s  (bytes in memory, "
                  f"same pool: the ceiling for fetch + decode right now)")
        print(f"best: fetch only {best_fetch:.0f} images/s; fetch + decode {best_both:.0f} "
              f"images/s (target 1000); decode alone {best_ceiling:.0f} images/s")
        cores = os.cpu_count() or 1
        print(f"CPU bound: fetch + decode + server take {least_cpu:.0f} us of CPU per image, "
              f"so {cores} otherwise idle cores can do at most {cores * 1e6 / least_cpu:.0f} "
              f"images/s (compare with the measured rate when the machine is shared)")
    finally:
        server.terminate()
        server.join(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
