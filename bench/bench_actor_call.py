"""What one actor call costs a Ray driver in CPU: the floor under the driver's cost per unit of
work (``bench_driver.py``), with no PixCrawler work in it.

An embedded Ray (2 CPUs) runs two async actors. The driver sends ``--calls`` calls, at most
``--in-flight`` per actor at once, awaited as ``cluster.coordinator`` awaits a unit
(``asyncio.wrap_future(ref.future())``), and measures its own CPU (every thread of the
process, from getrusage) and wall per call. ``unit`` sends a ``WorkUnit`` and returns a
``UnitReport`` and ``WorkerEvents`` of the size a URL-list unit has; ``plain`` sends an int and
returns an int.

    python bench/bench_actor_call.py [--calls 1500] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder.units import ClassTally, UnitReport, WorkerEvents, WorkUnit  # noqa: E402


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@ray.remote(num_cpus=0.1)
class Echo:
    async def unit(self, unit: WorkUnit) -> tuple[str, UnitReport, WorkerEvents]:
        await asyncio.sleep(0.001)
        report = UnitReport(unit.uid, "w0", {"bench": ClassTally(
            125, 0, Counter({"http_client_error": 125}))}, Counter({"fetch": 125}))
        return "incarnation", report, WorkerEvents("w0", [unit.uid], {"requests": 125})

    async def plain(self, x: int) -> int:
        await asyncio.sleep(0.001)
        return x


async def drive(actors: list, calls: int, kind: str, in_flight: int) -> None:
    room = asyncio.Semaphore(in_flight * len(actors))

    async def one(i: int) -> None:
        async with room:
            actor = actors[i % len(actors)]
            ref = (actor.unit.remote(WorkUnit(uid=f"l00-{i:08d}", seq=i, kind="list", source=0,
                                              engine="urllist", slice=i))
                   if kind == "unit" else actor.plain.remote(i))
            await asyncio.wrap_future(ref.future())

    await asyncio.gather(*(one(i) for i in range(calls)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=1500)
    ap.add_argument("--in-flight", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        actors = [Echo.remote() for _ in range(2)]
        ray.get([a.plain.remote(0) for a in actors])
        for _ in range(args.rounds):
            for kind in ("unit", "plain"):
                c0, t0 = cpu_s(), time.perf_counter()
                asyncio.run(drive(actors, args.calls, kind, args.in_flight))
                cpu, wall = cpu_s() - c0, time.perf_counter() - t0
                print(f"{kind:>5}: {1e3 * cpu / args.calls:.2f} ms driver CPU per call, "
                      f"{1e3 * wall / args.calls:.2f} ms wall", flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
