"""Short-lived answers for a replica's hot reads (job rows, job lists, progress actors).

Many clients polling the same few jobs should cost the store and the progress actors a few
reads a second, not one per request. ``ReadCache`` keeps each answer for ``fresh_s``; callers
of a key that is missing or expired wait on a single load (never one load each). With
``stale_s`` > ``fresh_s``, an answer up to ``stale_s`` old is returned at once while one
background load refreshes it, so a request does not wait on a slow read whenever a recent
answer exists.

``generation`` (a callable returning a number) ties answers to writes: an answer loaded under
an older generation is never returned, and a caller never joins a load that began before the
latest write. ``JobStore.generation`` moves on every write through that store object, so this
replica's own writes (submit, cancel, the reconciler's updates) show at once; writes by other
processes (other replicas, ``pixcrawler keys``) show within ``stale_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Generic, Hashable, Optional, TypeVar

log = logging.getLogger("pixcrawler.serve.cache")

T = TypeVar("T")
SWEEP_MIN = 256
"""Entries a ``ReadCache`` holds before it first drops the expired ones."""


@dataclass
class _Entry(Generic[T]):
    at: float
    generation: Any
    value: T


class ReadCache(Generic[T]):
    """Answers per key: fresh for ``fresh_s``, served while refreshed up to ``stale_s``.

    ``keep(value)`` says whether an answer may be kept (e.g. not a "no such job", so a job
    created elsewhere is found at once). ``fresh_s`` = 0 turns caching off; loads of one key
    are still shared by the callers that arrive while one is running. Use from one event
    loop."""

    def __init__(self, fresh_s: float, stale_s: Optional[float] = None, *,
                 generation: Callable[[], Any] = lambda: 0,
                 keep: Callable[[T], bool] = lambda _value: True,
                 max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.fresh_s = max(0.0, float(fresh_s))
        self.stale_s = max(self.fresh_s, float(stale_s if stale_s is not None else fresh_s))
        self.generation = generation
        self.keep = keep
        self.max_entries = max_entries
        self.clock = clock
        self._entries: dict[Hashable, _Entry[T]] = {}
        self._sweep_at = min(SWEEP_MIN, max_entries)
        self._loads: dict[tuple[Hashable, Any], asyncio.Task] = {}
        self.loads = 0  # how many loads ran (tests and debugging)

    async def get(self, key: Hashable, load: Callable[[], Awaitable[T]]) -> T:
        generation = self.generation()
        hit = self._entries.get(key)
        if hit is not None and hit.generation == generation:
            age = self.clock() - hit.at
            if age < self.fresh_s:
                return hit.value
            if age < self.stale_s:
                if (key, generation) not in self._loads:
                    self._start(key, load, generation)
                return hit.value
        task = self._loads.get((key, generation)) or self._start(key, load, generation)
        # shield: a caller that goes away (client disconnect) does not cancel the load the
        # other callers wait on.
        return await asyncio.shield(task)

    def forget(self, key: Hashable) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()
        self._sweep_at = min(SWEEP_MIN, self.max_entries)

    def _start(self, key: Hashable, load: Callable[[], Awaitable[T]],
               generation: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(self._load(key, load, generation))
        self._loads[(key, generation)] = task
        task.add_done_callback(self._finished)
        return task

    async def _load(self, key: Hashable, load: Callable[[], Awaitable[T]],
                    generation: Any) -> T:
        try:
            self.loads += 1
            value = await load()
            if self.fresh_s > 0 and self.keep(value) and self.generation() == generation:
                if len(self._entries) >= self._sweep_at:
                    self._sweep()
                if len(self._entries) >= self.max_entries:
                    self.clear()
                self._entries[key] = _Entry(self.clock(), generation, value)
            else:
                self._entries.pop(key, None)
            return value
        finally:
            self._loads.pop((key, generation), None)

    def _sweep(self) -> None:
        """Drop the answers no caller can be given any more (older than ``stale_s``, or of an
        older generation). Done whenever the entries have doubled since the last sweep: what
        is kept is then what was asked for within ``stale_s``, however many keys clients
        have asked for before (each job row holds its spec, up to a megabyte). Where over
        three quarters are still live, all go, as at ``max_entries``."""
        now, generation = self.clock(), self.generation()
        self._entries = {key: entry for key, entry in self._entries.items()
                         if now - entry.at < self.stale_s and entry.generation == generation}
        if len(self._entries) > self.max_entries * 3 // 4:
            self.clear()  # nearly all live: sweeping again soon would free next to nothing
        else:
            self._sweep_at = min(max(SWEEP_MIN, 2 * len(self._entries)), self.max_entries)

    @staticmethod
    def _finished(task: asyncio.Task) -> None:
        # A background refresh nobody awaits: its error is logged here, not lost; the next
        # caller past stale_s loads again and gets the error itself.
        if not task.cancelled() and task.exception() is not None:
            log.debug("cache load failed: %r", task.exception())


class SizedLru(Generic[T]):
    """Values per key, at most ``max_bytes`` of them as ``size`` counts them, the least
    recently used dropped first; a value larger than the whole is not kept. Bounded by size,
    not by count, where one value may be a thousand times another (a job's class list)."""

    def __init__(self, max_bytes: int, size: Callable[[T], int]):
        self.max_bytes = max_bytes
        self.size = size
        self.bytes = 0
        self._entries: OrderedDict[Hashable, tuple[int, T]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Optional[T]:
        found = self._entries.get(key)
        if found is None:
            return None
        self._entries.move_to_end(key)
        return found[1]

    def put(self, key: Hashable, value: T) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[0]
        size = self.size(value)
        if size > self.max_bytes:
            return
        while self._entries and self.bytes + size > self.max_bytes:
            self.bytes -= self._entries.popitem(last=False)[1][0]
        self._entries[key] = (size, value)
        self.bytes += size
