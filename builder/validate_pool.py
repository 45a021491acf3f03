"""Image validation in worker processes, for the in-process runner at the slow level (its one
worker runs in the runner's process, beside the scorers; at the other levels the workers are
processes of their own, ``builder.worker_procs``, and validate in themselves), and on every
runner for a unit whose worker was lost while it ran (``WorkUnit.isolate``: one of its images
may kill the process that decodes it).

The validator's decoding releases the GIL, but its signature code (many small numpy calls over
the views) holds it: threads keep about 1.3 of 2 cores busy (bench/README.md, "Results on
real photos"). ``ProcessValidator`` runs ``ImageValidator`` in a pool of processes instead. A
batch of records goes to a process and comes back validated; what the validator learned is
copied onto the caller's records, so every other reference to them stays good.

A pool process can die (the OOM killer, a decoder's segfault); that breaks the whole pool
(``BrokenProcessPool``, every batch in flight fails). A bad image must become a rejection, not
a crash, so ``ProcessValidator`` rebuilds the pool and retries; see its docstring. An isolated
unit's accepted images are also resized and re-encoded there (``ProcessValidator.transform``):
the full-size decode a resize needs can kill a process that the 1/8 decode of validation did
not.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import fields
from typing import Any, Callable, Iterator, Optional

from builder.reasons import Reason
from builder.records import Record
from builder.spec import ValidationSpec
from builder.transform import ImageTransformer
from builder.urls import without_secrets
from builder.validate import ImageValidator

log = logging.getLogger(__name__)

_validator: Optional[ImageValidator] = None
PARENT_CHECK_S = 1.0
"""How often a pool process checks that the process that started it is still there."""


def _start(cfg: dict[str, Any]) -> None:
    global _validator
    _validator = ImageValidator(ValidationSpec.model_validate(cfg))
    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True,
                     name="pixcrawler-parent-watch").start()


def _exit_with(parent: int) -> None:
    """Exit once ``parent`` is gone. A pool process waits on its call queue, whose write end it
    holds too, so a parent killed outright (SIGKILL, the OOM killer: what the isolating pool
    is for) would leave it waiting for ever, reparented to init."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(1)


def _validate(records: list[Record]) -> list[Record]:
    """Validate in this process; the records go back without their bytes (the caller has
    them; the validator only ever drops them, with a rejection)."""
    assert _validator is not None, "the pool's initializer did not run"
    for record in _validator(records):
        record.data = None
    return records


_FIELDS = tuple(f.name for f in fields(Record) if f.name not in ("candidate", "data"))
"""What the validator may change: every field but the candidate and the bytes."""

_TRANSFORMED = ("data", "format", "width", "height")
"""What a transform changes."""

CRASHED = "the validating process died on this image (e.g. out of memory, a decoder crash)"


def _keep(record: Record) -> Record:
    """A record whose transform killed its process keeps its image as it came, as one whose
    transform Pillow refuses does (``ImageTransformer.transform_or_keep``): it is accepted and
    counted already."""
    log.warning("resizing/re-encoding %s killed its process; keeping the original image",
                without_secrets(record.candidate.url))
    return record


def _crashed(record: Record) -> Record:
    return record.reject(Reason.VALIDATOR_CRASHED, CRASHED)


def _copy(source: Record, target: Record, names: tuple[str, ...]) -> None:
    """What a pool process changed on its copy of a record, set on the caller's."""
    for name in names:
        value = getattr(source, name)
        if value is not getattr(target, name) and value != getattr(target, name):
            setattr(target, name, value)


_SPAWNING = threading.Lock()
"""Held while a pool starts its processes under ``_safe_path``: two at once would leave the
variable set, or unset while the other starts its own."""

SPAWN_S = 0.05
"""A bound on the time one process takes to start (fork and exec; a few ms): a new pool's
processes wait, their first task, until all of them should have started (0.1 s +
``SPAWN_S`` each), so that each of the pool's first submits starts a process (an idle one would
take it) while ``_safe_path`` holds. A process's own start-up (the interpreter, the imports)
takes longer, so the wait seldom adds to it."""


def _idle_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.monotonic()))  # (one clock for all processes)


@contextmanager
def _safe_path() -> Iterator[None]:
    """``PYTHONSAFEPATH`` set while the pool's processes start. A spawned child runs ``python
    -c``, which puts the current folder first on its import path: anyone who can write there
    (``/tmp``) could plant a ``multiprocessing/`` package that runs as this user. Spawn passes
    no ``-P`` of its own, and the variable is not left set for this process's other children."""
    before = os.environ.get("PYTHONSAFEPATH")
    os.environ["PYTHONSAFEPATH"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONSAFEPATH"]
        else:
            os.environ["PYTHONSAFEPATH"] = before


class ProcessValidator:
    """``ImageValidator``'s interface (call it on a batch), run in ``processes`` processes.
    Call it from threads (one batch per thread at a time); ``close`` stops the processes.

    When a process dies the pool breaks, and every batch in flight with it. Each such batch
    rebuilds the pool (once per break, however many batches saw it) and is retried there once,
    which is enough when another batch's image did it or memory was short for a moment. A batch
    that breaks the pool again holds the culprit: its records are validated one at a time in a
    pool of one process of this call's own (the shared pool is not broken again, and other
    batches' crashes cannot touch it), and a record that kills that process is rejected with
    ``validator_crashed``. So a batch costs at most two shared-pool rebuilds and, after that, one
    process start per record it holds that kills its validator, plus one. A pool broken after
    ``close`` is not rebuilt: the call raises ``BrokenProcessPool``. ``transform`` runs the
    same way, and a record whose resize kills the process keeps its image as it came.
    """

    def __init__(self, cfg: ValidationSpec, processes: int):
        self.cfg = cfg.model_dump()
        self.processes = processes
        self.pool = self._new_pool(processes)
        self._closed = False
        self._lock = threading.Lock()

    def _new_pool(self, processes: int) -> ProcessPoolExecutor:
        # spawn: the caller runs an event loop and threads, which a forked child would copy
        # mid-flight; a spawned one starts clean (its imports overlap the first fetches).
        with _SPAWNING, _safe_path():
            # (its semaphores start multiprocessing's resource tracker, another python -c)
            pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_start, initargs=(self.cfg,))
            until = time.monotonic() + 0.1 + SPAWN_S * processes
            for _ in range(processes):  # each starts a process: none is idle before ``until``
                pool.submit(_idle_until, until)
        return pool

    def __call__(self, records: list[Record]) -> list[Record]:
        done = self._run(_validate, records, _crashed)
        for mine, theirs in zip(records, done):
            _copy(theirs, mine, _FIELDS)
            if theirs.rejected:
                mine.data = None
        return records

    def transform(self, transformer: ImageTransformer, records: list[Record]) -> list[Record]:
        """``transformer`` applied to ``records`` in the pool, as validation is: a record whose
        transform kills its process keeps its image unchanged."""
        done = self._run(transformer, records, _keep)
        for mine, theirs in zip(records, done):
            _copy(theirs, mine, _TRANSFORMED)
        return records

    def _run(self, work: Callable[[list[Record]], list[Record]], records: list[Record],
             crashed: Callable[[Record], Record]) -> list[Record]:
        done = self._shared(work, records)
        if done is None:
            done = self._shared(work, records)
        if done is None:
            done = self._one_by_one(work, records, crashed)
        return done

    def _shared(self, work: Callable[[list[Record]], list[Record]],
                records: list[Record]) -> Optional[list[Record]]:
        """The batch done in the shared pool, or None if the pool broke (it is rebuilt)."""
        with self._lock:
            pool = self.pool
        try:
            return pool.submit(work, records).result()
        except BrokenProcessPool:
            with self._lock:
                if self._closed:
                    raise
                renew = self.pool is pool  # nobody has rebuilt it since this batch saw it
                if renew:
                    self.pool = self._new_pool(self.processes)
            if renew:
                pool.shutdown(wait=True)
            return None

    def _one_by_one(self, work: Callable[[list[Record]], list[Record]], records: list[Record],
                    crashed: Callable[[Record], Record]) -> list[Record]:
        """Each record done alone in a pool of one process of this call's own; one that kills
        the process goes to ``crashed`` (and the next gets a new process)."""
        done: list[Record] = []
        pool: Optional[ProcessPoolExecutor] = None
        try:
            for record in records:
                if record.rejected:  # neither validation nor a transform touches it
                    done.append(record)
                    continue
                if pool is None:
                    pool = self._new_pool(1)
                try:
                    done.extend(pool.submit(work, [record]).result())
                except BrokenProcessPool:
                    pool.shutdown(wait=True)
                    pool = None
                    done.append(crashed(record))
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return done

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool = self.pool
        pool.shutdown(wait=True, cancel_futures=True)
