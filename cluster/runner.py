"""Which runner a command uses: this process, or Ray.

Both runners run the same shard pipeline (``builder.job``, ``builder.worker``); they differ in
the executor. On one machine of a few cores the in-process runner does the same work without
Ray's fixed cost (starting the GCS, raylet and worker processes: seconds before the first fetch)
or its per-image cost (every unit's results move between processes): bench/README.md measures
both. Ray is the runner whenever the job has somewhere else to go or something only Ray gives:
a cluster to join, GPUs, more workers than this machine has cores, custom resources to place
workers by.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from builder.spec import DatasetSpec

LOCAL_MAX_CPUS = 4
"""The most cores the in-process runner is chosen for: it runs a worker process per core, up
to this many, with the index and ledger in its own process (measured on 2, bench/README.md).
A bigger machine gets Ray, whose index spreads over partition actors."""


@dataclass(frozen=True)
class RunnerChoice:
    ray: bool
    why: str

    def describe(self) -> str:
        return (f"running on Ray: {self.why} (--local runs in this process)" if self.ray else
                f"running in this process: {self.why} (--ray runs it on Ray)")


def choose_runner(spec: DatasetSpec, *, address: Optional[str], local: bool, ray: bool,
                  dashboard: bool = False, cpus: Optional[int] = None) -> RunnerChoice:
    """The runner for ``spec``: ``--local`` / ``--ray`` force one (``--dashboard`` asks for
    Ray); otherwise Ray when joining a
    cluster (``--address`` or ``RAY_ADDRESS``, as ``ray job submit`` sets), or when the job asks
    for GPUs, custom worker resources or more workers than this machine's cores, or the machine
    has more than ``LOCAL_MAX_CPUS`` cores; this process for the rest."""
    if local:
        return RunnerChoice(False, "--local")
    if ray:
        return RunnerChoice(True, "--ray")
    if dashboard:
        return RunnerChoice(True, "--dashboard is Ray's")
    cpus = cpus or os.cpu_count() or 1
    res = spec.resources
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        return RunnerChoice(True, f"joining the cluster at {address}")
    if spec.validation.level == "slow" and res.gpus_per_actor > 0:
        return RunnerChoice(True, "the job asks for GPUs (resources.gpus_per_actor)")
    if res.worker_resources:
        return RunnerChoice(True, "the job places workers by custom resources "
                            "(resources.worker_resources)")
    if res.workers and res.workers * res.worker_cpus > cpus:
        return RunnerChoice(True, f"the job asks for {res.workers} workers of "
                            f"{res.worker_cpus:g} CPU, more than this machine's {cpus} cores")
    if cpus > LOCAL_MAX_CPUS:
        return RunnerChoice(True, f"this machine has {cpus} cores, more than the in-process "
                            f"runner's {LOCAL_MAX_CPUS} worker processes use")
    return RunnerChoice(False, f"the job fits this machine's {cpus} cores")
