"""builder.worker_procs: calls both ways over one channel, errors carried across."""

from __future__ import annotations

import asyncio
import socket

import pytest

from builder.errors import StorageError
from builder.worker_procs import Channel, ChannelClosed


class Side:
    def __init__(self, name: str):
        self.name = name
        self.other: Channel | None = None

    def hello(self, who: str) -> str:
        return f"{self.name} greets {who}"

    async def relay(self, who: str) -> str:
        """Answer by calling back the caller while its own call is pending."""
        assert self.other is not None
        return "via " + await self.other.call("hello", who)

    def fail(self) -> None:
        raise StorageError("cannot write s3://bucket/x: check the credentials")

    def odd(self) -> None:
        class Local(Exception):  # cannot be pickled: defined in a function
            pass

        raise Local("only here")


async def pair() -> tuple[Channel, Channel, Side, Side]:
    a_sock, b_sock = socket.socketpair()
    a, b = Side("a"), Side("b")
    ra, wa = await asyncio.open_connection(sock=a_sock)
    rb, wb = await asyncio.open_connection(sock=b_sock)
    ca, cb = Channel(ra, wa, a), Channel(rb, wb, b)
    a.other, b.other = ca, cb
    return ca, cb, a, b


def test_calls_go_both_ways_and_nest():
    async def main():
        ca, cb, _, _ = await pair()
        assert await ca.call("hello", "a") == "b greets a"
        assert await cb.call("hello", "b") == "a greets b"
        assert await ca.call("relay", "x") == "via a greets x"
        results = await asyncio.gather(*(ca.call("hello", str(i)) for i in range(50)))
        assert results == [f"b greets {i}" for i in range(50)]
        await ca.aclose()
        await cb.aclose()

    asyncio.run(main())


def test_errors_cross_with_their_type_or_as_a_description():
    async def main():
        ca, cb, _, _ = await pair()
        with pytest.raises(StorageError, match="check the credentials"):
            await ca.call("fail")
        with pytest.raises(RuntimeError, match="Local: only here"):
            await ca.call("odd")
        await ca.aclose()
        await cb.aclose()

    asyncio.run(main())


def test_a_call_to_a_side_that_went_away_fails_instead_of_waiting():
    async def main():
        ca, cb, _, _ = await pair()
        pending = asyncio.ensure_future(ca.call("relay", "late"))
        await asyncio.sleep(0)
        await cb.aclose()
        with pytest.raises(ChannelClosed):
            await pending
        await ca.done
        with pytest.raises(ChannelClosed):
            await ca.call("hello", "again")
        await ca.aclose()

    asyncio.run(main())


def test_a_settled_worker_builds_arrays_without_importing_pandas_and_can_still_import_it():
    """pyarrow asks for pandas on its first array; a worker answers that once with pandas
    hidden, and pandas stays importable for whoever needs it."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from builder.worker import settle_process\n"
            "settle_process()\n"
            "import pyarrow as pa\n"
            "pa.Table.from_pylist([{'a': 1}])\n"
            "assert 'pandas' not in sys.modules, 'pyarrow imported pandas'\n"
            "import pandas\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
