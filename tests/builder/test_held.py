"""builder.held: a worker's units wait for room for their validated images, the oldest never."""

from __future__ import annotations

import asyncio
import tempfile
from typing import Any, Optional

import pytest

from builder.held import HeldBudget


def test_units_go_while_there_is_room_and_the_oldest_always_goes():
    async def main() -> None:
        held = HeldBudget(100)
        old, young = held.open(), held.open()
        await asyncio.wait_for(held.turn(young), 1)  # room: nobody waits
        held.add(old, 80)
        held.add(young, 40)
        assert held.held == 120 and held.peak == 120
        await asyncio.wait_for(held.turn(old), 1)  # over the limit, but the oldest
        waiting = asyncio.ensure_future(held.turn(young))
        await asyncio.sleep(0.01)
        assert not waiting.done() and held.waits == 1
        held.close(old)  # its 80 bytes are in rows now: room again
        await asyncio.wait_for(waiting, 1)
        assert held.held == 40

    asyncio.run(main())


def test_a_waiting_unit_goes_when_it_becomes_the_oldest():
    async def main() -> None:
        held = HeldBudget(10)
        first, second, third = held.open(), held.open(), held.open()
        held.add(second, 50)
        held.add(third, 50)
        waiting = asyncio.ensure_future(held.turn(third))
        await asyncio.sleep(0.01)
        held.close(first)  # second is the oldest now; third still waits (100 > 10)
        await asyncio.sleep(0.01)
        assert not waiting.done()
        await asyncio.wait_for(held.turn(second), 1)
        held.close(second)  # third is the oldest now, though still over the limit
        await asyncio.wait_for(waiting, 1)
        assert held.held == 50 and held.waits == 1

    asyncio.run(main())


def test_a_unit_holding_nothing_goes_and_takes_its_place_with_its_first_bytes():
    async def main() -> None:
        held = HeldBudget(10)
        first, second = held.open(), held.open()  # first still waits for its search page
        held.add(second, 50)
        await asyncio.wait_for(held.turn(first), 1)  # holds nothing: goes
        await asyncio.wait_for(held.turn(second), 1)  # the oldest holding images
        held.add(first, 5)  # first's first bytes: it is the youngest now
        waiting = asyncio.ensure_future(held.turn(first))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        held.add(second, -45)  # validation rejected most of second's bytes: room again
        await asyncio.wait_for(waiting, 1)
        assert held.held == 10 and held.waits == 1

    asyncio.run(main())


def test_a_cancelled_wait_and_a_closed_or_unknown_ticket_leave_nothing_behind():
    async def main() -> None:
        held = HeldBudget(10)
        old, young = held.open(), held.open()
        held.add(old, 20)
        held.add(young, 1)
        waiting = asyncio.ensure_future(held.turn(young))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        held.close(young)
        held.add(young, 5)  # a closed unit adds nothing
        held.add(-1, 5)  # nor does a ticket never opened, which never waits
        await asyncio.wait_for(held.turn(-1), 1)
        assert held.held == 20
        held.close(old)
        assert held.held == 0 and held.peak == 21

    asyncio.run(main())


def _jpeg(seed: int, side: int = 256) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95)
    return out.getvalue()


def _run_units(tmp_path, handler: Any, count: int, unit: int, download: dict[str, Any],
               resources: Optional[dict[str, Any]] = None) -> tuple[Any, dict, list]:
    """Serve ``count`` image URLs on 127.0.0.1 (``handler`` answers one, given the request
    and the image's number) and run them on one worker, in units of ``unit`` candidates all
    at once; returns the worker's ``HeldBudget``, its fetch stats and the units' reports."""
    from aiohttp import web

    from builder.dedup import LocalPartitions
    from builder.quota import QuotaLedger
    from builder.spec import parse_spec
    from builder.units import INLINE, WorkUnit, inline_uid
    from builder.worker import JobPlan, LocalServices, WorkerRuntime

    async def answer(request: web.Request) -> web.StreamResponse:
        return await handler(request, int(request.match_info["n"]))

    async def main() -> tuple[Any, dict, list]:
        app = web.Application()
        app.router.add_get("/img/{n}.jpg", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        out = tempfile.mkdtemp(dir=tmp_path)
        spec = parse_spec({
            "name": "held", "target": 100,
            "classes": {"cat": {"urls": [f"http://127.0.0.1:{port}/img/{n}.jpg"
                                         for n in range(count)]}},
            "download": {"allow_private_networks": True, "respect_robots": False,
                         "respect_optouts": False, **download},
            "resources": resources or {}, "output": {"uri": out}})
        services = LocalServices(spec, LocalPartitions(4, near=True, k=1).client(),
                                 QuotaLedger({"cat": 100}))
        runtime = WorkerRuntime(JobPlan(spec, out, "job-1"), services)
        units = [WorkUnit(inline_uid(0, "cat", k), k, INLINE, 0, label="cat", start=unit * k,
                          stop=unit * k + unit) for k in range(count // unit)]
        await runtime.start()
        try:
            done = await asyncio.wait_for(asyncio.gather(*(runtime.run(u) for u in units)),
                                          60)
            stats = dict(runtime.fetcher.stats)
        finally:
            await runtime.close()
            await runner.cleanup()
        return runtime.held, stats, [report for report, _ in done]

    return asyncio.run(main())


def _held_peak(tmp_path, held_mb: int, **download: Any) -> tuple[int, int, int, list]:
    """Three units of 8 distinct photos run at once on one worker, one download at a time
    each (``download`` overrides more of the spec's download settings); returns the worker's
    held peak, its waits, one image's size and the reports."""
    from aiohttp import web

    images = [_jpeg(i) for i in range(24)]

    async def image(request: web.Request, n: int) -> web.Response:
        await asyncio.sleep(0.005)
        return web.Response(body=images[n], content_type="image/jpeg")

    held, _, reports = _run_units(tmp_path, image, 24, 8,
                                  {"per_host_concurrency": 1, **download},
                                  {"max_held_mb": held_mb})
    return held.peak, held.waits, max(len(i) for i in images), reports


def test_a_workers_units_wait_for_room_for_their_validated_images(tmp_path):
    """Without the budget the three units' 24 images were all held at once (each unit keeps
    its images until it is decided); with a limit of 0 the two younger units wait once the
    worker holds anything, and the worker holds at most the oldest unit's 8 images and one
    download per unit started before the limit was passed."""
    free_peak, free_waits, size, _ = _held_peak(tmp_path, 1 << 20)
    assert free_waits == 0 and free_peak >= 20 * size * 0.8
    peak, waits, size, reports = _held_peak(tmp_path, 0)
    assert waits > 0
    assert peak <= 8 * size + 3 * size < free_peak
    for report in reports:  # nothing lost: every candidate decided, every image accepted
        tally = report.classes["cat"]
        assert tally.candidates == 8 and tally.accepted == 8 and not tally.rejected


@pytest.mark.parametrize("held_mb", [0, 512])
def test_bodies_waiting_for_validation_never_hold_up_the_byte_budget(tmp_path, held_mb):
    """Each 77 KB photo is more than the whole fetch byte budget (64 KiB), so each body must
    be the oldest to be read; a body read and waiting for its validation batch stays in the
    budget. The units waited for each other's unsent bodies, or a unit for its own, for ever:
    a body that must wait for the budget now sends every waiting body to validation first."""
    peak, waits, size, reports = _held_peak(tmp_path, held_mb, max_bytes_in_flight=65_536,
                                            timeout_s=5, retries=0)
    for report in reports:
        tally = report.classes["cat"]
        assert tally.candidates == 8 and tally.accepted == 8 and not tally.rejected


def test_bodies_that_arrive_while_another_waits_for_the_budget_go_on_to_validation(tmp_path):
    """Three bodies take the whole byte budget and stream slowly; a fourth, answered later,
    must wait for them. They arrive after it began to wait, and sat in their unit's
    validation batch (not yet 8) holding the budget, while the fourth waited for them until its
    timeout (``timeout``, and before the budget's wait had a deadline, for ever)."""
    from aiohttp import web

    images = [_jpeg(i) for i in range(4)]

    async def image(request: web.Request, n: int) -> web.StreamResponse:
        if n == 3:
            await asyncio.sleep(0.1)  # after the others reserved, before they finish
            return web.Response(body=images[n], content_type="image/jpeg")
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.content_length = len(images[n])
        await resp.prepare(request)
        await resp.write(images[n][:100])
        await asyncio.sleep(0.4)
        await resp.write(images[n][100:])
        await resp.write_eof()
        return resp

    _, stats, (report,) = _run_units(tmp_path, image, 4, 4, {
        "per_host_concurrency": 4, "max_bytes_in_flight": sum(len(i) for i in images[:3]),
        "timeout_s": 5, "retries": 0})
    assert stats["budget_waits"] > 0
    tally = report.classes["cat"]
    assert tally.candidates == 4 and tally.accepted == 4 and not tally.rejected
