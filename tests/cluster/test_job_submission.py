"""`ray job submit -- pixcrawler build spec.yaml` against a Ray head started by this test.

The head runs with its own temp dir and free ports on 127.0.0.1 (auth disabled); the test
stops exactly the processes it started (never `ray stop`, which would kill every Ray here).
While the job runs, its metrics must appear on the head's Prometheus endpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from builder.ports import free_port
from tests.e2e.helpers import check_accounting

BIN = Path(sys.executable).parent


def _kill_tree(tmpdir: str) -> None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().decode(errors="ignore")
            env = (proc / "environ").read_bytes().decode(errors="ignore")
        except OSError:
            continue
        if tmpdir in cmd or tmpdir in env:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def ray_head():
    tmpdir = tempfile.mkdtemp(prefix="pxhead", dir="/tmp")
    ports = {name: free_port() for name in (
        "port", "dashboard-port", "ray-client-server-port", "metrics-export-port",
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "node-manager-port", "object-manager-port")}
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               RAY_metrics_report_interval_ms="1000", PIXCRAWLER_TEST_HEAD=tmpdir,
               PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    args = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
            "--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--temp-dir", tmpdir,
            "--include-dashboard", "true", "--min-worker-port", "0", "--max-worker-port", "0"]
    args += [f"--{k}={v}" for k, v in ports.items()]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail("ray start --head exited early")
            time.sleep(1)
    else:
        proc.kill()
        _kill_tree(tmpdir)
        pytest.fail("Ray head dashboard did not come up")
    yield {"address": address, "env": env, "metrics": ports["metrics-export-port"],
           "client": f"ray://127.0.0.1:{ports['ray-client-server-port']}"}
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    _kill_tree(tmpdir)


@pytest.mark.slow
def test_ray_job_submit_builds_the_dataset_and_exports_metrics(ray_head, sandbox, tmp_path):
    out = tmp_path / "submitted"
    spec = {
        "name": "submitted", "target": 6,
        "classes": {"cat": "cat", "dog": "dog"},
        "sources": [{"engine": "sandbox", "url": sandbox.base_url, "per_page": 10}],
        "download": {"timeout_s": 1.0, "retries": 1, "backoff_s": 0.05,
                     "allow_private_networks": True, "per_host_delay_s": 0.25},
        "output": {"uri": str(out)},
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    submit = subprocess.Popen(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head["address"],
         "--submission-id", "pxc-submit-test", "--", "pixcrawler", "build", str(spec_path),
         "--job-id", "submitted-1"],
        env=ray_head["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen_metric = False
    metrics_url = f"http://127.0.0.1:{ray_head['metrics']}/metrics"
    while submit.poll() is None:
        try:
            body = urllib.request.urlopen(metrics_url, timeout=2).read().decode()
            if 'pixcrawler_accepted' in body and 'job="submitted-1"' in body:
                seen_metric = True
        except OSError:
            pass
        time.sleep(0.5)
    output = submit.stdout.read()
    assert submit.returncode == 0, output
    assert "succeeded" in output and "submitted-1" in output
    stats = check_accounting(str(out))
    assert stats["runner"] == "ray" and stats["accepted"] == 12
    assert json.loads((out / "_SUCCESS").read_text())
    assert seen_metric, "pixcrawler_accepted{job=submitted-1} never showed on the metrics endpoint"


@pytest.mark.slow
def test_build_joins_a_cluster_from_outside_through_ray_client(ray_head, sandbox, tmp_path):
    """`pixcrawler build --address ray://HEAD:10001`, as the README writes it: the driver runs
    here, the job's actors on the cluster."""
    out = tmp_path / "client"
    spec = {"name": "client", "target": 5, "classes": {"cat": "cat", "dog": "dog"},
            "sources": [{"engine": "sandbox", "url": sandbox.base_url, "per_page": 10}],
            "download": {"timeout_s": 1.0, "retries": 0, "allow_private_networks": True},
            "output": {"uri": str(out)}}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    done = subprocess.run([str(BIN / "pixcrawler"), "build", str(spec_path), "--address",
                           ray_head["client"], "--job-id", "client-1"], env=ray_head["env"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"joining the cluster at {ray_head['client']}" in done.stderr
    stats = check_accounting(str(out))
    assert stats["runner"] == "ray" and stats["accepted"] == 10
