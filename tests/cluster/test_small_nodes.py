"""Jobs on a head of 0 CPUs and two worker nodes of 1 CPU (all on this machine): a pool sized
per node runs, one the spec sized too big for a node is refused at planning, and a worker Ray
cannot place does not hold the job silently. The cluster lives in a subprocess
(``smallnodes.py``): a process holds one Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def small_nodes(sandbox, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smallnodes")
    urls = tmp / "urls.txt"
    urls.write_text("".join(f"{label}\t{u}\n" for label in ("cat", "dog")
                            for u in sandbox.class_image_urls(label)))
    env = dict(os.environ, PIXCRAWLER_SMALLNODES=json.dumps({"urls": str(urls),
                                                              "tmp": str(tmp)}),
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=str(HERE.parent.parent))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(HERE / "smallnodes.py")], env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_pool_sized_from_the_cluster_fits_nodes_of_one_cpu(small_nodes):
    sized = small_nodes["sized"]
    assert not sized["partial"] and sized["accepted"] == 24
    assert sized["workers"] == 2 and sized["worker_cpus"] <= 0.85
    assert sorted(sized["workers_by_node"].values()) == [1, 1]


def test_workers_too_big_for_any_node_are_refused_at_planning(small_nodes):
    message = small_nodes["too_big"]
    assert "cannot all be placed" in message and "at most 1 fit" in message
    assert "each asks for 0.92 CPU" in message and "resources.worker_cpus" in message
    assert "{CPU: 0}" in message and "{CPU: 1, slot: 1}" in message


def test_with_no_worker_placed_the_job_fails_saying_what_it_waits_for(small_nodes):
    message = small_nodes["never"]
    assert "1 of 1 shard workers have not started" in message
    assert "each asks for 1 CPU, 1 nowhere" in message and "slot: 1}" in message
    assert "leave resources.workers unset" in message


def test_a_worker_ray_cannot_place_yet_does_not_hold_the_job_and_joins_later(small_nodes):
    late = small_nodes["late"]
    assert not late["partial"] and late["accepted"] == 24
    assert any("1 of 3 shard workers have not started" in m and "0.45 CPU, 1 slot" in m
               and "goes on with the 2 started" in m for m in late["warnings"])
    assert late["workers"] == 3 and sorted(late["workers_by_node"].values()) == [1, 1, 1]
