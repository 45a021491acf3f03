"""A loopback image corpus for the throughput benchmarks: rendered once, cached on disk, served
by a lean server process.

The images are the sandbox web's benchmark pictures (``Corpus.bench_picture``: distinct
512x384 JPEGs of about 40 KB, far enough apart that near-duplicate dedup keeps them all).
Rendering costs about 14 ms an image, so a large corpus is rendered once by a pool of
processes into ``bench/out/bench_corpus_<n>.bin`` (+ ``.json`` offsets) and reused.

The server is aiohttp's low-level server in its own process, with no router or middlewares:
it shares the cores with the tools under test, so it takes as little of them as it can.

    GET /bench/{i:05d}.jpg   image i        GET /healthz   ok        anything else   404

With ``--signals`` (``bench_rights.py``) the origin also carries every opt-out signal PixCrawler
reads, each allowing use, so that every image is checked against real rules and still kept:
robots.txt with a group for us, ``Content-Signal`` and per-path ``Content-Usage`` lines, a
``/.well-known/tdmrep.json`` of several location rules, an ``/ai.txt``, and on each image the
``X-Robots-Tag``, ``tdm-reservation`` and ``Content-Usage`` headers.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
CHUNK = 250


def _render_chunk(bounds: tuple[int, int]) -> list[bytes]:
    sys.path.insert(0, str(ROOT))
    from builder.sandbox.corpus import Corpus, encode

    corpus = Corpus(["bench"], 1, faults=False, bench_images=bounds[1])
    return [encode(corpus.bench_picture(i)) for i in range(*bounds)]


def corpus_pack(n: int, processes: int | None = None) -> tuple[Path, list[int]]:
    """The pack of ``n`` benchmark JPEGs (rendered on first use): (path, n + 1 byte offsets)."""
    OUT.mkdir(parents=True, exist_ok=True)
    pack = OUT / f"bench_corpus_{n}.bin"
    index = pack.with_suffix(".json")
    if pack.is_file() and index.is_file():
        offsets = json.loads(index.read_text())["offsets"]
        if len(offsets) == n + 1 and pack.stat().st_size == offsets[-1]:
            return pack, offsets
    print(f"rendering {n} benchmark JPEGs into {pack} (once; about {n * 0.014 / 2:.0f} s on "
          "2 cores) ...", flush=True)
    offsets = [0]
    tmp = pack.with_suffix(".tmp")
    chunks = [(i, min(n, i + CHUNK)) for i in range(0, n, CHUNK)]
    with open(tmp, "wb") as f, mp.get_context("spawn").Pool(processes or os.cpu_count()) as pool:
        for images in pool.imap(_render_chunk, chunks):
            for data in images:
                f.write(data)
                offsets.append(offsets[-1] + len(data))
    tmp.replace(pack)
    index.write_text(json.dumps({"n": n, "offsets": offsets}))
    return pack, offsets


SIGNAL_FILES = {
    "/robots.txt": "User-agent: *\nDisallow: /private/\n\nUser-agent: PixCrawler\n"
                   "Allow: /bench/\nDisallow: /*.php$\nContent-Signal: search=yes, ai-train=yes\n"
                   "Content-Usage: train-ai=y\nContent-Usage: /private/ train-ai=n\n",
    "/.well-known/tdmrep.json": json.dumps([
        {"location": "/private/*", "tdm-reservation": 1,
         "tdm-policy": "https://example.org/policy.json"},
        {"location": "/archive/*", "tdm-reservation": 1},
        {"location": "/bench/*", "tdm-reservation": 0}]),
    "/ai.txt": "User-Agent: *\nDisallow: /private/\nAllow: /\n",
}
SIGNAL_HEADERS = {"X-Robots-Tag": "max-image-preview:large", "tdm-reservation": "0",
                  "Content-Usage": "train-ai=y"}


def pack_bodies(pack: Path | str, offsets: list[int], n: int | None = None) -> list[bytes]:
    """The first ``n`` images of a pack (all by default), each its own bytes."""
    blob = Path(pack).read_bytes()
    count = len(offsets) - 1 if n is None else min(n, len(offsets) - 1)
    return [blob[offsets[i]:offsets[i + 1]] for i in range(count)]


def _serve(pack: str, offsets: list[int], port: int, signals: bool = False) -> None:
    from aiohttp import web

    bodies = pack_bodies(pack, offsets)
    headers = SIGNAL_HEADERS if signals else None

    async def handler(request: web.BaseRequest) -> web.Response:
        path = request.path
        if path.startswith("/bench/") and path.endswith(".jpg"):
            stem = path[7:-4]
            if stem.isdigit() and int(stem) < len(bodies):
                return web.Response(body=bodies[int(stem)], content_type="image/jpeg",
                                    headers=headers)
        if path == "/healthz":
            return web.Response(text="ok")
        if signals and path in SIGNAL_FILES:
            return web.Response(text=SIGNAL_FILES[path])
        return web.Response(status=404, text="not found")

    async def main() -> None:
        runner = web.ServerRunner(web.Server(handler), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=2048).start()
        await asyncio.Event().wait()

    asyncio.run(main())


def serve_pack(pack: Path, offsets: list[int], port: int, signals: bool = False) -> None:
    """Entry point of the server process (``python bench/loopback.py PACK PORT [--signals]``)."""
    _serve(str(pack), offsets, port, signals)


def wait_healthy(proc: subprocess.Popen, port: int, what: str, log: Optional[Path] = None,
                 timeout_s: float = 120.0) -> subprocess.Popen:
    """Wait until the server ``proc`` started answers ``GET /healthz`` on 127.0.0.1:``port``;
    returns it. Raises ``RuntimeError`` naming ``what`` (and its ``log``) if it exits first or
    does not answer within ``timeout_s`` (it is killed then)."""
    see = f"; see {log}" if log else ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}){see}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{what} did not answer within {timeout_s:g} s{see}")


def start_origin(n: int, log: Optional[Path] = None) -> tuple[subprocess.Popen, int]:
    """The pack of ``n`` pictures served by this script in a process of its own; waits until it
    answers. Returns (process, port); the caller stops the process."""
    from builder.ports import free_port

    pack, _ = corpus_pack(n)
    port = free_port()
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, str(Path(__file__)), str(pack), str(port)],
                            stdout=out, stderr=subprocess.STDOUT)
    return wait_healthy(proc, port, "the loopback origin", log, timeout_s=30), port


if __name__ == "__main__":
    pack_path = Path(sys.argv[1])
    serve_pack(pack_path, json.loads(pack_path.with_suffix(".json").read_text())["offsets"],
               int(sys.argv[2]), "--signals" in sys.argv[3:])
