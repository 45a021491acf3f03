"""The slow-level validators (NSFW + CLIP) as an actor pool: one model load per actor.

Each actor gets its device from the job's plan (``cuda`` when the spec gives it GPUs, else
``cpu``), never from what the driver machine has. Inputs arrive preprocessed by the CPU hash
validators, so a GPU actor only runs models (fp16 on CUDA). With several actors and
``validation.embedding_dedup_threshold``, the first one holds the embedding store for all:
the others score, and the worker then sends the survivors to it (``dedup``).
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
    def __init__(self, spec: DatasetSpec, device: str, job_id: str = "",
                 dedup_in_score: bool = True):
        self.validator = make_slow_validator(spec, device, dedup_in_score)
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

    def dedup(self, records: list[Record]) -> list[Record]:
        """The embedding dedup of records another scorer scored: the first of a job's scorers
        holds the store for all of them (``SlowValidator.dedup_scored``)."""
        return self.validator.dedup_scored(records)

    def score(self, batch: PreparedBatch) -> list[Record]:
        t0 = time.perf_counter()
        records = self.validator.score(batch)
        self._latency.observe(time.perf_counter() - t0, tags={"stage": "slow",
                                                              "job": self.job_id})
        return records
