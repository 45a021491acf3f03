"""The fetcher's byte budget: memory for bodies in flight is bounded by
download.max_bytes_in_flight, not by requests in flight x max_bytes, and nothing deadlocks.

The hostile server is the sandbox's ``/heavy/`` route: large bodies that start like a JPEG,
with a Content-Length or chunked. ``body_bytes_peak`` is measured inside the fetcher from the
bytes its body reads actually hold.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from builder.fetch import ByteBudget, Fetcher
from builder.records import Candidate, Record
from builder.sandbox import SandboxWeb
from builder.spec import DownloadSpec

BODY = 2_000_000
MAX_BYTES = 3_000_000
BUDGET = 4_000_000
BOUND = BUDGET + 2 * MAX_BYTES
"""Reservations stay under the budget plus the oldest body; the one final copy a body makes
(its chunks joined) adds at most one more body."""


@pytest.fixture(scope="module")
def web() -> Any:
    with SandboxWeb(classes=("cat",), images_per_class=1) as sandbox:
        yield sandbox


def _fetch(urls: list[str], **download: Any) -> tuple[list[Record], dict[str, Any]]:
    cfg = DownloadSpec(**{"timeout_s": 30, "retries": 0, "respect_robots": False,
                          "allow_private_networks": True, "concurrency": 32,
                          "per_host_concurrency": 32, "max_bytes": MAX_BYTES, **download})

    async def main() -> tuple[list[Record], dict[str, Any]]:
        async with Fetcher(cfg) as fetcher:
            records = [Record(Candidate(url=u, label="cat")) for u in urls]
            out = await asyncio.wait_for(fetcher.fetch_many(records), 120)
            return out, dict(fetcher.stats)

    return asyncio.run(main())


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_bodies_in_flight_stay_within_the_byte_budget(web, chunked):
    urls = web.heavy_urls(48, size=BODY, chunked=chunked)
    records, stats = _fetch(urls, max_bytes_in_flight=BUDGET)
    assert [r.reason for r in records if r.rejected] == []
    assert all(len(r.data) == BODY and r.format == "jpeg" for r in records)
    assert stats["budget_waits"] > 0
    assert BODY <= stats["body_bytes_peak"] <= BOUND, stats

    # The same downloads with a budget that never binds go past the bound: the budget is
    # what held them under it. The server half sends 24 bodies at once before it finishes any
    # (left to scheduling, a busy machine overlapped too few of them to tell).
    records, unbounded = _fetch(web.heavy_urls(48, size=BODY, chunked=chunked, meet=24),
                                max_bytes_in_flight=10**12)
    assert all(len(r.data) == BODY and r.format == "jpeg" for r in records)
    assert unbounded["budget_waits"] == 0
    assert unbounded["body_bytes_peak"] > BOUND, unbounded


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_bodies_larger_than_the_whole_budget_still_download(web, chunked):
    """One body may always proceed: a budget smaller than every body slows the fetcher down
    to about one body at a time, and never stops it."""
    records, stats = _fetch(web.heavy_urls(12, size=BODY, chunked=chunked),
                            max_bytes_in_flight=65_536)
    assert [r.rejected for r in records] == [False] * 12
    assert stats["body_bytes_peak"] <= 2 * BODY + 65_536 + MAX_BYTES


def test_a_body_over_max_bytes_is_still_refused_within_the_budget(web):
    records, _ = _fetch(web.heavy_urls(2, size=MAX_BYTES + 1, chunked=True) +
                        web.heavy_urls(2, size=MAX_BYTES + 1)[:1], max_bytes_in_flight=BUDGET)
    assert [r.reason for r in records] == ["too_many_bytes"] * 3


def test_budget_is_first_come_first_served_and_the_oldest_body_may_always_grow():
    async def main() -> list[Any]:
        budget = ByteBudget(10)
        a, b, c = budget.open(), budget.open(), budget.open()
        await budget.reserve(a, 8)
        waiting_b = asyncio.ensure_future(budget.reserve(b, 5))
        await asyncio.sleep(0)
        granted_c_small = asyncio.ensure_future(budget.reserve(c, 1))  # fits, but b came first
        await asyncio.sleep(0)
        seen = [budget.used, waiting_b.done(), granted_c_small.done()]
        await budget.reserve(a, 20)  # the oldest body grows past the limit without waiting
        seen.append(budget.used)
        budget.close(a)
        await asyncio.sleep(0)
        seen += [budget.used, waiting_b.done(), granted_c_small.done()]
        budget.close(b)
        budget.close(c)
        seen.append(budget.used)
        return seen

    assert asyncio.run(main()) == [8, False, False, 28, 6, True, True, 0]


def test_a_body_that_must_wait_asks_the_holder_of_read_bodies_to_hand_them_on():
    """A body read and kept stays the oldest until its caller releases it: a waiting
    reservation calls ``on_wait``, and the caller's release lets it through."""
    async def main() -> list[Any]:
        budget = ByteBudget(10)
        kept, new = budget.open(), budget.open()
        await budget.reserve(kept, 8)  # read, waiting for its validation batch
        asked: list[int] = []
        budget.on_wait = lambda: (asked.append(1), budget.close(kept))
        await asyncio.wait_for(budget.reserve(new, 5), 1)
        used = budget.used
        budget.close(new)
        return [len(asked), used, budget.waits]

    assert asyncio.run(main()) == [1, 5, 1]


def test_a_body_waits_for_the_budget_no_longer_than_its_timeout():
    async def main() -> list[Any]:
        budget = ByteBudget(10)
        a, b, c = budget.open(), budget.open(), budget.open()
        await budget.reserve(a, 10)
        with pytest.raises(asyncio.TimeoutError):
            await budget.reserve(b, 5, timeout=0.05)
        budget.close(b)
        budget.close(a)
        await asyncio.wait_for(budget.reserve(c, 5, timeout=0.05), 1)
        return [budget.used, budget.has_waiters, budget.waits]

    assert asyncio.run(main()) == [5, False, 1]


def test_a_body_cancelled_while_waiting_gives_its_place_up():
    async def main() -> list[Any]:
        budget = ByteBudget(10)
        a, b, c = budget.open(), budget.open(), budget.open()
        await budget.reserve(a, 10)
        stuck = asyncio.ensure_future(budget.reserve(b, 10))
        queued = asyncio.ensure_future(budget.reserve(c, 4))
        await asyncio.sleep(0)
        stuck.cancel()
        await asyncio.gather(stuck, return_exceptions=True)
        budget.close(b)
        budget.close(a)
        await asyncio.wait_for(queued, 1)
        used = budget.used
        budget.close(c)
        return [used, budget.used, budget.waits]

    assert asyncio.run(main()) == [4, 0, 2]


def test_held_bodies_count_until_released(web):
    """With hold_bodies, a body keeps its share of the budget after it is read until the caller
    releases it (the worker does once the image is validated): bytes read and not yet
    validated stay under the budget (plus the one body always let through)."""
    urls = web.heavy_urls(24, size=BODY)
    cfg = DownloadSpec(timeout_s=30, retries=0, respect_robots=False,
                       allow_private_networks=True, concurrency=32, per_host_concurrency=32,
                       max_bytes=MAX_BYTES, max_bytes_in_flight=BUDGET)
    peak, least = [0], [10**12]

    async def main() -> list[Record]:
        async with Fetcher(cfg, hold_bodies=True) as fetcher:
            loop = asyncio.get_running_loop()

            def arrived(record: Record) -> None:
                peak[0] = max(peak[0], fetcher.budget.used)
                least[0] = min(least[0], fetcher.budget.used)  # its own body still counts
                loop.call_later(0.05, fetcher.release, record)  # "validated" a little later

            records = [Record(Candidate(url=u, label="cat")) for u in urls]
            out = await asyncio.wait_for(fetcher.fetch_many(records, on_result=arrived), 120)
            await asyncio.sleep(0.1)
            assert fetcher.budget.used == 0 and not fetcher._holds
            return out

    records = asyncio.run(main())
    assert [r.rejected for r in records] == [False] * 24
    assert least[0] >= BODY and peak[0] <= BUDGET + MAX_BYTES
