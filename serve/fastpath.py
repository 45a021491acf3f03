"""The API's two hottest reads answered without FastAPI's request machinery.

Dashboards and scripts poll ``GET /v1/jobs/{id}`` and ``GET /v1/jobs`` far more often than
anything else. On FastAPI's path each of those requests walks its middleware, matches the route
table, solves the route's dependencies (the replica instance, the request, the query
parameters through pydantic) and then encodes the answer twice: ``jsonable_encoder`` copies
the whole job view (its spec and stats included) before ``json.dumps`` writes it. Under load
that is about a quarter of the replica's CPU, more than the API's own work.

``HotReads`` is a pure ASGI middleware in front of that machinery. For a GET of one of those
two paths it asks the replica (``HotReader.hot_read``) for the answer's body. The replica
answers only the plain success case (a valid key, no rate limit hit, the query parameters the
route expects written plainly, a job the key owns) with the same JSON the route would give; for
anything else it returns None, and the request goes on through FastAPI untouched, so every
error answer (401, 404, 422, 429, 500) and every unusual query comes from one place. A fast
answer takes the rate limiter's token itself; a request passed on has taken none, so it is
counted once either way. ``EncodedBodies`` keeps the encoded answers while what they were
made from is unchanged.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Awaitable, Callable, Hashable, Optional, Protocol
from urllib.parse import parse_qsl

log = logging.getLogger("pixcrawler.serve.fastpath")

JOBS_PATH = "/v1/jobs"
_JOB_PREFIX = JOBS_PATH + "/"
# What FastAPI's JSONResponse sends: compact, UTF-8, no NaN.
_HEADERS = [(b"content-type", b"application/json")]

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]],
                    Callable[[Message], Awaitable[None]]], Awaitable[None]]


class HotReader(Protocol):
    async def hot_read(self, path: str, query: str,
                       authorization: Optional[str]) -> Optional[bytes]:
        """The body of the 200 answer to ``GET path?query``, or None to let FastAPI answer."""


def encode(value: Any) -> bytes:
    """JSON as FastAPI's JSONResponse writes it."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, indent=None,
                      separators=(",", ":")).encode("utf-8")


def is_hot(path: str) -> bool:
    """``/v1/jobs`` or ``/v1/jobs/{id}`` (not the deeper routes of a job)."""
    if path == JOBS_PATH:
        return True
    return path.startswith(_JOB_PREFIX) and len(path) > len(_JOB_PREFIX) and \
        "/" not in path[len(_JOB_PREFIX):]


def query_params(query: str, allowed: tuple[str, ...]) -> Optional[dict[str, str]]:
    """The parameters of a query string, or None when one is not in ``allowed`` or is given
    twice: such a request goes FastAPI's way (which ignores unknown parameters and decides
    what a repeated one means)."""
    params: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in allowed or name in params:
            return None
        params[name] = value
    return params


def small_int(text: Optional[str], default: int, low: int, high: Optional[int] = None
              ) -> Optional[int]:
    """A query integer in [low, high] written as plain ASCII digits, else None (FastAPI's
    validation then answers 422, or accepts a spelling this does not)."""
    if text is None:
        return default
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        return None
    value = int(text)
    if value < low or (high is not None and value > high):
        return None
    return value


class EncodedBodies:
    """``encode(build())`` per key, reused while the objects it was made from are the same.

    A job's view is a function of its store row and its live progress, and the replica's read
    caches hand those out as the same objects until they reload them; so hundreds of clients
    polling one job cost one encoding of it per reload, not one each. Sources are compared by
    identity: an equal but new object is encoded again. A key may hold several ``variant``
    bodies of the same sources (a page of the job list cut to each ``?limit=``), all dropped
    with them. At ``max_entries`` keys or ``max_bytes`` of bodies, all are dropped: a client
    asking for many variants costs encodings, never the replica's memory."""

    def __init__(self, max_entries: int = 10_000, max_bytes: int = 64 << 20):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._bodies: dict[Hashable, tuple[tuple[Any, ...], dict[Hashable, bytes]]] = {}
        self._bytes = 0
        self.encoded = 0  # how many times build() ran (tests and debugging)

    def get(self, key: Hashable, sources: tuple[Any, ...], build: Callable[[], Any],
            variant: Hashable = None) -> bytes:
        hit = self._bodies.get(key)
        same = hit is not None and len(hit[0]) == len(sources) and \
            all(a is b for a, b in zip(hit[0], sources))
        if same and variant in hit[1]:
            return hit[1][variant]
        body = encode(build())
        self.encoded += 1
        if hit is not None and not same:
            self._bytes -= sum(map(len, hit[1].values()))
            del self._bodies[key]
        if len(self._bodies) >= self.max_entries or self._bytes + len(body) > self.max_bytes:
            self._bodies.clear()
            self._bytes = 0
        entry = self._bodies.setdefault(key, (sources, {}))
        entry[1][variant] = body
        self._bytes += len(body)
        return body


class HotReads:
    """ASGI middleware: GETs of the hot paths answered by the replica when it can (see the
    module's docstring). ``replica`` finds the object that answers; by default the Serve
    replica this process runs."""

    def __init__(self, app: ASGIApp,
                 replica: Optional[Callable[[], HotReader]] = None):
        self.app = app
        self._find = replica or _serve_replica
        self._replica: Optional[HotReader] = None

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            path = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):]
            if is_hot(path):
                body = await self._answer(scope, path)
                if body is not None:
                    await send({"type": "http.response.start", "status": 200,
                                "headers": _HEADERS + [
                                    (b"content-length", str(len(body)).encode("ascii"))]})
                    await send({"type": "http.response.body", "body": body})
                    return
        await self.app(scope, receive, send)

    async def _answer(self, scope: Scope, path: str) -> Optional[bytes]:
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        if self._replica is None:
            self._replica = self._find()
        try:
            return await self._replica.hot_read(
                path, scope.get("query_string", b"").decode("latin-1"), authorization)
        except Exception:  # noqa: BLE001 - FastAPI's path runs it again and answers the error
            log.debug("hot read of %s passed on after an error", path, exc_info=True)
            return None


def _serve_replica() -> HotReader:
    from ray import serve

    return serve.get_replica_context().servable_object
