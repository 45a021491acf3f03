"""The job-wide duplicate index: exact (sha256) and near (pHash + dHash Hamming distance).

Near-duplicate lookups use multi-index hashing: the 64-bit pHash is cut into ``t + 1`` chunks,
so by the pigeonhole principle any hash within ``t`` bits of a stored one matches it exactly in
at least one chunk. Only those bucket-mates are compared in full, so a lookup costs a few dict
probes instead of a scan of the whole job. A pair is a near duplicate when pHash AND dHash are
each within ``t`` bits (both must agree, which keeps distinct images with similar layouts apart).
The first image offered wins; a later duplicate's decision names the kept image's id.
Exact duplicates are removed at every validation level (an image's id is derived from its bytes,
so two copies could not both be written); near duplicates at ``medium`` and ``slow``
(``near=False`` turns them off).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from builder.hashing import hamming
from builder.reasons import Reason


@dataclass(frozen=True)
class DedupDecision:
    reason: Optional[Reason]
    kept_id: str = ""
    distance: int = 0

    @property
    def duplicate(self) -> bool:
        return self.reason is not None


def _chunks(t: int) -> list[tuple[int, int]]:
    n = t + 1
    bounds = [round(i * 64 / n) for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(n) if bounds[i + 1] > bounds[i]]


class DedupIndex:
    """Exact and near-duplicate index for one job (in-process; an actor wraps it on Ray)."""

    def __init__(self, threshold: int = 4, near: bool = True):
        self.threshold = threshold
        self.near = near
        self._exact: dict[str, str] = {}
        self._hashes: dict[str, tuple[int, int]] = {}
        self._chunks = _chunks(threshold)
        self._buckets: list[dict[int, list[str]]] = [{} for _ in self._chunks]

    def __len__(self) -> int:
        return len(self._exact)

    def _keys(self, phash: int) -> list[int]:
        return [(phash >> (64 - start - width)) & ((1 << width) - 1)
                for start, width in self._chunks]

    def find(self, sha256: str, phash: int, dhash: int) -> DedupDecision:
        kept = self._exact.get(sha256)
        if kept is not None:
            return DedupDecision(Reason.EXACT_DUPLICATE, kept, 0)
        if not self.near:
            return DedupDecision(None)
        best: Optional[tuple[int, str]] = None
        seen: set[str] = set()
        for bucket, key in zip(self._buckets, self._keys(phash)):
            for other in bucket.get(key, ()):
                if other in seen:
                    continue
                seen.add(other)
                op, od = self._hashes[other]
                dp = hamming(phash, op)
                if dp <= self.threshold and hamming(dhash, od) <= self.threshold:
                    if best is None or dp < best[0]:
                        best = (dp, other)
        if best is not None:
            return DedupDecision(Reason.NEAR_DUPLICATE, best[1], best[0])
        return DedupDecision(None)

    def add(self, image_id: str, sha256: str, phash: int, dhash: int) -> None:
        if sha256:
            self._exact.setdefault(sha256, image_id)
        if image_id in self._hashes:
            return
        self._hashes[image_id] = (phash, dhash)
        for bucket, key in zip(self._buckets, self._keys(phash)):
            bucket.setdefault(key, []).append(image_id)

    def check_and_add(self, image_id: str, sha256: str, phash: int, dhash: int) -> DedupDecision:
        """Decide one image; if it is not a duplicate it becomes a kept image."""
        decision = self.find(sha256, phash, dhash)
        if not decision.duplicate:
            self.add(image_id, sha256, phash, dhash)
        return decision

    def remove(self, image_id: str) -> None:
        """Forget a kept image (e.g. one later rejected by a slower stage)."""
        hashes = self._hashes.pop(image_id, None)
        if hashes is None:
            return
        for sha, kept in list(self._exact.items()):
            if kept == image_id:
                del self._exact[sha]
        for bucket, key in zip(self._buckets, self._keys(hashes[0])):
            ids = bucket.get(key)
            if ids and image_id in ids:
                ids.remove(image_id)

    def state(self) -> dict:
        """A serialisable snapshot (for resume)."""
        return {"threshold": self.threshold, "exact": dict(self._exact),
                "hashes": {k: [p, d] for k, (p, d) in self._hashes.items()}}

    @classmethod
    def from_state(cls, state: dict, near: bool = True) -> "DedupIndex":
        index = cls(state["threshold"], near=near)
        for image_id, (p, d) in state["hashes"].items():
            index.add(image_id, "", p, d)
        index._exact = dict(state["exact"])
        return index


def apply_dedup(index: DedupIndex, records: list) -> list:
    """Run the not-yet-rejected, hashed records of a batch through ``index`` in order."""
    for record in records:
        if record.rejected or not record.sha256:
            continue
        decision = index.check_and_add(record.id, record.sha256, int(record.phash or "0", 16),
                                       int(record.dhash or "0", 16))
        if decision.duplicate:
            detail = (f"same bytes as {decision.kept_id}" if decision.reason ==
                      Reason.EXACT_DUPLICATE else
                      f"pHash distance {decision.distance} to {decision.kept_id}")
            record.reject(decision.reason, detail, duplicate_of=decision.kept_id)
    return records
