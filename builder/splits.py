"""Deterministic train/validation/test assignment by image id."""

from __future__ import annotations

import hashlib


def assign_split(image_id: str, splits: dict[str, float]) -> str:
    """The split of an image: a hash of its id placed on the cumulative fractions.

    The same id always lands in the same split, whatever else the dataset holds, so re-runs and
    resumed jobs never move an image between splits. The fractions are placed in the order
    ``splits`` lists them, so listing them in another order moves images (a resume refuses
    it, ``builder.journal.splits_reordered``).
    """
    x = int.from_bytes(hashlib.sha256(b"split:" + image_id.encode()).digest()[:8], "big") / 2**64
    acc = 0.0
    last = ""
    for name, frac in splits.items():
        if frac <= 0:
            continue
        acc += frac
        last = name
        if x < acc:
            return name
    return last
