"""GET /v1/jobs/{id}/events cannot fill a replica (no Ray): a stream on a job that does not end
holds one of the replica's ``max_ongoing_requests`` while it is open, so a key may have only
``max_streams_per_key`` streams open per replica (one more answers 429, another key is not
affected), a stream's slot is given back however it ends, and a stream ends after
``max_stream_s`` with an ``error`` event telling the client to reconnect."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace
from typing import Any, Awaitable, Callable, Optional

import pytest

from serve.errors import ApiError
from serve.store import JobRow


def _row(job_id: str, owner: str, state: str = "queued") -> JobRow:
    now = time.time()
    spec = {"name": "pets", "target": 5, "classes": {"cat": {"queries": ["cat"], "target": 5}},
            "sources": [{"engine": "duckduckgo"}]}
    return JobRow(id=job_id, owner=owner, name="pets", state=state, created_at=now,
                  updated_at=now, output_uri="/out", spec=spec)


def _api(max_streams: int = 4, max_stream_s: float = 3600.0,
         states: Optional[dict[str, list[str]]] = None,
         still_valid: Optional[Callable[[], Awaitable[None]]] = None,
         token_expires: Optional[float] = None) -> Any:
    """A JobAPI with just what the events route uses. A job stays ``queued`` unless
    ``states`` gives the states it goes through (the last one stays)."""
    from serve.app import JobAPI, ServeSettings, job_view, stream_slots

    settings = ServeSettings(events_interval_s=0.001, max_streams_per_key=max_streams,
                             max_stream_s=max_stream_s)
    seen: dict[str, int] = {}

    async def caller(authorization: Optional[str], token: Optional[str], job_id: str) -> Any:
        return SimpleNamespace(owner=token, name=token), token_expires

    async def row(job_id: str, principal: Any) -> JobRow:
        return _row(job_id, principal.owner)

    async def current(r: JobRow) -> dict[str, Any]:
        path = (states or {}).get(r.id, ["queued"])
        step = seen[r.id] = seen.get(r.id, -1) + 1
        r.state = path[min(step, len(path) - 1)]
        return job_view(r)

    async def valid() -> None:
        return None

    api = SimpleNamespace(settings=settings, streams=stream_slots(max_streams),
                          _limited=lambda principal, bucket="": principal, _row=row,
                          _current=current,
                          auth=SimpleNamespace(enabled=True, authenticate_stream=caller,
                                               still_active=lambda *a: (still_valid or valid)()))
    api._stream = lambda *a, **k: JobAPI.func_or_class._stream(api, *a, **k)
    api.events = lambda job_id, owner: JobAPI.func_or_class.events(
        api, job_id, SimpleNamespace(headers={}, query_params={}), owner)
    return api


async def _serve(response: Any, *, disconnect_after: Optional[float] = None,
                 send_fails: bool = False, spec_version: str = "2.0") -> list[str]:
    """Run the response as the ASGI server would; the event chunks it sent."""
    chunks: list[str] = []

    async def receive() -> dict[str, Any]:
        if disconnect_after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(disconnect_after)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            if send_fails:
                raise OSError("connection reset by peer")
            chunks.append(message["body"].decode())

    await response({"type": "http", "asgi": {"spec_version": spec_version}}, receive, send)
    return chunks


def _events(chunks: list[str]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for chunk in chunks:
        if chunk.startswith("event: "):
            name, data = chunk.split("\n")[:2]
            out.append((name[len("event: "):], json.loads(data[len("data: "):])))
    return out


def test_settings_cap_streams_per_key_and_their_lifetime():
    from serve.app import ServeSettings

    s = ServeSettings()
    assert s.max_streams_per_key == 4 and s.max_stream_s == 3600.0
    with pytest.raises(ValueError):
        ServeSettings(max_streams_per_key=0)
    with pytest.raises(ValueError):
        ServeSettings(max_stream_s=0)


def test_a_keys_fifth_event_stream_is_refused_while_another_keys_is_not():
    api = _api()

    async def go() -> None:
        for n in range(4):
            await api.events(f"pets-0000000{n}", "alice")
        with pytest.raises(ApiError) as refused:
            await api.events("pets-00000004", "alice")
        assert refused.value.status == 429 and refused.value.code == "too_many_streams"
        assert int(refused.value.headers["Retry-After"]) > 0
        assert "4 event streams open" in refused.value.message
        await api.events("pets-00000005", "bob")  # another key still gets one
        assert api.streams.open == {"alice": 4, "bob": 1}

    asyncio.run(go())


def test_the_count_goes_back_to_zero_however_the_streams_end():
    revoked = {"now": False}

    async def still_valid() -> None:
        if revoked["now"]:
            raise ApiError(401, "invalid_api_key", "this API key was revoked")

    api = _api(states={"done-00000001": ["running", "succeeded"]}, still_valid=still_valid)

    async def go() -> None:
        # The job ends: `end`, and the slot is back.
        chunks = await _serve(await api.events("done-00000001", "alice"))
        assert [name for name, _ in _events(chunks)][-1] == "end"
        assert api.streams.open == {}

        # The client goes away (an ASGI 2.0 server says so through receive()).
        await _serve(await api.events("gone-00000001", "alice"), disconnect_after=0.02)
        assert api.streams.open == {}

        # Sending fails (an ASGI 2.4 server raises; Starlette turns it into ClientDisconnect).
        with pytest.raises(Exception):
            await _serve(await api.events("gone-00000002", "alice"), send_fails=True,
                         spec_version="2.4")
        assert api.streams.open == {}

        # The serving task is cancelled (Serve drops the request).
        task = asyncio.ensure_future(_serve(await api.events("gone-00000003", "alice")))
        await asyncio.sleep(0.02)
        assert api.streams.open == {"alice": 1}
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert api.streams.open == {}

        # The key is revoked: `error`, and the slot is back.
        responses = [await api.events(f"pets-0000000{n}", "alice") for n in range(4)]
        revoked["now"] = True
        for response in responses:
            assert _events(await _serve(response))[-1][1]["error"]["code"] == "invalid_api_key"
        assert api.streams.open == {}

        # Four at a time, again and again: a released slot is a usable slot.
        revoked["now"] = False
        for _ in range(3):
            tasks = [asyncio.ensure_future(_serve(await api.events(f"pets-0000000{n}", "alice"),
                                                  disconnect_after=0.01)) for n in range(4)]
            await asyncio.gather(*tasks)
        assert api.streams.open == {}

    asyncio.run(go())


def test_a_stream_ends_after_its_lifetime_telling_the_client_to_reconnect():
    api = _api(max_stream_s=0.05)

    async def go() -> list[str]:
        response = await api.events("pets-00000001", "alice")
        assert api.streams.open == {"alice": 1}
        return await asyncio.wait_for(_serve(response), 5)

    started = time.monotonic()
    events = _events(asyncio.run(go()))
    assert 0.05 <= time.monotonic() - started < 5
    assert events[0][0] == "progress" and events[0][1]["state"] == "queued"
    name, data = events[-1]
    assert name == "error" and data["error"]["code"] == "stream_expired"
    assert "reconnect" in data["error"]["message"]
    assert api.streams.open == {}


def test_a_stream_opened_with_a_token_ends_when_the_token_expires():
    """A token read from a log opened a stream that ran for ``max_stream_s`` (an hour) past
    the token's few minutes."""
    api = _api(token_expires=time.time() + 0.05)

    async def go() -> list[str]:
        return await asyncio.wait_for(_serve(await api.events("pets-00000001", "alice")), 5)

    started = time.monotonic()
    events = _events(asyncio.run(go()))
    assert time.monotonic() - started < 3
    name, data = events[-1]
    assert name == "error" and data["error"]["code"] == "stream_expired"
    assert "token" in data["error"]["message"] and "reconnect" in data["error"]["message"]
    assert api.streams.open == {}


def test_requests_with_a_token_spend_a_rate_bucket_of_their_own():
    """A token read from a log could otherwise spend the key's requests: every route would
    answer the key 429 while the reader kept opening streams."""
    from serve.app import JobAPI
    from serve.auth import RateLimiter

    limiter = RateLimiter(rate_per_s=0.001, burst=1)

    def with_limiter(api: Any) -> Any:
        api.limiter = limiter
        api._limited = lambda principal, bucket="": JobAPI.func_or_class._limited(
            api, principal, bucket)
        return api

    by_header, by_token = with_limiter(_api()), with_limiter(_api(token_expires=time.time() + 60))

    async def status(api: Any) -> int:
        try:
            await api.events("pets-00000001", "alice")
        except ApiError as exc:
            return exc.status
        return 200

    async def go() -> list[int]:
        return [await status(by_header), await status(by_header),
                await status(by_token), await status(by_token), await status(by_header)]

    assert asyncio.run(go()) == [200, 429, 200, 429, 429]
