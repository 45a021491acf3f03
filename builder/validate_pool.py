"""Image validation in worker processes, for the in-process runner at the slow level (its one
worker runs in the runner's process, beside the scorers; at the other levels the workers are
processes of their own, ``builder.worker_procs``, and validate in themselves).

The validator's decoding releases the GIL, but its signature code (many small numpy calls over
the views) holds it: threads keep about 1.3 of 2 cores busy (bench/README.md, "Results on
real photos"). ``ProcessValidator`` runs ``ImageValidator`` in a pool of processes instead. A
batch of records goes to a process and comes back validated; what the validator learned is
copied onto the caller's records, so every other reference to them stays good.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import fields
from typing import Any, Optional

from builder.records import Record
from builder.spec import ValidationSpec
from builder.validate import ImageValidator

_validator: Optional[ImageValidator] = None


def _start(cfg: dict[str, Any]) -> None:
    global _validator
    _validator = ImageValidator(ValidationSpec.model_validate(cfg))


def _validate(records: list[Record]) -> list[Record]:
    """Validate in this process; the records go back without their bytes (the caller has
    them; the validator only ever drops them, with a rejection)."""
    assert _validator is not None, "the pool's initializer did not run"
    for record in _validator(records):
        record.data = None
    return records


_FIELDS = tuple(f.name for f in fields(Record) if f.name not in ("candidate", "data"))
"""What the validator may change: every field but the candidate and the bytes."""


class ProcessValidator:
    """``ImageValidator``'s interface (call it on a batch), run in ``processes`` processes.
    Call it from threads (one batch per thread at a time); ``close`` stops the processes."""

    def __init__(self, cfg: ValidationSpec, processes: int):
        # spawn: the caller runs an event loop and threads, which a forked child would copy
        # mid-flight; a spawned one starts clean (its imports overlap the first fetches).
        self.pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_start, initargs=(cfg.model_dump(),))

    def __call__(self, records: list[Record]) -> list[Record]:
        done = self.pool.submit(_validate, records).result()
        for mine, theirs in zip(records, done):
            for name in _FIELDS:
                value = getattr(theirs, name)
                if value is not getattr(mine, name) and value != getattr(mine, name):
                    setattr(mine, name, value)
            if theirs.rejected:
                mine.data = None
        return records

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
