"""ray_cluster.yaml declares node types that can host the pools the pipeline asks for."""

from pathlib import Path

import yaml

from actors.options import plan_pools
from builder.spec import parse_spec

CLUSTER = yaml.safe_load((Path(__file__).parents[2] / "ray_cluster.yaml").read_text())


def spec(level: str = "slow", **resources):
    return parse_spec({"name": "x", "classes": {"a": None},
                       "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:1"}],
                       "validation": {"level": level}, "resources": resources})


def test_node_types_declared():
    types = CLUSTER["available_node_types"]
    assert CLUSTER["head_node_type"] in types
    assert {"head", "cpu_worker", "gpu_worker"} <= set(types)
    assert types["gpu_worker"]["resources"].get("GPU", 0) >= 1
    assert types["cpu_worker"]["resources"]["CPU"] >= 1
    assert any("pixcrawler" in cmd for cmd in CLUSTER["setup_commands"])


def test_cluster_file_is_a_valid_cluster_launcher_config():
    """What ``ray up`` checks before it starts anything: the schema, after its defaults."""
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(CLUSTER)))


def test_every_node_runs_with_token_authentication():
    """The head's dashboard listens on every interface and its job API runs whatever it is
    sent; a cluster started with ``ray start`` has Ray's token authentication off unless
    asked, so anyone reaching port 8265 could run code there. Every node starts with it on,
    and holds the token copied from the launching machine."""
    mounts = CLUSTER["file_mounts"]
    assert mounts["/home/ray/.pixcrawler-ray-auth"] == "~/.ray"  # a folder: see the comment
    starts = CLUSTER["head_start_ray_commands"] + CLUSTER["worker_start_ray_commands"]
    for command in (c for c in starts if "ray start" in c):
        assert command.startswith("RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="
                                  "/home/ray/.pixcrawler-ray-auth/auth_token "), command


def test_gpu_workers_get_the_cuda_build_of_onnxruntime():
    """The NSFW validator's onnxruntime must have CUDA on GPU workers; the CPU build (which the
    ml extra pulls in) is removed before onnxruntime-gpu goes in, never after it."""
    commands = CLUSTER["available_node_types"]["gpu_worker"]["worker_setup_commands"]
    text = "\n".join(commands)
    assert "pixcrawler[ml]" in text and "onnxruntime-gpu" in text
    ml = next(i for i, c in enumerate(commands) if "pixcrawler[ml]" in c)
    uninstall = next(i for i, c in enumerate(commands) if "uninstall" in c and "onnxruntime" in c)
    gpu = next(i for i, c in enumerate(commands) if "onnxruntime-gpu" in c)
    assert ml < uninstall < gpu


def test_pools_fit_the_declared_nodes():
    types = CLUSTER["available_node_types"]
    total = {"CPU": 0.0, "GPU": 0.0}
    for t in types.values():
        count = max(t.get("max_workers", 1), 1)
        for k in total:
            total[k] += t["resources"].get(k, 0) * count
    plan = plan_pools(spec(gpus_per_actor=1.0, gpu_actors=2), total, 2)
    need = plan.required()
    assert need["CPU"] <= total["CPU"] and need["GPU"] <= total["GPU"]
    cpu_node = types["cpu_worker"]["resources"]["CPU"]
    assert plan.worker_cpus <= cpu_node
    gpu_node = types["gpu_worker"]["resources"]
    assert plan.gpus_per_actor <= gpu_node["GPU"]
    assert plan.gpu_options()["num_cpus"] <= gpu_node["CPU"]


def test_two_core_laptop_plan():
    plan = plan_pools(spec("medium"), {"CPU": 2.0}, 2)
    assert plan.workers == 2 and plan.partitions == 1
    assert plan.required()["CPU"] <= 2.0
    slow = plan_pools(spec(), {"CPU": 2.0}, 2)
    assert slow.workers == 1 and slow.required()["CPU"] <= 2.0


def test_oversubscribed_pools_fail_at_planning():
    import pytest

    from cluster.coordinator import PlanningError, check_fits

    plan = plan_pools(spec(workers=2, worker_cpus=1.0), {"CPU": 2.0}, 2)
    with pytest.raises(PlanningError, match="resources.workers"):
        check_fits(plan, {"CPU": 2.0})
    check_fits(plan_pools(spec(), {"CPU": 2.0}, 2), {"CPU": 2.0})


def test_head_system_config_matches_the_embedded_one():
    import json
    import shlex

    from cluster.connect import EMBEDDED_SYSTEM_CONFIG

    head = " ".join(CLUSTER["head_start_ray_commands"])
    flags = [a for a in shlex.split(head) if a.startswith("--system-config=")]
    assert len(flags) == 1, head
    assert json.loads(flags[0].split("=", 1)[1]) == EMBEDDED_SYSTEM_CONFIG
