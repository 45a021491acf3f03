"""API keys on requests and the per-key token bucket (no Ray, no HTTP)."""

from __future__ import annotations

import asyncio

import pytest

from serve.auth import ANONYMOUS, Authenticator, RateLimiter
from serve.errors import ApiError
from serve.store import JobStore


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_refills_at_the_rate():
    clock = Clock()
    limiter = RateLimiter(rate_per_s=2.0, burst=3, clock=clock)
    assert [limiter.acquire("k") for _ in range(3)] == [None, None, None]
    wait = limiter.acquire("k")
    assert wait == pytest.approx(0.5)
    assert limiter.acquire("other") is None
    clock.now += 0.5
    assert limiter.acquire("k") is None and limiter.acquire("k") is not None
    clock.now += 100
    assert [limiter.acquire("k") for _ in range(4)].count(None) == 3


def test_zero_rate_turns_the_limit_off():
    limiter = RateLimiter(rate_per_s=0, burst=1)
    assert all(limiter.acquire("k") is None for _ in range(100))


def test_authenticator_reads_bearer_or_query_key(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 's.db'}")
    plaintext, key = store.create_key("web")
    auth = Authenticator(store, cache_s=0)

    def authenticate(header, query=None):
        return asyncio.run(auth.authenticate(header, query))

    assert authenticate(f"Bearer {plaintext}").owner == key.id
    assert authenticate(None, plaintext).name == "web"
    for header, query in ((None, None), ("Bearer", None), ("Token abc", None),
                          (f"Bearer {plaintext}x", None), (None, "pxc_wrong")):
        with pytest.raises(ApiError) as exc:
            authenticate(header, query)
        assert exc.value.status == 401 and exc.value.code == "unauthorized"
    store.revoke_key("web")
    with pytest.raises(ApiError):
        authenticate(f"Bearer {plaintext}")
    assert asyncio.run(Authenticator(store, enabled=False).authenticate(None)).owner \
        == ANONYMOUS


def test_key_lookups_are_cached_and_shared_and_a_revoked_key_expires(tmp_path):
    """Concurrent requests with one key cost one store read; within cache_s a replica keeps
    its answer (a revoked key still works), after it the store is read again."""
    store = JobStore(f"sqlite:///{tmp_path / 's.db'}")
    plaintext, key = store.create_key("web")
    reads: list[str] = []
    verify = store.verify_key

    def counting(k: str):
        reads.append(k)
        return verify(k)

    store.verify_key = counting  # type: ignore[method-assign]
    auth = Authenticator(store, cache_s=0.3)

    async def scenario() -> None:
        owners = await asyncio.gather(*(auth.authenticate(f"Bearer {plaintext}")
                                        for _ in range(20)))
        assert {p.owner for p in owners} == {key.id} and len(reads) == 1
        store.revoke_key("web")
        assert (await auth.authenticate(f"Bearer {plaintext}")).owner == key.id
        await asyncio.sleep(0.35)
        with pytest.raises(ApiError):
            await auth.authenticate(f"Bearer {plaintext}")
        assert len(reads) == 2

    asyncio.run(scenario())


def test_a_string_that_cannot_be_a_key_is_refused_before_any_lookup_or_cache(tmp_path):
    """Every answer was cached under the key as sent, misses included: requests without a
    key, each with a new multi-megabyte "key", filled the replica's memory."""
    store = JobStore(f"sqlite:///{tmp_path / 's.db'}")
    plaintext, key = store.create_key("web")
    reads: list[str] = []
    verify = store.verify_key
    store.verify_key = lambda k: reads.append(k) or verify(k)  # type: ignore[method-assign]
    auth = Authenticator(store, cache_s=60)

    async def scenario() -> None:
        for junk in ("x" * 1_000_000, f"{plaintext}x", plaintext[:-1], "pxc_" + "é" * 43,
                     plaintext.replace("pxc_", "pxd_")):
            with pytest.raises(ApiError) as exc:
                await auth.authenticate(f"Bearer {junk}")
            assert exc.value.status == 401
        assert reads == [] and not auth._keys._entries
        assert (await auth.authenticate(None, plaintext)).owner == key.id
        assert reads == [plaintext]

    asyncio.run(scenario())
