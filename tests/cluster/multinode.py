"""Run jobs on a three-node Ray cluster made in this process (``ray.cluster_utils.Cluster``);
``test_multinode.py`` runs this in a subprocess and reads the JSON line it prints last.

The head has 1 CPU and no ``crawl`` resource; the two worker nodes have 1 CPU and
``crawl: 10`` each, and the jobs' shard workers ask for ``crawl``, so they run on the worker
nodes only. Output goes to S3 on a moto server. Scenarios:

1. ``uninterrupted``: a URL-list job; where its workers ran, its figures and accepted ids;
2. ``local_output``: the same spec with a local output: refused at planning;
3. ``node_lost``: the same job, slowed down, with one worker node removed once a third of its
   candidates are decided;
4. ``limiter_node``: the node of an engine's rate limiter created from a worker node (its
   day's count lives in that node's files).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from typing import Any

import pyarrow.parquet as pq


def spec_data(urls_path: str, out: str, delay: float) -> dict[str, Any]:
    return {
        "name": "multinode", "target": 1000, "classes": {"cat": None, "dog": None, "bird": None},
        "sources": [{"engine": "urllist", "path": urls_path}],
        "download": {"timeout_s": 2.0, "retries": 1, "backoff_s": 0.05, "max_bytes": 1_000_000,
                     "allow_private_networks": True, "per_host_delay_s": delay,
                     "per_host_concurrency": 2},
        "output": {"uri": out, "shard_size": 7, "formats": ["parquet", "imagefolder"]},
        "resources": {"batch_size": 6, "workers": 2, "worker_cpus": 0.5,
                      "worker_resources": {"crawl": 1}, "dedup_partitions": 2},
    }


def figures(out: str, storage_options: dict, result: Any) -> dict[str, Any]:
    from builder.storage import open_fs
    from builder.writers import is_complete

    fs, root = open_fs(out, storage_options)
    ids: list[str] = []
    for path in sorted(fs.glob(f"{root}/data/*.parquet")):
        with fs.open(path, "rb") as f:
            ids += pq.read_table(f, columns=["id"])["id"].to_pylist()
    with fs.open(f"{root}/rejects.parquet", "rb") as f:
        rejects = pq.read_table(f).num_rows
    stats = json.loads(fs.cat_file(f"{root}/stats.json"))
    labels = json.loads(fs.cat_file(f"{root}/labels.json"))
    return {"complete": is_complete(out, storage_options), "ids": ids, "rejects_rows": rejects,
            "labels_rows": len(labels), "stats": {k: stats[k] for k in (
                "candidates", "accepted", "rejected", "rejected_by_reason", "classes",
                "resent_units", "workers_by_node")},
            "labels_paths_exist": all(fs.exists(f"{root}/{e['path']}") for e in labels),
            "partial": result.partial}


def limiter_node() -> str:
    """Where an engine's limiter runs when a task on a worker node creates it."""
    import ray

    @ray.remote(num_cpus=0, resources={"crawl": 1})
    def create() -> str:
        from actors.ratelimit import get_rate_limiter

        limiter = get_rate_limiter("sandbox")
        ray.get(limiter.snapshot.remote())
        return limiter._actor_id.hex()

    actor = ray._private.state.actors(ray.get(create.remote()))  # no dashboard for the state API
    return actor["Address"]["NodeID"]


def main() -> None:
    args = json.loads(os.environ["PIXCRAWLER_MULTINODE"])
    import ray
    from ray.cluster_utils import Cluster

    from builder.spec import parse_spec
    from cluster.coordinator import PlanningError, run_job_async

    opts = {"endpoint_url": args["s3"]}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                            "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, resources={"crawl": 10}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="pixcrawler", log_to_driver=False)
    out: dict[str, Any] = {"nodes": {n.node_id: "worker" for n in workers}}
    try:
        base = f"s3://{args['bucket']}/multinode"
        spec = parse_spec(spec_data(args["urls"], f"{base}/whole", 0.0))
        result = asyncio.run(run_job_async(spec, storage_options=opts))
        out["uninterrupted"] = figures(f"{base}/whole", opts, result)

        local = parse_spec(spec_data(args["urls"], os.path.join(args["tmp"], "local"), 0.0))
        try:
            asyncio.run(run_job_async(local))
            out["local_output"] = "accepted"
        except PlanningError as exc:
            out["local_output"] = str(exc)

        spec = parse_spec(spec_data(args["urls"], f"{base}/lost", args["delay"]))
        removed = threading.Event()
        holder: dict[str, Any] = {}
        total = sum(1 for _ in open(args["urls"]))

        def kill_later() -> None:
            """Remove a worker node once a third of the candidates are decided: work is under
            way, and most of it (units running, rows not yet in a shard) is still to come."""
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                runner = holder.get("runner")
                if runner is not None and runner.counts.candidates >= total // 3:
                    break
                time.sleep(0.05)
            mid_job = runner is not None and runner.counts.candidates < total
            cluster.remove_node(workers[1], allow_graceful=False)
            if mid_job:
                removed.set()

        threading.Thread(target=kill_later, daemon=True).start()
        result = asyncio.run(run_job_async(spec, storage_options=opts,
                                           runner_hook=lambda r: holder.setdefault("runner", r)))
        out["node_lost"] = figures(f"{base}/lost", opts, result)
        out["node_lost"]["removed_mid_job"] = removed.is_set()
        out["limiter_node"] = limiter_node()
        out["head"] = cluster.head_node.node_id
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
