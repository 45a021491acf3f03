"""One partition of the job's dedup index as an actor (``builder.dedup.DedupPartition``).

A partition recovers itself: on start (a resumed job, or one that continues a dataset) and on
every restart after its node was lost, it reads its share of the job's committed work from the
journal. A new job's partition starts empty, and imports nothing to read with (the job's
modules cost each partition about 0.4 s of CPU and 80 MB). Each answer carries the partition's
incarnation, so a worker notices a restart and the driver resends what the lost state had
decided but not committed.
"""

from __future__ import annotations

import uuid
from typing import Any, Optional

import numpy as np
import ray

from actors import restarted
from builder.dedup import DedupClient, DedupPartition


@ray.remote
class DedupPartitionActor:
    def __init__(self, index: int, k: int, threshold: int, near: bool,
                 recovery: Optional[dict[str, Any]] = None, starts_empty: bool = False,
                 signatures: float = 0.0):
        """``recovery``: ``builder.pipeline.index_payloads``'s arguments, None for an index
        that never recovers; ``starts_empty``: the first start has nothing to read (a new
        job), only a restart does; ``signatures``: the stored signatures the whole index
        expects (``JobLifecycle.index_signatures``), of which this partition files about a
        ``1/k`` share."""
        self.part = DedupPartition(threshold, near, signatures / k)
        self.index = index
        self.incarnation = uuid.uuid4().hex
        if recovery is not None and not (starts_empty and not restarted()):
            from builder.pipeline import index_payloads

            client = DedupClient(threshold, near, k, _no_calls)
            for payloads in index_payloads(client, **recovery, only=index):
                self.part.load(payloads[index])

    def call(self, method: str, payload: dict[str, np.ndarray]) -> tuple[str, Any]:
        """Run ``DedupPartition.<method>(payload)``; returns (incarnation, result)."""
        return self.incarnation, getattr(self.part, method)(payload)

    def alive(self) -> bool:
        """For a worker waiting on a call: the actor is placed and answering."""
        return True

    def stats(self) -> dict[str, int]:
        return self.part.stats()


async def _no_calls(partition: int, method: str, payload: dict[str, np.ndarray]) -> Any:
    raise RuntimeError("a recovering partition only builds payloads")
