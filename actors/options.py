"""The one adapter from a spec's declared resources to Ray actor options and pool sizes.

Defaults fit a 2-core laptop (one I/O-bound downloader on a quarter CPU, the rest for hashing)
and grow with the cluster: the sizes come from the spec first, then from the cluster's total
resources. GPU needs come from the spec, never from what the driver machine has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from builder.spec import DatasetSpec

SMALL_CPUS = 0.05  # bookkeeping actors (limiter, dedup, progress, search): never block the pool


@dataclass(frozen=True)
class PoolPlan:
    """How many of each actor a job runs, and the Ray options of each."""

    download_actors: int
    download_cpus: float
    download_concurrency: int
    hash_actors: int
    hash_cpus: float
    search_workers: int
    gpu_actors: int
    gpus_per_actor: float
    batch_size: int
    max_in_flight: int
    write_cpus: float = 0.5
    slow: bool = False
    gpu_actor_cpus: float = 0.5

    def download_options(self) -> dict[str, Any]:
        return {"num_cpus": self.download_cpus, "max_concurrency": 4 * self.max_in_flight + 8}

    def hash_options(self) -> dict[str, Any]:
        return {"num_cpus": self.hash_cpus, "max_concurrency": 1}

    def gpu_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.gpu_actor_cpus}
        if self.gpus_per_actor:
            opts["num_gpus"] = self.gpus_per_actor
        return opts

    @property
    def device(self) -> str:
        """Where the slow validators run: from the plan, never from the driver's hardware."""
        return "cuda" if self.gpus_per_actor > 0 else "cpu"

    @staticmethod
    def small_options() -> dict[str, Any]:
        return {"num_cpus": SMALL_CPUS}

    def required(self) -> dict[str, float]:
        """Total resources the job's actor pools ask for (for planning and the cluster file test)."""
        cpus = (self.download_actors * self.download_cpus + self.hash_actors * self.hash_cpus
                + (2 + self.search_workers) * SMALL_CPUS + self.write_cpus)
        if self.slow:
            cpus += self.gpu_actors * self.gpu_actor_cpus
        out = {"CPU": cpus}
        if self.slow and self.gpus_per_actor:
            out["GPU"] = self.gpu_actors * self.gpus_per_actor
        return out


def plan_pools(spec: DatasetSpec, cluster: dict[str, float]) -> PoolPlan:
    """Size the pools from the spec, falling back to the cluster's total resources."""
    res = spec.resources
    cpus = float(cluster.get("CPU", 2.0))
    overhead = (2 + res.search_workers) * SMALL_CPUS
    download_actors = res.download_actors or max(1, math.ceil(cpus / 16))
    slow = spec.validation.level == "slow"
    free = cpus - download_actors * res.download_cpus - overhead - res.write_cpus
    if slow:
        free -= res.gpu_actors * res.gpu_actor_cpus
    hash_cpus = res.hash_cpus
    if res.hash_actors:
        hash_actors = res.hash_actors
    elif free >= hash_cpus:
        hash_actors = int(free // hash_cpus)
    else:
        # A small machine: one validator on what is left, so the pools never oversubscribe.
        hash_actors, hash_cpus = 1, max(0.05, round(free, 2))
    return PoolPlan(
        download_actors=download_actors,
        download_cpus=res.download_cpus,
        download_concurrency=spec.download.concurrency,
        hash_actors=hash_actors,
        hash_cpus=hash_cpus,
        search_workers=res.search_workers,
        gpu_actors=res.gpu_actors,
        gpus_per_actor=res.gpus_per_actor,
        batch_size=spec.batch_size(),
        max_in_flight=res.max_in_flight_batches or max(4, 2 * (download_actors + hash_actors)),
        write_cpus=res.write_cpus,
        slow=slow,
        gpu_actor_cpus=res.gpu_actor_cpus,
    )
