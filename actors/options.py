"""The one adapter from a spec's declared resources to Ray actor options and pool sizes.

A job runs ``workers`` shard workers (each fetches, validates, dedups and writes its units, on
``worker_cpus`` CPUs), ``dedup_partitions`` index partitions, one quota ledger and one progress
actor (small), and at the slow level ``gpu_actors`` scorers. Sizes come from the spec first,
then from the cluster's total resources: one worker per ``worker_cpus`` of what the small
actors leave, and one index partition per 16 CPUs. On a 2-core laptop that is two workers of
0.9 CPU. GPU needs come from the spec, never from what the driver machine has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from builder.spec import DatasetSpec

SMALL_CPUS = 0.05
"""Bookkeeping actors (index partitions, ledger, progress, limiters) never block a worker."""
CPUS_PER_PARTITION = 16


@dataclass(frozen=True)
class PoolPlan:
    """How many of each actor a job runs, and the Ray options of each."""

    workers: int
    worker_cpus: float
    partitions: int
    units_per_worker: int
    gpu_actors: int
    gpus_per_actor: float
    slow: bool = False
    gpu_actor_cpus: float = 0.5
    worker_resources: tuple[tuple[str, float], ...] = ()

    def worker_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.worker_cpus,
                                "max_concurrency": 4 * self.units_per_worker + 8,
                                "max_restarts": -1, "max_task_retries": 0,
                                "scheduling_strategy": "SPREAD"}
        if self.worker_resources:
            opts["resources"] = dict(self.worker_resources)
        return opts

    def gpu_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.gpu_actor_cpus, "max_restarts": -1,
                                "max_task_retries": 3}
        if self.gpus_per_actor:
            opts["num_gpus"] = self.gpus_per_actor
        return opts

    @staticmethod
    def small_options() -> dict[str, Any]:
        return {"num_cpus": SMALL_CPUS, "max_restarts": -1, "max_task_retries": -1}

    @property
    def device(self) -> str:
        """Where the slow validators run: from the plan, never from the driver's hardware."""
        return "cuda" if self.gpus_per_actor > 0 else "cpu"

    def required(self) -> dict[str, float]:
        """Total resources the job's actors ask for (for planning and the cluster file test)."""
        cpus = self.workers * self.worker_cpus + (self.partitions + 2) * SMALL_CPUS
        if self.slow:
            cpus += self.gpu_actors * self.gpu_actor_cpus
        out = {"CPU": cpus}
        if self.slow and self.gpus_per_actor:
            out["GPU"] = self.gpu_actors * self.gpus_per_actor
        return out


def plan_pools(spec: DatasetSpec, cluster: dict[str, float], units_per_worker: int) -> PoolPlan:
    """Size the pools from the spec, falling back to the cluster's total resources."""
    res = spec.resources
    cpus = float(cluster.get("CPU", 2.0))
    slow = spec.validation.level == "slow"
    partitions = res.dedup_partitions or max(1, math.ceil(cpus / CPUS_PER_PARTITION))
    free = cpus - (partitions + 2) * SMALL_CPUS - (res.gpu_actors * res.gpu_actor_cpus
                                                    if slow else 0.0)
    if res.workers:
        workers, worker_cpus = res.workers, res.worker_cpus
    else:
        # As many workers as worker_cpus fit, rounding to the nearest, sharing what is free.
        workers = max(1, round(free / res.worker_cpus))
        worker_cpus = max(0.05, math.floor(100 * free / workers) / 100)
    return PoolPlan(workers=workers, worker_cpus=worker_cpus, partitions=partitions,
                    units_per_worker=units_per_worker, gpu_actors=res.gpu_actors,
                    gpus_per_actor=res.gpus_per_actor, slow=slow,
                    gpu_actor_cpus=res.gpu_actor_cpus,
                    worker_resources=tuple(sorted(res.worker_resources.items())))
