"""A TCP proxy on 127.0.0.1 that paces each connection's upload, for an object store whose
uploads take time without taking this machine's CPU (``bench_vs_img2dataset.py --store s3
--store-mbps``).

A moto server answers at loopback speed and spends its own CPU on every request, on the same
cores as the command it serves. A real object store is far away: a 33 MB shard takes about
half a second to upload at 60 MB/s (one connection to S3 from a cloud node), during which the
client waits and uses no CPU. This proxy stands between the command and moto and lets each
connection send at most ``--mbps`` megabytes per second towards moto; replies pass at once.

    python bench/throttle.py --listen PORT --upstream PORT --mbps 60

It answers nothing itself; once listening it prints ``listening`` on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import time

CHUNK = 64 << 10


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               bytes_per_s: float) -> None:
    """Copy ``reader`` to ``writer`` until EOF, no faster than ``bytes_per_s`` (0: at once)."""
    start, sent = time.monotonic(), 0
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
            if bytes_per_s:
                sent += len(data)
                ahead = sent / bytes_per_s - (time.monotonic() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)
                elif ahead < -1.0:  # idle on a kept-alive connection: pace from now
                    start, sent = time.monotonic(), 0
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def serve(listen: int, upstream: int, mbps: float) -> None:
    rate = mbps * 1e6

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, server_w, rate), pipe(server_r, client_w, 0))

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", type=int, required=True, help="port to listen on (127.0.0.1)")
    p.add_argument("--upstream", type=int, required=True, help="the server's port (127.0.0.1)")
    p.add_argument("--mbps", type=float, required=True,
                   help="megabytes per second each connection may send upstream")
    args = p.parse_args()
    asyncio.run(serve(args.listen, args.upstream, args.mbps))


if __name__ == "__main__":
    main()
