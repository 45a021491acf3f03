"""The Host and Origin checks of a server with auth off, against DNS rebinding and cross-site
requests (no Ray, no HTTP): the guard's rules, its middleware, and that it runs in front of the
hot-read fast path in the app's own middleware stack."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Optional

import pytest

from serve.auth import HostCheck, HostGuard


class App:
    """The app behind the middleware: answers 200 and counts what reached it."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope, receive, send) -> None:
        self.calls += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"app"})


def request(asgi: Any, method: str, path: str, host: Optional[str] = "127.0.0.1:8000",
            origin: Optional[str] = None) -> tuple[int, bytes]:
    headers = [(b"host", host.encode())] if host is not None else []
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(),
             "query_string": b"", "headers": headers, "root_path": "", "scheme": "http",
             "http_version": "1.1", "server": ("127.0.0.1", 8000), "client": ("1.2.3.4", 9)}
    asyncio.run(asgi(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], body


def guarded(names: tuple[str, ...] = (), enabled: bool = True) -> tuple[HostCheck, App]:
    app = App()
    return HostCheck(app, guard=lambda: HostGuard(enabled, names)), app


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000",
                                  "localhost.attacker.example", "127.0.0.1.nip.io:8000", ""])
def test_with_auth_off_a_foreign_host_gets_421_naming_the_option(host):
    middleware, app = guarded()
    status, body = request(middleware, "GET", "/v1/jobs", host=host)
    error = json.loads(body)["error"]
    assert status == 421 and error["code"] == "host_not_allowed"
    assert "--allowed-host" in error["message"] and "allowed_hosts" in error["message"]
    assert app.calls == 0


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "LOCALHOST.:9", "127.0.0.1",
                                  "127.0.0.1:8000", "[::1]:8000", "[::1]", "192.168.1.5:8000",
                                  "10.0.0.7", None])
def test_local_names_ip_addresses_and_no_host_are_answered(host):
    middleware, app = guarded()
    assert request(middleware, "GET", "/v1/jobs", host=host)[0] == 200 and app.calls == 1


def test_allowed_hosts_are_answered_with_any_port_and_nothing_under_them():
    middleware, app = guarded(("pix.example.com",))
    for host in ("pix.example.com", "PIX.example.com:443", "pix.example.com.:8000"):
        assert request(middleware, "GET", "/", host=host)[0] == 200, host
    for host in ("evil.pix.example.com", "pix.example.com.attacker.example"):
        assert request(middleware, "GET", "/", host=host)[0] == 421, host
    assert app.calls == 3


def test_with_auth_on_every_host_and_origin_is_answered():
    middleware, app = guarded(enabled=False)
    assert request(middleware, "GET", "/v1/jobs", host="attacker.example")[0] == 200
    assert request(middleware, "POST", "/v1/jobs", origin="http://attacker.example")[0] == 200
    assert app.calls == 2


@pytest.mark.parametrize("method", ["POST", "DELETE", "PUT", "PATCH"])
@pytest.mark.parametrize("origin", ["http://attacker.example", "null", "http://127.0.0.1:9999",
                                    "http://localhost:8000", "file://", "nonsense"])
def test_a_foreign_origin_cannot_change_jobs(method, origin):
    middleware, app = guarded()
    status, body = request(middleware, method, "/v1/jobs/x-1", origin=origin)
    error = json.loads(body)["error"]
    assert status == 403 and error["code"] == "origin_not_allowed"
    assert "--allowed-host" in error["message"] and app.calls == 0


def test_the_own_origin_an_allowed_name_and_reads_pass_the_origin_check():
    middleware, app = guarded(("pix.example.com",))
    assert request(middleware, "POST", "/v1/jobs", origin="http://127.0.0.1:8000")[0] == 200
    assert request(middleware, "DELETE", "/v1/jobs/x-1", host="localhost:8000",
                   origin="http://localhost:8000")[0] == 200
    # A proxy that gives the API another Host than the page's own.
    assert request(middleware, "POST", "/v1/jobs", origin="https://pix.example.com")[0] == 200
    # A read's answer is not the other site's to see (no CORS headers), and changes nothing.
    assert request(middleware, "GET", "/v1/jobs", origin="http://attacker.example")[0] == 200
    assert request(middleware, "POST", "/v1/jobs")[0] == 200  # curl, scripts: no Origin
    assert app.calls == 5


class Replica:
    """The Serve replica as the app's middleware finds it: its host guard and hot reads."""

    def __init__(self) -> None:
        self.host_guard = HostGuard(enabled=True)
        self.hot_reads: list[str] = []

    async def hot_read(self, path: str, query: str,
                       authorization: Optional[str]) -> Optional[bytes]:
        self.hot_reads.append(path)
        return b'{"jobs":[]}'


@pytest.fixture
def app_stack(monkeypatch):
    """The job API's own middleware stack (FastAPI's and the app's), its replica faked."""
    import serve.auth
    import serve.fastpath
    from serve.app import app

    replica = Replica()
    monkeypatch.setattr(serve.fastpath, "_serve_replica", lambda: replica)
    monkeypatch.setattr(serve.auth, "replica_guard", lambda: replica.host_guard)
    return app.build_middleware_stack(), replica


def test_the_host_check_runs_before_the_hot_read_fast_path(app_stack):
    stack, replica = app_stack
    assert request(stack, "GET", "/v1/jobs", host="127.0.0.1:8000") == (200, b'{"jobs":[]}')
    assert replica.hot_reads == ["/v1/jobs"]
    for path in ("/v1/jobs", "/v1/jobs/pets-00000001", "/v1/jobs/pets-00000001/samples",
                 "/", "/healthz"):
        status, body = request(stack, "GET", path, host="attacker.example:8000")
        assert status == 421 and json.loads(body)["error"]["code"] == "host_not_allowed", path
    status, _ = request(stack, "POST", "/v1/jobs", origin="http://attacker.example")
    assert status == 403
    assert replica.hot_reads == ["/v1/jobs"]
