"""An engine request ends within about its timeout whatever the server sends: a server that
drips its headers or its body a byte at a time, or redirects slowly, cannot hold a search (and
the job's unit) past ``timeout_s``; the search fails with a retryable ``EngineError``."""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable

import pytest

from builder.engines.sandbox import SandboxEngine
from builder.errors import EngineError

Handler = Callable[[socket.socket, threading.Event], None]
TIMEOUT_S = 1.0
SLACK_S = 1.0
GIVE_UP_S = 5.0


class DripServer:
    """A raw HTTP server on 127.0.0.1 that reads each request and then runs ``handler`` on the
    connection (one at a time) until it returns or the server stops."""

    def __init__(self, handler: Handler):
        self._handler = handler
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> DripServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _addr = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn:
                try:
                    conn.settimeout(5)
                    conn.recv(65536)
                    self._handler(conn, self._stop)
                except OSError:
                    pass  # the client gave up and closed the connection


def drip(conn: socket.socket, stop: threading.Event, head: bytes, piece: bytes) -> None:
    """Send ``head``, then ``piece`` every 0.1 s until the client leaves, the test ends or
    ``GIVE_UP_S`` have passed (so a client without a deadline fails the test, not hangs it)."""
    conn.sendall(head)
    end = time.monotonic() + GIVE_UP_S
    while not stop.wait(0.1) and time.monotonic() < end:
        conn.sendall(piece)


def drip_body(conn: socket.socket, stop: threading.Event) -> None:
    drip(conn, stop, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000\r\n\r\n{\"results\": [", b" ")


def drip_headers(conn: socket.socket, stop: threading.Event) -> None:
    drip(conn, stop, b"HTTP/1.1 200 OK\r\n", b"X-A: b\r\n")


def drip_status_line(conn: socket.socket, stop: threading.Event) -> None:
    drip(conn, stop, b"HTTP/1.1 ", b"2")


def slow_redirect(conn: socket.socket, stop: threading.Event) -> None:
    """Each hop answers a redirect after 0.4 s: no single read is slow, the chain is."""
    stop.wait(0.4)
    conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /again\r\nContent-Length: 0\r\n"
                 b"Connection: close\r\n\r\n")


def timed_search(url: str) -> tuple[EngineError, float]:
    """The error a sandbox search of ``url`` raises, and how long it took."""
    engine = SandboxEngine(url, timeout_s=TIMEOUT_S, allow_private_networks=True)
    start = time.monotonic()
    with pytest.raises(EngineError) as info:
        engine.search("cat", label="cat", page=0, per_page=5)
    return info.value, time.monotonic() - start


@pytest.mark.parametrize("handler", [drip_body, drip_headers, drip_status_line])
def test_a_dripping_server_cannot_hold_a_search_past_its_timeout(handler: Handler) -> None:
    with DripServer(handler) as srv:
        error, took = timed_search(srv.url)
    assert took < TIMEOUT_S + SLACK_S
    assert error.retryable
    assert f"{TIMEOUT_S:g} s" in str(error)


def test_the_timeout_covers_the_whole_redirect_chain() -> None:
    """Six hops of 0.4 s each would reach the redirect limit after 2.4 s; the request's time
    is spent first."""
    with DripServer(slow_redirect) as srv:
        error, took = timed_search(srv.url)
    assert took < TIMEOUT_S + SLACK_S
    assert error.retryable and srv.connections < 6
