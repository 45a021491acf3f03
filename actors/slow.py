"""The slow-level validators (NSFW + CLIP) as an actor pool: one model load per actor.

Each actor gets its device from the job's plan (``cuda`` when the spec gives it GPUs, else
``cpu``), never from what the driver machine has. Inputs arrive preprocessed by the CPU hash
validators, so a GPU actor only runs models (fp16 on CUDA).
"""

from __future__ import annotations

import time

import ray

from builder.records import Record
from builder.slow import PreparedBatch, make_slow_validator
from builder.spec import DatasetSpec


HEALTH = "health"
"""The concurrency group of ``alive``: answered while a batch is being scored (a scorer runs
one batch at a time), so a caller can tell a busy scorer from one that was never placed."""


@ray.remote(concurrency_groups={HEALTH: 1})
class SlowScorer:
    def __init__(self, spec: DatasetSpec, device: str, job_id: str = ""):
        self.validator = make_slow_validator(spec, device)
        self.validator.load()
        self.job_id = job_id
        from actors.metrics import stage_latency

        self._latency = stage_latency()

    @ray.method(concurrency_group=HEALTH)
    def alive(self) -> bool:
        return True

    def settle(self, records: list[Record]) -> None:
        """The job's final decisions on records scored here (``SlowValidator.settle``)."""
        self.validator.settle(records)

    def score(self, batch: PreparedBatch) -> list[Record]:
        t0 = time.perf_counter()
        records = self.validator.score(batch)
        self._latency.observe(time.perf_counter() - t0, tags={"stage": "slow",
                                                              "job": self.job_id})
        return records
