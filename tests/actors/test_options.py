"""Pool sizing and placement per node (pure: no Ray). A worker runs on one node, so a pool is
sized from each node's free resources and checked against them, not the cluster's total."""

from __future__ import annotations

from dataclasses import replace

from actors.options import SMALL_CPUS, max_workers, plan_pools
from builder.spec import parse_spec

HEAD_AND_TWO_SMALL = [{}, {"CPU": 1.0}, {"CPU": 1.0}]
"""A head of 0 CPUs and two worker nodes of 1 CPU: the bench's three-node cluster."""


def spec(level: str = "medium", **resources):
    return parse_spec({"name": "x", "classes": {"a": None},
                       "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:1"}],
                       "validation": {"level": level}, "resources": resources})


def total(nodes):
    return {"CPU": sum(n.get("CPU", 0.0) for n in nodes)}


def test_a_pool_sized_from_the_total_does_not_fit_nodes_of_one_cpu():
    """What the job did before: 2 workers of 0.92 CPU, but a worker and a small actor fill a
    node of 1 CPU, so one worker never places."""
    plan = plan_pools(spec(), total(HEAD_AND_TWO_SMALL), 2)
    assert (plan.workers, plan.worker_cpus) == (2, 0.92)
    assert max_workers(plan, HEAD_AND_TWO_SMALL) == 1


def test_a_pool_sized_per_node_fits_nodes_of_one_cpu():
    plan = plan_pools(spec(), total(HEAD_AND_TWO_SMALL), 2, HEAD_AND_TWO_SMALL)
    assert plan.workers == 2
    # Room on every node for all the small actors: wherever Ray puts them, a worker fits.
    assert plan.worker_cpus + plan.small_actors * SMALL_CPUS <= 1.0
    assert max_workers(plan, HEAD_AND_TWO_SMALL) == 2


def test_one_node_is_sized_as_before():
    laptop = [{"CPU": 2.0}]
    for level in ("medium", "slow"):
        per_node = plan_pools(spec(level), total(laptop), 2, laptop)
        assert per_node == plan_pools(spec(level), total(laptop), 2)
        assert max_workers(per_node, laptop) == per_node.workers


def test_every_worker_has_the_size_of_the_smallest_share_and_big_nodes_take_more():
    nodes = [{"CPU": 2.0}, {"CPU": 1.0}]
    plan = plan_pools(spec(), total(nodes), 2, nodes)
    assert plan.worker_cpus == 0.85 and plan.workers == 3
    assert max_workers(plan, nodes) == 3


def test_only_nodes_with_the_workers_custom_resource_host_workers():
    nodes = [{"CPU": 4.0}, {"CPU": 2.0, "crawl": 10.0}]
    plan = plan_pools(spec(worker_resources={"crawl": 1}), total(nodes), 2, nodes)
    assert plan.workers == 2 and plan.worker_cpus <= 0.92
    assert max_workers(plan, nodes) == 2
    assert max_workers(replace(plan, worker_resources=(("crawl", 6.0),)), nodes) == 1
    assert max_workers(replace(plan, worker_resources=(("gpu_box", 1.0),)), nodes) == 0


def test_a_pool_that_fits_in_the_best_placement_is_not_refused():
    """Two workers of 0.9 CPU fit two nodes of 1 CPU, with the three small actors in what
    they leave (0.1 CPU each: room for two)."""
    plan = plan_pools(spec(workers=2, worker_cpus=0.9), {"CPU": 2.0}, 2)
    assert max_workers(plan, HEAD_AND_TWO_SMALL) == 2
    assert max_workers(replace(plan, worker_cpus=0.95), HEAD_AND_TWO_SMALL) == 1
    assert max_workers(replace(plan, workers=3, worker_cpus=0.5), HEAD_AND_TWO_SMALL) == 3
    assert max_workers(replace(plan, workers=4, worker_cpus=0.5), HEAD_AND_TWO_SMALL) == 3


def test_scorers_take_their_gpu_node_s_cpus():
    nodes = [{"CPU": 2.0}, {"CPU": 1.0, "GPU": 1.0}]
    plan = plan_pools(spec("slow", workers=4, worker_cpus=0.5, gpus_per_actor=1.0),
                      total(nodes), 2)
    assert max_workers(plan, nodes) == 4  # the small actors go beside the scorer
    assert max_workers(replace(plan, worker_cpus=0.6), nodes) == 3
    assert max_workers(replace(plan, gpu_actors=2), nodes) == -1


def test_nothing_fits_where_the_small_actors_do_not():
    plan = plan_pools(spec(workers=1, worker_cpus=0.01), {"CPU": 0.1}, 2)
    assert max_workers(plan, [{"CPU": 0.1}]) == -1
    assert max_workers(plan, [{"CPU": 0.16}]) == 1


def test_sized_per_node_on_a_large_cluster_is_quick_and_fits():
    import time

    nodes = [{"CPU": 16.0}] * 50
    began = time.monotonic()
    plan = plan_pools(spec(), total(nodes), 2, nodes)
    assert plan.workers == 16 * 50 and max_workers(plan, nodes) == plan.workers
    assert time.monotonic() - began < 2.0
