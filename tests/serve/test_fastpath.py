"""The hot-read middleware without Serve: which requests it answers, and that everything else
(other paths, other methods, no answer, an error) reaches the app untouched."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Optional

import pytest

from serve.fastpath import HotReads, encode, is_hot, query_params, small_int


class Replica:
    def __init__(self, answer: Optional[bytes] = b'{"ok":true}', error: bool = False):
        self.answer = answer
        self.error = error
        self.calls: list[tuple[str, str, Optional[str]]] = []

    async def hot_read(self, path: str, query: str,
                       authorization: Optional[str]) -> Optional[bytes]:
        self.calls.append((path, query, authorization))
        if self.error:
            raise RuntimeError("store down")
        return self.answer


class App:
    def __init__(self):
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope, receive, send) -> None:
        self.scopes.append(scope)
        await send({"type": "http.response.start", "status": 418, "headers": []})
        await send({"type": "http.response.body", "body": b"app"})


def request(middleware: HotReads, method: str, path: str, query: bytes = b"",
            headers: Optional[list[tuple[bytes, bytes]]] = None, root_path: str = ""
            ) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "query_string": query,
             "headers": headers or [], "root_path": root_path}
    asyncio.run(middleware(scope, receive, send))
    start, body = sent
    return start["status"], dict(start["headers"]), body["body"]


def test_a_hot_get_is_answered_by_the_replica_with_the_key_and_query():
    replica, app = Replica(), App()
    mw = HotReads(app, replica=lambda: replica)
    status, headers, body = request(mw, "GET", "/v1/jobs/abc", b"x=1",
                                    [(b"accept", b"*/*"), (b"authorization", b"Bearer k1")])
    assert (status, body) == (200, b'{"ok":true}')
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"content-length"] == b"11"
    assert replica.calls == [("/v1/jobs/abc", "x=1", "Bearer k1")]
    assert app.scopes == []


@pytest.mark.parametrize("method,path", [
    ("POST", "/v1/jobs"), ("DELETE", "/v1/jobs/abc"), ("GET", "/v1/jobs/abc/events"),
    ("GET", "/v1/jobs/"), ("GET", "/healthz"), ("GET", "/v1/jobsx"), ("HEAD", "/v1/jobs"),
])
def test_other_requests_go_to_the_app_without_asking_the_replica(method, path):
    replica, app = Replica(), App()
    status, _, body = request(HotReads(app, replica=lambda: replica), method, path)
    assert (status, body) == (418, b"app")
    assert replica.calls == [] and len(app.scopes) == 1


def test_no_answer_or_an_error_from_the_replica_passes_the_request_on():
    for replica in (Replica(answer=None), Replica(error=True)):
        app = App()
        mw = HotReads(app, replica=lambda: replica)
        assert request(mw, "GET", "/v1/jobs")[0] == 418
        assert len(replica.calls) == 1 and len(app.scopes) == 1


def test_the_mount_point_is_taken_off_the_path():
    replica = Replica()
    mw = HotReads(App(), replica=lambda: replica)
    assert request(mw, "GET", "/api/v1/jobs", root_path="/api")[0] == 200
    assert replica.calls[0][0] == "/v1/jobs"


def test_non_http_scopes_go_to_the_app():
    app = App()
    mw = HotReads(app, replica=lambda: pytest.fail("the replica was asked"))

    async def run() -> None:
        async def nothing(*_args: Any) -> Any:
            return {"type": "lifespan.startup"}
        await mw({"type": "lifespan"}, nothing, nothing)

    asyncio.run(run())
    assert app.scopes == [{"type": "lifespan"}]


def test_hot_paths():
    assert is_hot("/v1/jobs") and is_hot("/v1/jobs/j-1")
    assert not is_hot("/v1/jobs/") and not is_hot("/v1/jobs/j-1/samples")
    assert not is_hot("/v1/job") and not is_hot("/")


def test_query_params_pass_on_unknown_or_repeated_names():
    allowed = ("state", "limit", "offset")
    assert query_params("", allowed) == {}
    assert query_params("limit=5&state=running%2Cfailed&offset=",
                        allowed) == {"limit": "5", "state": "running,failed", "offset": ""}
    assert query_params("limit=5&limit=6", allowed) is None
    assert query_params("limit=5&debug=1", allowed) is None
    assert query_params("x=1", ()) is None and query_params("", ()) == {}


def test_small_int_takes_only_plain_digits_in_range():
    assert small_int(None, 20, 1, 100) == 20
    assert small_int("7", 20, 1, 100) == 7 and small_int("007", 20, 1, 100) == 7
    assert small_int("100", 20, 1, 100) == 100 and small_int("0", 0, 0) == 0
    for bad in ("0", "101", "", " 5", "+5", "5.0", "-1", "²", "1" * 10):
        assert small_int(bad, 20, 1, 100) is None, bad


def test_encoding_matches_fastapis_json_response():
    from starlette.responses import JSONResponse

    value = {"name": "чай ☕", "n": 1.5, "list": [1, None, True], "nested": {"a": "b\n"}}
    assert encode(value) == JSONResponse(value).body
    assert json.loads(encode(value)) == value
    with pytest.raises(ValueError):
        encode({"x": float("nan")})


def test_a_body_is_encoded_again_only_when_its_sources_change():
    from serve.fastpath import EncodedBodies

    bodies = EncodedBodies(max_entries=2)
    row, live = {"id": "j1"}, {"n": 1}
    built: list[int] = []

    def build() -> dict[str, Any]:
        built.append(1)
        return {**row, **live}

    first = bodies.get("j1", (row, live), build)
    assert bodies.get("j1", (row, live), build) is first and len(built) == 1
    fresh = {"n": 2}
    assert json.loads(bodies.get("j1", (row, fresh), lambda: {**row, **fresh})) == \
        {"id": "j1", "n": 2}
    # Sources are compared by identity: an equal copy is a new object, encoded again.
    bodies.get("j1", (row, dict(fresh)), build)
    assert len(built) == 2
    for key in ("a", "b", "c"):
        bodies.get(key, (row,), lambda: key)
    assert len(bodies._bodies) <= 2 and bodies.encoded == 6


def test_encoded_bodies_are_bounded_in_bytes_and_variants_share_their_sources():
    """A client asking for a large page cut to every ?limit= costs encodings, never more than
    max_bytes of bodies, and the variants of one page hold that page once: a body per limit
    used to keep its own page object alive (2,000 of them 387 MB for 1 MB of bodies)."""
    import gc
    import weakref

    from serve.fastpath import EncodedBodies

    class Page(list):
        pass

    bodies = EncodedBodies(max_bytes=10_000)
    pages = []
    for n in range(100):
        page = Page([n])
        pages.append(weakref.ref(page))
        for limit in (1, 2, 3):
            bodies.get(("list", "o", ()), (page,), lambda: "x" * 1_000, variant=limit)
        assert bodies._bytes == sum(len(b) for _, v in bodies._bodies.values()
                                    for b in v.values()) <= 10_000
    del page
    gc.collect()
    assert sum(ref() is not None for ref in pages) == 1 and len(bodies._bodies) == 1
    held = bodies._bodies[("list", "o", ())]
    assert sorted(held[1]) == [1, 2, 3]
    first = held[1][2]
    assert bodies.get(("list", "o", ()), held[0], lambda: "new", variant=2) is first
    assert bodies.encoded == 300
