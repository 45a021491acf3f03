"""The bytes of images a worker's units hold, from each download until the unit is decided.

A unit keeps each image it validates until the whole unit is decided (dedup ranks a unit's
copies of one picture together, then the quota grants, then the rows are built), so a worker
running several units held up to units x ``batch_size`` x the images' size: the fetcher's byte
budget (``download.max_bytes_in_flight``) counts only bodies not yet validated. A body counts
here from its arrival (while it waits for validation it counts in both) until its unit ends,
or until validation rejects it and drops its bytes.

``HeldBudget`` keeps those bytes near ``resources.max_held_mb``: before each download a unit
asks for its ``turn``, which it gets at once while the worker holds at most the limit, and
always when it is the oldest unit holding images (by its first bytes) or holds none. The
oldest unit therefore finishes and gives its bytes back; the others wait for room instead of
adding to a pile. A waiting unit may still hold bodies it was collecting into a validation
batch, which keep their share of the fetcher's byte budget; a body of the oldest unit that
has to wait for that budget has every unit hand such bodies on to validation first
(``ByteBudget.on_wait``, ``WorkerRuntime.hand_on``), and while one waits, every body that
arrives goes on to validation at once; a body that still waits ``download.timeout_s`` for the
budget is a ``timeout``.
What a worker holds stays under the limit plus the oldest unit's images plus the downloads
already started when the limit was passed. A unit's turn is asked as one of its download
slots (``per_host_concurrency`` per host) takes its next candidate, so its first downloads,
one per slot, start together before it holds anything.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict


class HeldBudget:
    """Bytes of images per running unit, oldest first (see the module docstring). Use it from
    one event loop: ``open`` a unit, ``await turn`` before each of its downloads, ``add`` the
    bytes of each body it receives (less those validation rejects), and ``close`` it when it
    ends, whatever way it ends."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self.peak = 0
        """The most bytes held at once."""
        self.waits = 0
        """How many downloads waited for room."""
        self._units: OrderedDict[int, int] = OrderedDict()  # ticket -> bytes, oldest first
        self._tickets = itertools.count()
        self._open: set[int] = set()
        self._room: asyncio.Event | None = None

    def open(self) -> int:
        """A ticket for a unit that starts now. The unit takes its place among the units
        holding images (oldest first) with its first bytes, so a unit that is still waiting
        for its search page or its URL checks is not the oldest for want of holding any."""
        ticket = next(self._tickets)
        self._open.add(ticket)
        return ticket

    def add(self, ticket: int, n: int) -> None:
        """The unit holds ``n`` more bytes of images (fewer, for ``n`` below 0: an image its
        validation rejected)."""
        if not n or ticket not in self._open or (n < 0 and ticket not in self._units):
            return
        now = self._units.get(ticket, 0) + n
        if now > 0:
            self._units[ticket] = now
        else:  # holds nothing now: its next bytes place it again, as the youngest
            self._units.pop(ticket, None)
        self.held += n
        self.peak = max(self.peak, self.held)
        if n < 0:
            self._wake()

    def close(self, ticket: int) -> None:
        """The unit ended: its images are in rows, rejected or dropped. Every waiting unit
        looks again: there may be room now, or it may now be the oldest."""
        self.held -= self._units.pop(ticket, 0)
        self._open.discard(ticket)
        self._wake()

    def _wake(self) -> None:
        if self._room is not None:
            self._room.set()
            self._room = None

    def may_go(self, ticket: int) -> bool:
        """Whether the unit may start a download now: there is room, or it is the oldest unit
        holding images, or it holds none."""
        return (self.held <= self.limit or ticket not in self._units
                or ticket == next(iter(self._units)))

    async def turn(self, ticket: int) -> None:
        """Wait until the unit may start another download (``may_go``)."""
        if self.may_go(ticket):
            return
        self.waits += 1
        while not self.may_go(ticket):
            if self._room is None:
                self._room = asyncio.Event()
            await self._room.wait()
