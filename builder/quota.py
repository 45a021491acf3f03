"""The quota ledger: per-class targets held exactly with counters, never with records.

A unit's worker asks for a *grant* once it knows how many of its candidates are valid, per
class; the ledger grants at most what the class still has room for, counting what committed
units accepted plus what other units in flight were granted. The valid images past the grant are
rejected ``over_target``. A grant belongs to its unit: asking again for the same unit (a resent
unit) replaces it, so a unit never holds two; ``floor`` guarantees a resent unit the images an
earlier attempt already wrote (its old grant covered them). ``commit`` turns a grant into
accepted images; ``release`` frees it (the unit was cancelled or will be resent).

Commits are keyed by unit too: the ledger keeps the ids of the units it counted (one small entry
per unit, never per image), so a unit committed twice counts once. That happens on Ray, where
the worker journals a unit before committing it: a ledger restarted in between rebuilds from the
journal (``committed`` holds the unit), then receives the retried commit and the resent unit's.

The ledger also numbers output shards per split, so shard names are unique across workers. A
ledger rebuilt after its actor was lost (``builder.pipeline.recover_ledger``) cannot know which
numbers the lost one handed out: it goes on past the journal's numbers by a margin, and from
then on records in the journal how far it has numbered (``reserve``) before it hands a number
out, so the next rebuilt ledger goes on past it exactly.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable, Optional

RESERVE_BLOCK = 64
"""Shard numbers a rebuilt ledger records as handed out at a time (one small journal write per
64 shards)."""


class QuotaLedger:
    def __init__(self, targets: dict[str, int], accepted: Optional[dict[str, int]] = None,
                 next_shard: Optional[dict[str, int]] = None, committed: Iterable[str] = ()):
        """``accepted`` counts the units in ``committed`` (and what a merge continues)."""
        self.targets = dict(targets)
        self.accepted: Counter = Counter(accepted or {})
        self.committed: set[str] = set(committed)
        self.grants: dict[str, Counter] = {}
        self._granted: Counter = Counter()
        self._next_shard: Counter = Counter(next_shard or {})
        self.reserve: Optional[Callable[[str, int], None]] = None
        """Where set, called with (split, number) to record durably that numbers up to
        ``number`` may be in use, before any of them is handed out."""
        self._reserved: dict[str, int] = {}

    def room(self, label: str) -> int:
        return max(0, self.targets[label] - self.accepted[label] - self._granted[label])

    def rooms(self) -> dict[str, int]:
        """Per class, images it still has room for (target less committed and granted)."""
        return {label: self.room(label) for label in self.targets}

    def grant(self, uid: str, wants: dict[str, int],
              floor: Optional[dict[str, int]] = None) -> dict[str, int]:
        """Grant ``uid`` up to ``wants[label]`` images per class (at least ``floor[label]``),
        replacing any earlier grant of the same unit."""
        self.release(uid)
        out: Counter = Counter()
        for label, n in wants.items():
            if label not in self.targets:
                raise KeyError(f"class {label!r} is not in the job")
            least = min(n, (floor or {}).get(label, 0))
            out[label] = max(least, min(n, self.room(label)))
        self.grants[uid] = out
        self._granted.update(out)
        return dict(out)

    def release(self, uid: str) -> None:
        old = self.grants.pop(uid, None)
        if old:
            self._granted.subtract(old)

    def commit(self, uid: str, accepted: dict[str, int]) -> None:
        """The unit's accepted images are written: they count for good. Its grant is freed;
        a unit already committed is not counted again (a retried or resent commit)."""
        self.release(uid)
        if uid not in self.committed:
            self.committed.add(uid)
            self.accepted.update(accepted)

    def next_shard(self, split: str) -> int:
        n = self._next_shard[split]
        if self.reserve is not None and n >= self._reserved.get(split, 0):
            self.reserve(split, n + RESERVE_BLOCK - 1)
            self._reserved[split] = n + RESERVE_BLOCK
        self._next_shard[split] += 1
        return n

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {label: {"target": t, "accepted": self.accepted[label],
                        "granted": self._granted[label]} for label, t in self.targets.items()}
