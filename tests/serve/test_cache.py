"""The replica's read cache (no Ray, no HTTP): fresh answers reused, one load for many callers,
stale answers served while one refresh runs, writes invalidate at once, the store's
generation moves on every write."""

from __future__ import annotations

import asyncio

import pytest

from serve.cache import ReadCache
from serve.store import JobStore


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Source:
    """A slow read whose answer changes each time it is read."""

    def __init__(self, delay: float = 0.01) -> None:
        self.delay = delay
        self.reads = 0
        self.fail = False

    async def load(self) -> int:
        self.reads += 1
        n = self.reads
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("store down")
        return n


def test_many_callers_of_a_missing_key_share_one_load():
    async def run():
        cache: ReadCache[int] = ReadCache(1.0)
        src = Source()
        answers = await asyncio.gather(*(cache.get("k", src.load) for _ in range(50)))
        assert answers == [1] * 50 and src.reads == 1
        assert await cache.get("k", src.load) == 1 and src.reads == 1
        assert await cache.get("other", src.load) == 2

    asyncio.run(run())


def test_fresh_then_stale_while_refreshing_then_blocking():
    async def run():
        clock = Clock()
        cache: ReadCache[int] = ReadCache(0.5, 1.0, clock=clock)
        src = Source()
        assert await cache.get("k", src.load) == 1
        clock.now += 0.4
        assert await cache.get("k", src.load) == 1 and src.reads == 1  # fresh
        clock.now += 0.3
        # Stale: answered at once with the old value; one background refresh starts.
        assert await cache.get("k", src.load) == 1
        assert await cache.get("k", src.load) == 1
        await asyncio.sleep(0.05)
        assert src.reads == 2
        assert await cache.get("k", src.load) == 2  # the refreshed answer
        clock.now += 5
        assert await cache.get("k", src.load) == 3  # too old: waits for a new read

    asyncio.run(run())


def test_a_write_invalidates_at_once_and_a_load_begun_before_it_is_not_joined():
    async def run():
        generation = [0]
        cache: ReadCache[int] = ReadCache(10.0, 10.0, generation=lambda: generation[0])
        src = Source(delay=0.05)
        assert await cache.get("k", src.load) == 1
        generation[0] += 1
        assert await cache.get("k", src.load) == 2
        # A load in flight when a write lands: later callers start their own.
        before = asyncio.ensure_future(cache.get("j", src.load))
        await asyncio.sleep(0.01)
        generation[0] += 1
        after = await cache.get("j", src.load)
        assert await before == 3 and after == 4
        assert await cache.get("j", src.load) == 4  # the pre-write answer was not kept

    asyncio.run(run())


def test_unkept_answers_and_errors_are_not_cached():
    async def run():
        cache: ReadCache = ReadCache(10.0, keep=lambda v: v is not None)
        calls = []

        async def missing():
            calls.append(1)
            return None

        assert await cache.get("k", missing) is None
        assert await cache.get("k", missing) is None and len(calls) == 2
        src = Source()
        src.fail = True
        with pytest.raises(RuntimeError):
            await cache.get("e", src.load)
        src.fail = False
        assert await cache.get("e", src.load) == 2

    asyncio.run(run())


def test_zero_ttl_reads_every_time():
    async def run():
        cache: ReadCache[int] = ReadCache(0.0)
        src = Source(delay=0)
        assert [await cache.get("k", src.load) for _ in range(3)] == [1, 2, 3]

    asyncio.run(run())


def test_store_generation_moves_on_every_write(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 's.db'}")
    seen = [store.generation]
    _, key = store.create_key("k")
    seen.append(store.generation)
    store.create_job("j1", key.id, "ds", {"name": "ds"}, "/out")
    seen.append(store.generation)
    store.update_job("j1", state="running")
    seen.append(store.generation)
    store.revoke_key("k")
    seen.append(store.generation)
    store.get_job("j1")
    store.list_jobs(key.id)
    assert seen == sorted(set(seen)) and store.generation == seen[-1]


def test_expired_answers_are_swept_so_only_recent_keys_hold_memory():
    """Answers were dropped only at max_entries (10,000): a client asking for one new job
    after another (each row holding a spec of up to a megabyte) kept them all."""
    from serve.cache import SWEEP_MIN

    clock = Clock()
    cache: ReadCache[int] = ReadCache(1.0, 2.0, clock=clock)

    async def scenario() -> None:
        async def one() -> int:
            return 1

        for n in range(5 * SWEEP_MIN):
            await cache.get(("job", n), one)
            clock.now += 0.01  # 100 new keys a second
        assert len(cache._entries) < SWEEP_MIN + 2.0 / 0.01 + 1
        recent = ("job", 5 * SWEEP_MIN - 1)
        assert recent in cache._entries
        reads_before = cache.loads
        assert await cache.get(recent, one) == 1 and cache.loads == reads_before

    asyncio.run(scenario())


def test_the_sweep_stays_on_however_many_keys_were_live():
    """A sweep that kept more than half of max_entries set the next one past max_entries,
    after which only the wholesale clear at max_entries was left."""
    from serve.cache import SWEEP_MIN

    clock = Clock()
    cache: ReadCache[int] = ReadCache(1.0, 2.0, clock=clock, max_entries=2 * SWEEP_MIN)

    async def scenario() -> None:
        async def one() -> int:
            return 1

        for n in range(6 * SWEEP_MIN):
            await cache.get(n, one)
            assert cache._sweep_at <= cache.max_entries
        cache.clear()
        assert cache._sweep_at == SWEEP_MIN
        sweeps = 0
        real = cache._sweep

        def counted() -> None:
            nonlocal sweeps
            sweeps += 1
            real()

        cache._sweep = counted  # type: ignore[method-assign]
        for n in range(10 * SWEEP_MIN):  # every key live (no time passes): cleared, not swept
            await cache.get(("live", n), one)  # at every insert
        assert sweeps <= 20 and len(cache._entries) <= cache.max_entries  # not one an insert

    asyncio.run(scenario())
