"""Jobs on a three-node Ray cluster (head + two worker nodes, all on this machine) writing to S3
on moto: workers on several nodes, a local output refused at planning, a worker node removed
mid-job. The cluster lives in a subprocess (``multinode.py``): a process holds one Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_bucket

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def multinode(sandbox, moto_s3, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    urls = tmp / "urls.txt"
    urls.write_text("".join(f"{label}\t{u}\n" for label in ("cat", "dog", "bird")
                            for u in sandbox.class_image_urls(label)))
    make_bucket(moto_s3, "multinode")
    env = dict(os.environ, PIXCRAWLER_MULTINODE=json.dumps({
        "urls": str(urls), "s3": moto_s3, "bucket": "multinode", "tmp": str(tmp),
        "delay": 0.15}), RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(HERE.parent.parent))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(HERE / "multinode.py")], env=env,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def exact(figures: dict) -> dict:
    stats = figures["stats"]
    assert figures["complete"] and not figures["partial"]
    assert stats["accepted"] + stats["rejected"] == stats["candidates"]
    for c in stats["classes"].values():
        assert c["accepted"] + c["rejected"] == c["candidates"]
    assert len(figures["ids"]) == stats["accepted"] == figures["labels_rows"]
    assert len(set(figures["ids"])) == len(figures["ids"]), "an image was written twice"
    assert figures["rejects_rows"] == stats["rejected"]
    assert figures["labels_paths_exist"]
    return stats


def test_workers_run_on_several_nodes_and_write_to_s3(multinode):
    stats = exact(multinode["uninterrupted"])
    assert stats["accepted"] > 30
    nodes = stats["workers_by_node"]
    assert len(nodes) == 2 and set(nodes) <= set(multinode["nodes"])


def test_a_local_output_on_a_cluster_is_refused_at_planning(multinode):
    message = multinode["local_output"]
    assert "object store" in message and "output.shared_filesystem" in message


def test_losing_a_worker_node_mid_job_loses_nothing_and_doubles_nothing(multinode):
    whole = exact(multinode["uninterrupted"])
    lost = multinode["node_lost"]
    stats = exact(lost)
    assert lost["removed_mid_job"]
    assert stats["resent_units"] > 0
    for key in ("candidates", "accepted", "rejected", "rejected_by_reason"):
        assert stats[key] == whole[key], key
    assert sorted(lost["ids"]) == sorted(multinode["uninterrupted"]["ids"])


def test_an_engine_limiter_lives_on_the_head_node(multinode):
    """Its day's count (Google's 100 requests a day) is kept in the files of the node it runs
    on: created from a worker node, or restarted on another, it counted from 0 again."""
    assert multinode["limiter_node"] == multinode["head"]
