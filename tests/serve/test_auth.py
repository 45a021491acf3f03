"""API keys on requests and the per-key token bucket (no Ray, no HTTP)."""

from __future__ import annotations

import asyncio

import pytest

from serve.auth import (ANONYMOUS, MAX_STREAM_TOKEN, STREAM_TOKEN_PREFIX, Authenticator,
                        Principal, RateLimiter, StreamTokens, token_secret)
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


def test_authenticator_reads_the_bearer_key(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 's.db'}")
    plaintext, key = store.create_key("web")
    auth = Authenticator(store, cache_s=0)

    def authenticate(header):
        return asyncio.run(auth.authenticate(header))

    assert authenticate(f"Bearer {plaintext}").owner == key.id
    assert authenticate(f"bearer  {plaintext} ").name == "web"
    for header in (None, "", "Bearer", "Token abc", f"Bearer {plaintext}x", "Bearer pxc_wrong",
                   plaintext):
        with pytest.raises(ApiError) as exc:
            authenticate(header)
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
    now = [0.0]
    auth._keys.clock = lambda: now[0]  # the cache's age moves only here, whatever the load

    async def scenario() -> None:
        owners = await asyncio.gather(*(auth.authenticate(f"Bearer {plaintext}")
                                        for _ in range(20)))
        assert {p.owner for p in owners} == {key.id} and len(reads) == 1
        store.revoke_key("web")
        now[0] = 0.29
        assert (await auth.authenticate(f"Bearer {plaintext}")).owner == key.id
        now[0] = 0.35
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
        assert (await auth.authenticate(f"Bearer {plaintext}")).owner == key.id
        assert reads == [plaintext]

    asyncio.run(scenario())


def test_a_stream_token_opens_its_own_job_only_until_it_expires():
    clock = Clock()
    tokens = StreamTokens(token_secret("salt"), ttl_s=300, clock=clock)
    token, expires = tokens.issue("k1", "pets-0001")
    assert token.startswith(STREAM_TOKEN_PREFIX) and expires == 400
    assert "k1" not in token and len(token) < 100
    assert tokens.check(token, "pets-0001") == ("k1", 400)
    clock.now = 400.0
    assert tokens.check(token, "pets-0001") == ("k1", 400)

    def refused(token: str, job_id: str = "pets-0001") -> str:
        with pytest.raises(ApiError) as exc:
            tokens.check(token, job_id)
        assert exc.value.status == 401 and exc.value.code == "unauthorized"
        assert "POST /v1/jobs/{id}/events/token" in exc.value.message
        return exc.value.message

    assert "another job" in refused(token, "pets-0002")
    clock.now = 400.5
    assert "expired" in refused(token)
    clock.now = 100.0
    body, signature = token[len(STREAM_TOKEN_PREFIX):].split(".")
    other_secret = StreamTokens(token_secret("pepper"), 300, clock).issue("k1", "pets-0001")[0]
    forged_body = StreamTokens(b"", 0, clock).issue("k2", "pets-0001")[0].split(".")[0]
    for junk in (other_secret, f"{forged_body}.{signature}", f"{token}x", token[:-1],
                 STREAM_TOKEN_PREFIX + body, "pxc_" + token[4:], "é" + token,
                 token + "A" * MAX_STREAM_TOKEN, ""):
        assert "not a stream token" in refused(junk)
    # Signed, but not what this server writes inside: still refused, not a 500.
    for inside in (b"\xff\xfe", b"k1\nsoon\npets-0001", b"k1\n400"):
        body = __import__("base64").urlsafe_b64encode(inside).rstrip(b"=").decode()
        assert "not a stream token" in refused(f"{STREAM_TOKEN_PREFIX}{body}.{tokens._sign(body)}")


def test_a_stream_caller_is_the_bearer_key_or_a_token_whose_key_is_active(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 's.db'}")
    plaintext, key = store.create_key("web")
    auth = Authenticator(store, cache_s=0, stream_token_s=60)

    async def scenario() -> None:
        token, expires = await auth.stream_token(Principal(key.id, "web"), "pets-0001")
        by_token, ends = await auth.authenticate_stream(None, token, "pets-0001")
        assert (by_token.owner, by_token.name, ends) == (key.id, "web", expires)
        by_header, ends = await auth.authenticate_stream(f"Bearer {plaintext}", "junk",
                                                         "pets-0001")
        assert (by_header.owner, ends) == (key.id, None)  # a Bearer header is what counts
        # A proxy's Basic credentials (a browser adds them by itself) leave the token to count.
        behind_proxy, _ = await auth.authenticate_stream("Basic dTpw", token, "pets-0001")
        assert behind_proxy.owner == key.id
        for header, tok in ((None, None), (None, ""), (None, plaintext),
                            (f"Bearer {token}", None), ("Basic dTpw", None),
                            (f"Bearer {token}", token)):
            with pytest.raises(ApiError) as exc:
                await auth.authenticate_stream(header, tok, "pets-0001")
            assert exc.value.status == 401
        # Another store (another salt) signs other tokens.
        other = JobStore(f"sqlite:///{tmp_path / 'other.db'}")
        foreign, _ = await Authenticator(other).stream_token(Principal(key.id, "web"),
                                                              "pets-0001")
        with pytest.raises(ApiError):
            await auth.authenticate_stream(None, foreign, "pets-0001")
        assert (await auth.still_active(by_token)).owner == key.id
        store.revoke_key("web")
        for attempt in (auth.authenticate_stream(None, token, "pets-0001"),
                        auth.still_active(by_token)):
            with pytest.raises(ApiError) as exc:
                await attempt
            assert "revoked" in exc.value.message
        off = Authenticator(store, enabled=False)
        assert (await off.authenticate_stream(None, None, "x"))[0].owner == ANONYMOUS

    asyncio.run(scenario())


def test_what_cannot_be_a_token_is_refused_before_the_secret_is_read(tmp_path, monkeypatch):
    """The secret comes from the store: junk sent before it was loaded read the store each
    time (and answered 500, not 401, while the store was down)."""
    store = JobStore(f"sqlite:///{tmp_path / 's.db'}")
    auth = Authenticator(store)

    def unreachable(self: JobStore) -> str:
        raise AssertionError("the store was read")

    monkeypatch.setattr(JobStore, "salt", property(unreachable))
    for junk in ("x", "pxs_" + "A" * MAX_STREAM_TOKEN, "pxs_\u00e9"):
        with pytest.raises(ApiError) as exc:
            asyncio.run(auth.authenticate_stream(None, junk, "pets-0001"))
        assert exc.value.status == 401
    with pytest.raises(AssertionError):  # a well-formed token does need the secret
        asyncio.run(auth.authenticate_stream(None, "pxs_abc.def", "pets-0001"))
