"""Free loopback ports, for the servers the project starts (sandbox web, Serve, HAProxy, test
and bench servers) and for URLs that must be refused."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (bound to port 0, then closed).

    Another process may take it before the caller binds it, so use it at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
