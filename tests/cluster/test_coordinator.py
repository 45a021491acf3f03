"""Planning checks of the Ray runner that need no cluster."""

from __future__ import annotations

import pytest

from actors.options import plan_pools
from builder.errors import PixCrawlerError
from builder.spec import parse_spec
from cluster.coordinator import PlanningError, check_job_output, check_nodes
from cluster.rayjob import JOB_CONFIG_ENV

HEAD_AND_TWO_SMALL = [{"memory": 1e9, "node:10.0.0.1": 1.0}, {"CPU": 1.0, "memory": 1e9},
                      {"CPU": 1.0, "crawl": 2.0}]
"""Free resources as Ray reports them: a head of 0 CPUs and two worker nodes of 1 CPU."""


def spec(**resources):
    return parse_spec({"name": "x", "classes": {"a": None},
                       "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:1"}],
                       "validation": {"level": "medium"}, "resources": resources})


@pytest.mark.parametrize("uri", ["datasets/pets", "./pets", "file://pets"])
def test_a_relative_output_under_ray_job_submit_is_refused(monkeypatch, uri):
    monkeypatch.setenv(JOB_CONFIG_ENV, "raysubmit_123")
    with pytest.raises(PixCrawlerError, match="relative path.*ray job submit.*absolute path"):
        check_job_output(uri)


@pytest.mark.parametrize("uri", ["/srv/datasets/pets", "file:///srv/pets", "s3://bucket/pets",
                                 "~/datasets/pets"])
def test_absolute_and_remote_outputs_under_ray_job_submit_pass(monkeypatch, uri):
    monkeypatch.setenv(JOB_CONFIG_ENV, "raysubmit_123")
    check_job_output(uri)


def test_a_relative_output_outside_ray_job_submit_passes(monkeypatch):
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    check_job_output("datasets/pets")


def test_workers_the_spec_sized_that_no_node_can_hold_are_refused_with_what_to_change():
    s = spec(workers=2, worker_cpus=0.92, worker_resources={"crawl": 1})
    plan = plan_pools(s, {"CPU": 2.0}, 2)
    with pytest.raises(PlanningError) as err:
        check_nodes(s, plan, HEAD_AND_TWO_SMALL)
    message = str(err.value)
    assert "each asks for 0.92 CPU, 1 crawl" in message and "at most 1 fit" in message
    assert "{CPU: 0}, {CPU: 1}, {CPU: 1, crawl: 2}" in message
    for field in ("resources.worker_cpus (0.92)", "resources.workers (2)",
                  "resources.worker_resources", "leave resources.workers unset"):
        assert field in message


def test_a_pool_sized_from_the_cluster_shrinks_to_what_the_nodes_hold():
    s = spec()
    plan = plan_pools(s, {"CPU": 2.0}, 2)
    assert plan.workers == 2
    assert check_nodes(s, plan, HEAD_AND_TWO_SMALL).workers == 1


def test_a_pool_that_fits_the_nodes_passes_unchanged():
    s = spec(workers=2, worker_cpus=0.9)
    plan = plan_pools(s, {"CPU": 2.0}, 2)
    assert check_nodes(s, plan, HEAD_AND_TWO_SMALL) is plan


@pytest.mark.parametrize("cancelled, stats, state", [
    (True, {"accepted": 3, "partial_reason": "cancelled"}, "cancelled"),
    (False, {"accepted": 0, "partial_reason": "empty"}, "failed"),
    (False, {"accepted": 7, "partial_reason": "cancelled", "partial_kept": True}, "succeeded"),
    (False, {"accepted": 7, "partial_reason": ""}, "succeeded"),
], ids=["cancelled", "empty", "retry-of-a-partial-dataset", "complete"])
def test_the_final_state_says_failed_only_for_an_empty_result(cancelled, stats, state):
    """A retry that keeps a partial dataset partial accepted images: it is not reported as
    "no image was accepted"."""
    from cluster.coordinator import final_state

    got, error = final_state(cancelled, stats)
    assert got == state
    assert (error is not None) == (state == "failed")
    if error is not None:
        assert error.startswith("no image was accepted")
