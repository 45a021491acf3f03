"""The one adapter from a spec's declared resources to Ray actor options and pool sizes.

A job runs ``workers`` shard workers (each fetches, validates, dedups and writes its units, on
``worker_cpus`` CPUs), ``dedup_partitions`` index partitions, one quota ledger and one progress
actor (small), and at the slow level ``gpu_actors`` scorers. Sizes come from the spec first,
then from the cluster's free resources: one index partition per 16 CPUs and, per node, one
worker per ``worker_cpus`` of what is left there once room for the small actors (and the
scorers) is kept aside (``size_workers``), every worker of the same size. On a 2-core laptop
that is two workers of 0.92 CPU; on two nodes of 1 CPU, one worker of 0.85 CPU on each. GPU
needs come from the spec, never from what the driver machine has.

A worker lives on one node, so a pool that fits the cluster's total can still not fit its
nodes: ``max_workers`` simulates the placement of a plan's actors onto each node's free
resources.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from builder.spec import DatasetSpec, ResourcesSpec

SMALL_CPUS = 0.05
"""Bookkeeping actors (index partitions, ledger, progress, limiters) never block a worker."""
CPUS_PER_PARTITION = 16
RESERVE_CAP = 0.5
"""Sizing per node keeps room on every node for all the small actors, at most this many CPUs
(Ray may put them on any node; past this, ``RayExecutor.start`` runs without a late worker)."""
_EPS = 1e-6
Node = Mapping[str, float]
"""One node's free resources, as Ray names them (``CPU``, ``GPU``, custom ones)."""


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

    def worker_needs(self) -> dict[str, float]:
        """What one worker asks Ray for."""
        return {"CPU": self.worker_cpus, **dict(self.worker_resources)}

    def scorer_needs(self) -> dict[str, float]:
        """What one slow-level scorer asks Ray for (none below the slow level)."""
        return {"CPU": self.gpu_actor_cpus, "GPU": self.gpus_per_actor} if self.slow else {}

    @property
    def small_actors(self) -> int:
        """Index partitions, the quota ledger and the progress actor."""
        return self.partitions + 2

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


def plan_pools(spec: DatasetSpec, cluster: dict[str, float], units_per_worker: int,
               nodes: Optional[Sequence[Node]] = None) -> PoolPlan:
    """Size the pools from the spec, falling back to the cluster's free resources: per node
    where ``nodes`` (each node's free resources) is given, else from the total."""
    res = spec.resources
    cpus = float(cluster.get("CPU", 2.0))
    slow = spec.validation.level == "slow"
    partitions = res.dedup_partitions or max(1, math.ceil(cpus / CPUS_PER_PARTITION))
    small = (partitions + 2) * SMALL_CPUS
    scorers = res.gpu_actors * res.gpu_actor_cpus if slow else 0.0
    if res.workers:
        workers, worker_cpus = res.workers, res.worker_cpus
    elif nodes:
        gpu = slow and res.gpus_per_actor > 0 and any(n.get("GPU", 0.0) > 0 for n in nodes)
        reserves = [min(small, RESERVE_CAP) + (scorers if not gpu or n.get("GPU", 0.0) > 0
                                               else 0.0) for n in nodes]
        workers, worker_cpus = size_workers(res, nodes, reserves)
    else:
        # As many workers as worker_cpus fit, rounding to the nearest, sharing what is free.
        free = cpus - small - scorers
        workers = max(1, round(free / res.worker_cpus))
        worker_cpus = max(0.05, math.floor(100 * free / workers) / 100)
    return PoolPlan(workers=workers, worker_cpus=worker_cpus, partitions=partitions,
                    units_per_worker=units_per_worker, gpu_actors=res.gpu_actors,
                    gpus_per_actor=res.gpus_per_actor, slow=slow,
                    gpu_actor_cpus=res.gpu_actor_cpus,
                    worker_resources=tuple(sorted(res.worker_resources.items())))


def _room(free: Node, need: Mapping[str, float]) -> int:
    """How many of ``need`` fit in ``free``, by every resource it asks for."""
    counts = [math.floor(free.get(k, 0.0) / v + _EPS) for k, v in need.items() if v > 0]
    return max(0, min(counts)) if counts else 1 << 30


def size_workers(res: ResourcesSpec, nodes: Sequence[Node],
                 reserves: Sequence[float]) -> tuple[int, float]:
    """``(workers, worker_cpus)`` for a pool sized per node: on each node, what is free past
    its reserve makes ``round(room / worker_cpus)`` workers (nodes without the spec's
    ``worker_resources`` make none); every worker gets the smallest of those shares (to the
    0.01 CPU below), and then each node takes as many of that size as fit. With no node
    able to hold one, one worker the size of the largest room (which planning then refuses
    if it cannot place it)."""
    extra = dict(res.worker_resources)
    rooms = [max(0.0, n.get("CPU", 0.0) - r) for n, r in zip(nodes, reserves)]
    hosts = [(room, k) for room, n in zip(rooms, nodes)
             if (k := min(round(room / res.worker_cpus), _room(n, extra))) > 0]
    if not hosts:
        return 1, max(0.05, math.floor(100 * max(rooms, default=0.0)) / 100)
    cpus = min(math.floor(100 * room / k) / 100 for room, k in hosts)
    if cpus <= 0:
        return 1, 0.05
    need = {"CPU": cpus, **extra}
    workers = sum(_room({**n, "CPU": room}, need) for room, n in zip(rooms, nodes))
    return max(1, workers), cpus


def max_workers(plan: PoolPlan, nodes: Sequence[Node]) -> int:
    """The most of the plan's workers (at most ``plan.workers``) that the nodes can hold
    beside all its other actors (the small ones and the scorers), in the best placement;
    -1 where even those do not fit.

    Exact for these three kinds of identical actors: a search over the nodes, keeping for
    each count of small actors and scorers placed so far the most workers placed beside
    them. Past ``SEARCH_BUDGET`` steps (hundreds of small actors on hundreds of nodes) it
    checks only what is certain, that the nodes have room for the workers alone: planning
    must not refuse a job that could run."""
    want_s, want_g = plan.small_actors, plan.gpu_actors if plan.slow else 0
    worker, scorer = plan.worker_needs(), plan.scorer_needs()
    fronts = [_front(node, plan.workers, worker, want_g, scorer, want_s) for node in nodes]
    states = (want_s + 1) * (want_g + 1)
    if states * sum(len(f) for f in fronts) > SEARCH_BUDGET:
        return min(plan.workers, sum(_room(n, worker) for n in nodes))
    # best[(s, g)]: the most workers placed beside s small actors and g scorers so far.
    best: dict[tuple[int, int], int] = {(0, 0): 0}
    for front in fronts:
        step: dict[tuple[int, int], int] = {}
        for (s0, g0), w0 in best.items():
            for s1, g1, w1 in front:
                key = (min(want_s, s0 + s1), min(want_g, g0 + g1))
                if step.get(key, -1) < w0 + w1:
                    step[key] = w0 + w1
        best = step
    return min(plan.workers, best.get((want_s, want_g), -1))


SEARCH_BUDGET = 4_000_000
"""The most steps ``max_workers`` takes for an exact answer (about a second)."""


def _front(node: Node, want_w: int, worker: Mapping[str, float], want_g: int,
           scorer: Mapping[str, float], want_s: int) -> list[tuple[int, int, int]]:
    """What one node can hold: ``(small actors, scorers, workers)`` triples, the most workers
    for each count of the other two."""
    best: dict[tuple[int, int], int] = {}
    for g in range(min(want_g, _room(node, scorer)) + 1):
        left = {k: v - g * scorer.get(k, 0.0) for k, v in node.items()}
        for w in range(min(want_w, _room(left, worker)) + 1):
            s = min(want_s, math.floor((left.get("CPU", 0.0) - w * worker["CPU"]) / SMALL_CPUS
                                       + _EPS))
            if best.get((s, g), -1) < w:
                best[(s, g)] = w
    return [(s, g, w) for (s, g), w in best.items()]
