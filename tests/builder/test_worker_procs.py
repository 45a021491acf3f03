"""builder.worker_procs: calls both ways over one channel, errors carried across."""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest

from builder.errors import StorageError
from builder.worker_procs import Channel, ChannelClosed
from tests.processes import run_python


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

    async def slow(self) -> None:
        await asyncio.sleep(30)

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


def test_a_message_that_does_not_read_back_fails_the_waiting_calls():
    """A frame that did not unpickle ended the channel's reader with the error, and every
    call waiting on the channel waited for ever."""
    import struct

    async def main():
        ca, cb, _, _ = await pair()
        waiting = asyncio.ensure_future(ca.call("slow"))
        await asyncio.sleep(0.05)
        body = b"\x80\x05not a pickle"
        cb.writer.write(struct.pack("!Q", len(body)) + body)
        with pytest.raises(ChannelClosed, match="could not be read"):
            await asyncio.wait_for(waiting, 5)
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers fork on Linux only")
def test_worker_0_exits_only_after_the_workers_it_forked():
    """So a forked worker never outlives it, to be reaped (late, or never) by init; but not
    after every child: multiprocessing's resource tracker (started with an isolating
    validator's processes) leaves only once worker 0 has, and waiting for it held worker 0
    until the runner killed it, 10 s later.

    The kernel wakes a waiting parent before it frees an auto-reaped child's pid, so the pid
    can answer ``kill(pid, 0)`` for a moment after the wait ends (CI saw it once), and for
    longer on a loaded machine: the child must be exiting or gone (the kernel's PF_EXITING, a
    zombie, no pid), not sleeping out the 1 s it would live if nothing waited."""
    code = ("import os, signal, subprocess, sys, time\n"
            "from builder.worker_procs import outlive_children\n"
            "signal.signal(signal.SIGCHLD, signal.SIG_IGN)\n"
            "other = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    time.sleep(1.0)\n"
            "    os._exit(0)\n"
            "start = time.monotonic()\n"
            "outlive_children([pid])\n"
            "waited = time.monotonic() - start\n"
            "other.kill()\n"
            "assert 0.8 < waited < 30, waited\n"
            "try:\n"
            "    with open(f'/proc/{pid}/stat') as f:\n"
            "        fields = f.read().rsplit(')', 1)[1].split()\n"
            "    state, exiting = fields[0], int(fields[6]) & 0x4\n"  # PF_EXITING
            "except FileNotFoundError:\n"
            "    state, exiting = 'gone', True\n"
            "assert exiting or state in ('Z', 'X'), f'the child is still there ({state})'\n")
    run_python(code)
