"""CPU hash validators: fast + medium validation on batches, dedup through the index actor.

A validator returns two objects: the batch's records *without* image bytes (small: the
coordinator reads them to count and decide), and a Parquet-schema Arrow table of the images that
passed (the bytes stay in the object store until Ray Data writes them).
"""

from __future__ import annotations

import time
from typing import Any, Optional

import pyarrow as pa
import ray

from builder.reasons import Reason
from builder.records import ACCEPTED_SCHEMA, Record, accepted_row
from builder.spec import DatasetSpec, ValidationSpec
from builder.validate import ImageValidator


def strip_bytes(records: list[Record]) -> list[Record]:
    for r in records:
        if r.data is not None:
            r.extra["bytes"] = len(r.data)
            r.data = None
    return records


@ray.remote
class HashValidator:
    """At the slow level it also preprocesses (decode, resize, model pixels) on this CPU
    actor, so the GPU validators only run models; the third result is that prepared batch."""

    def __init__(self, cfg: ValidationSpec, dedup=None, job_id: str = "",
                 slow_spec: Optional[DatasetSpec] = None):
        self.validator = ImageValidator(cfg)
        self.dedup = dedup
        self.job_id = job_id
        self.prep = None
        if slow_spec is not None:
            from builder.slow import make_slow_validator

            self.prep = make_slow_validator(slow_spec, "cpu")
        from actors.metrics import stage_latency

        self._latency = stage_latency()

    @ray.method(num_returns=3)
    def validate(self, records: list[Record]) -> tuple[list[Record], pa.Table, Any]:
        t0 = time.perf_counter()
        self.validator(records)
        if self.dedup is not None:
            hashed = [r for r in records if not r.rejected and r.sha256]
            if hashed:
                items = [(r.id, r.sha256, r.phash, r.dhash) for r in hashed]
                for r, (reason, kept, dist) in zip(hashed, ray.get(self.dedup.check.remote(items))):
                    if reason is not None:
                        detail = (f"same bytes as {kept}" if reason == Reason.EXACT_DUPLICATE.value
                                  else f"pHash distance {dist} to {kept}")
                        r.reject(Reason(reason), detail, duplicate_of=kept)
        passed = [r for r in records if not r.rejected]
        table = pa.Table.from_pylist([accepted_row(r) for r in passed], schema=ACCEPTED_SCHEMA)
        prepared = self.prep.prepare(records) if self.prep is not None else None
        self._latency.observe(time.perf_counter() - t0, tags={"stage": "validate",
                                                              "job": self.job_id})
        return strip_bytes(records), table, prepared
