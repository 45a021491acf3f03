"""The job's dedup index as one actor (builder.dedup.DedupIndex); a later step shards it."""

from __future__ import annotations

import ray

from builder.dedup import DedupIndex


@ray.remote
class DedupActor:
    def __init__(self, threshold: int, near: bool = True):
        self.index = DedupIndex(threshold, near=near)

    def check(self, items: list[tuple[str, str, str, str]]) -> list[tuple[str | None, str, int]]:
        """Decide ``(id, sha256, phash_hex, dhash_hex)`` items in order: (reason, kept_id, dist)."""
        out = []
        for image_id, sha, p, d in items:
            dec = self.index.check_and_add(image_id, sha, int(p or "0", 16), int(d or "0", 16))
            out.append((dec.reason.value if dec.reason else None, dec.kept_id, dec.distance))
        return out

    def seed(self, items: list[tuple[str, str, str, str]]) -> None:
        """Add ``(id, sha256, phash_hex, dhash_hex)`` of images already kept (resume)."""
        for image_id, sha, p, d in items:
            self.index.add(image_id, sha, int(p or "0", 16), int(d or "0", 16))

    def forget(self, image_ids: list[str]) -> None:
        for image_id in image_ids:
            self.index.remove(image_id)

    def size(self) -> int:
        return len(self.index)

    def state(self) -> dict:
        return self.index.state()
