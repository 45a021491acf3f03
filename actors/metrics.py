"""Job metrics exported through ray.util.metrics, so they show on the Ray dashboard.

Names are prefixed ``pixcrawler_``; every metric carries a ``job`` tag. Each process creates its
metric objects once (Ray registers them per process).
"""

from __future__ import annotations

from functools import lru_cache

from ray.util.metrics import Counter, Gauge, Histogram


@lru_cache(maxsize=1)
def counters() -> dict[str, Counter]:
    return {
        "candidates": Counter("pixcrawler_candidates", "candidates taken up",
                              tag_keys=("job", "label")),
        "accepted": Counter("pixcrawler_accepted", "images accepted", tag_keys=("job", "label")),
        "rejected": Counter("pixcrawler_rejected", "candidates rejected",
                            tag_keys=("job", "stage", "reason")),
        "bytes": Counter("pixcrawler_bytes_downloaded", "bytes of accepted images",
                         tag_keys=("job",)),
    }


@lru_cache(maxsize=1)
def queue_depth() -> Gauge:
    return Gauge("pixcrawler_queue_depth", "batches in flight / candidates buffered",
                 tag_keys=("job", "queue"))


@lru_cache(maxsize=1)
def stage_latency() -> Histogram:
    return Histogram("pixcrawler_stage_latency_s", "seconds per batch in a stage",
                     boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60],
                     tag_keys=("job", "stage"))
