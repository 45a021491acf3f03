"""The unit of distributed work (a shard of the job's input) and what a worker reports about it.

A ``WorkUnit`` is small and self-describing: one page of one engine's results for one class, a
slice of a URL list file, a slice of a class's inline ``urls``, or a slice of a published
dataset's rejects (``retry-failed``). Its ``uid`` is derived from what it covers, so a resent or
resumed unit is the same unit, and its ``seq`` (the order the driver first issued it in) orders
near-duplicate decisions between units. The worker that runs a unit reads its candidates itself
(it runs the search, or reads the slice): the driver never sees a candidate. A ``WRITTEN``
unit, last, finishes a unit an interrupted run half wrote and this run never reached, from the
images its shards hold.

A ``UnitReport`` carries counts only: per class, candidates, accepted, rejected by reason and
hits left unused (their class was full before the unit started).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

SEARCH, LIST, INLINE, RETRY = "search", "list", "inline", "retry"
WRITTEN = "written"
"""A unit an interrupted run half wrote that this run never reached (a search page after one
that now answers "no more", a list slice that is gone, a source that kept failing): it has no
candidates of its own and takes back the images its shards hold (``JobRunner``)."""
POS_BITS = 24
"""Bits of a decision token that number a candidate inside its unit."""


@dataclass(frozen=True)
class WorkUnit:
    """One shard of work. ``source`` indexes the job's sources (``spec.sources``, then the
    classes' inline urls as one more source)."""

    uid: str
    seq: int
    kind: str
    source: int
    engine: str = ""
    label: str = ""
    query: str = ""
    page: int = 0
    per_page: int = 0
    slice: int = 0
    start: int = 0
    stop: int = 0
    attempt: int = 0
    """0 when first sent; a resent unit (or one a killed run may have half written) runs to
    the end even when the job is cancelled, so images it wrote before stay accounted for."""
    isolate: bool = False
    """Its worker was lost while it ran, so one of its images may kill the process that
    decodes it: the worker validates its images in a process of its own (rebuilt if it dies,
    and an image that kills it alone is rejected ``validator_crashed``)."""

    def token(self, pos: int) -> int:
        """The decision order of the unit's ``pos``-th candidate, across the whole job."""
        return (self.seq << POS_BITS) | min(pos, (1 << POS_BITS) - 1)


def search_uid(source: int, label: str, query: str, page: int) -> str:
    digest = hashlib.sha1(f"{label}\n{query}".encode()).hexdigest()[:12]
    return f"s{source:02d}-{digest}-p{page:05d}"


def list_uid(source: int, index: int) -> str:
    return f"l{source:02d}-{index:08d}"


def inline_uid(source: int, label: str, start: int) -> str:
    digest = hashlib.sha1(label.encode()).hexdigest()[:12]
    return f"i{source:02d}-{digest}-{start:08d}"


def retry_uid(index: int) -> str:
    return f"r-{index:08d}"


def retry_index(uid: str) -> Optional[int]:
    """The retry slice ``uid`` names (``retry_uid``), or None for any other unit."""
    if uid.startswith("r-") and uid[2:].isdigit():
        return int(uid[2:])
    return None


@dataclass
class ClassTally:
    """One class's counts in a report (or summed over reports)."""

    candidates: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)
    unused: int = 0

    def add(self, other: "ClassTally", sign: int = 1) -> None:
        self.candidates += sign * other.candidates
        self.accepted += sign * other.accepted
        self.unused += sign * other.unused
        for reason, n in other.rejected.items():
            self.rejected[reason] += sign * n
            if not self.rejected[reason]:
                del self.rejected[reason]

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


@dataclass
class SearchOutcome:
    """What a search unit learned about its cursor: hits and whether more pages exist, or the
    engine's error (``status``: its HTTP status, 0 without one; ``final``: the source is done
    for this class; ``refused``: no request went out, the engine's breaker is open, whose
    probes failed ``probes_failed`` times in a row)."""

    hits: int = 0
    has_more: bool = False
    error: str = ""
    status: int = 0
    retryable: bool = False
    retry_after: Optional[float] = None
    final: bool = False
    refused: bool = False
    probes_failed: int = 0


@dataclass
class UnitReport:
    """What a worker says when it has decided a unit's candidates (counts only)."""

    uid: str
    worker: str = ""
    classes: dict[str, ClassTally] = field(default_factory=dict)
    by_stage: Counter = field(default_factory=Counter)
    bytes: int = 0
    search: Optional[SearchOutcome] = None
    skipped: Counter = field(default_factory=Counter)
    relabelled: Counter = field(default_factory=Counter)
    exhausted: bool = False
    """A list unit past the end of its list (nothing to read)."""
    decided_before: int = 0
    """Candidates an earlier run (whose dataset this one continues) decided already."""
    rights: Any = None
    """The unit's ``builder.rights.RightsTally`` over its decided candidates."""
    settled: bool = True
    """False when the unit decided nothing (its search failed, or the job was cancelled
    before it read its candidates): it will not commit, and may be issued again."""

    def tally(self, label: str) -> ClassTally:
        t = self.classes.get(label)
        if t is None:
            t = self.classes[label] = ClassTally()
        return t

    @property
    def candidates(self) -> int:
        return sum(t.candidates for t in self.classes.values())

    @property
    def accepted(self) -> dict[str, int]:
        """Per class with any, its accepted images: what the unit's commit counts."""
        return {label: t.accepted for label, t in self.classes.items() if t.accepted}


@dataclass
class WorkerEvents:
    """What a worker tells the driver besides a report: units it committed (all their accepted
    images are in committed shards and their decisions are journaled) and its fetch stats."""

    worker: str
    committed: list[str] = field(default_factory=list)
    fetch: dict[str, Any] = field(default_factory=dict)
    incarnation: str = ""
    """Changes when the worker restarted: what it had not committed before is lost."""
