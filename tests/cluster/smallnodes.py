"""Jobs on a cluster of small nodes, made in this process (``ray.cluster_utils.Cluster``): a
head of 0 CPUs and two worker nodes of 1 CPU, where a pool sized from the cluster's total (two
workers of 0.92 CPU) cannot place its second worker. ``test_small_nodes.py`` runs this in a
subprocess and reads the JSON line it prints last. Scenarios:

1. ``sized``: a job that leaves ``resources.workers`` unset: sized per node, it completes;
2. ``too_big``: two workers of 0.92 CPU set in the spec: refused at planning;
3. ``never``: a worker that asks for a resource no node has, with the planning check skipped:
   the job fails once no worker has started for a while;
4. ``late``: three workers of 0.45 CPU that ask for the one ``slot`` each node has, with the
   planning check skipped: the job goes on with two, and the third joins once a third node
   is added.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def spec_data(urls_path: str, out: str, delay: float = 0.0, **resources: Any
              ) -> dict[str, Any]:
    return {
        "name": "smallnodes", "target": 12, "classes": {"cat": None, "dog": None},
        "sources": [{"engine": "urllist", "path": urls_path}],
        "download": {"timeout_s": 2.0, "retries": 0, "max_bytes": 1_000_000,
                     "allow_private_networks": True, "per_host_delay_s": delay},
        "output": {"uri": out, "shared_filesystem": True, "formats": ["parquet"]},
        "resources": {"batch_size": 6, **resources},
    }


def summary(result: Any) -> dict[str, Any]:
    stats = result.stats
    return {"partial": result.partial, "accepted": stats["accepted"],
            "workers": stats["pools"]["workers"], "worker_cpus": stats["pools"]["worker_cpus"],
            "workers_by_node": stats["workers_by_node"]}


class Warnings(logging.Handler):
    """Keeps the coordinator's warnings; ``goes_on`` is set at the first that says the job
    goes on without the workers that have not started. Under load a "still waiting" warning
    (no worker started yet) can come first; the third node must not be added before the job
    has gone on with two, or the scenario never happens."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.goes_on = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if "goes on with" in self.messages[-1]:
            self.goes_on.set()


def main() -> None:
    args = json.loads(os.environ["PIXCRAWLER_SMALLNODES"])
    import ray
    from ray.cluster_utils import Cluster

    import cluster.coordinator as coordinator
    from builder.spec import parse_spec

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0,
                                                            "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources={"slot": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="pixcrawler", log_to_driver=False)
    out: dict[str, Any] = {}
    try:
        def run(name: str, delay: float = 0.0, **resources: Any) -> Any:
            spec = parse_spec(spec_data(args["urls"], os.path.join(args["tmp"], name), delay,
                                        **resources))
            return asyncio.run(asyncio.wait_for(coordinator.run_job_async(spec), 120))

        out["sized"] = summary(run("sized"))
        try:
            run("too_big", workers=2, worker_cpus=0.92)
            out["too_big"] = "accepted"
        except coordinator.PlanningError as exc:
            out["too_big"] = str(exc)

        coordinator.check_nodes = lambda spec, plan, nodes: plan
        coordinator.START_WARN_S, coordinator.START_GIVE_UP_S = 1.0, 2.5
        try:
            run("never", workers=1, worker_resources={"nowhere": 1})
            out["never"] = "accepted"
        except coordinator.PlanningError as exc:
            out["never"] = str(exc)

        warnings = Warnings()
        logging.getLogger("pixcrawler.coordinator").addHandler(warnings)
        # The late job waits as long as it must for its first worker: under load a Ray
        # worker process can take more than the 2.5 s above to start.
        coordinator.START_WARN_S, coordinator.START_GIVE_UP_S = 3.0, 60.0
        # The job runs in a thread: Ray adds a node only from the main thread.
        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(run, "late", 0.5, workers=3, worker_cpus=0.45,
                              worker_resources={"slot": 1})
            if warnings.goes_on.wait(90):
                cluster.add_node(num_cpus=1, resources={"slot": 1})
            out["late"] = summary(job.result())
        out["late"]["warnings"] = warnings.messages
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
