"""`ray job submit` exactly as the README writes it, against a Ray head started by this test.

The head runs with its own temp dir and free ports on 127.0.0.1 (auth disabled); the test
stops exactly the processes it started (never `ray stop`, which would kill every Ray here).
While the job runs, its metrics must appear on the head's Prometheus endpoint.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from builder.ports import free_port
from tests.conftest import HANGS_S
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
               RAY_JOB_STOP_WAIT_TIME_S="60",  # as ray_cluster.yaml starts the head
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
            # and the head's dashboard agent, which runs submitted jobs: a submit waits for
            # it 10 s at most, and under load the first one could fail ("No available
            # agent to submit job"). It registers right after it listens, well within that.
            socket.create_connection(("127.0.0.1", ports["dashboard-agent-listen-port"]),
                                     timeout=2).close()
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
           "gcs": f"127.0.0.1:{ports['port']}",
           "client": f"ray://127.0.0.1:{ports['ray-client-server-port']}"}
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    _kill_tree(tmpdir)


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_submit_command(address: str) -> list[str]:
    """The README's `ray job submit` line, exactly, against this test's head."""
    lines = [line.split("#", 1)[0].strip() for line in README.read_text().splitlines()
             if line.startswith("ray job submit ")]
    assert len(lines) == 1, lines
    assert "http://HEAD:8265" in lines[0]
    return shlex.split(lines[0].replace("http://HEAD:8265", address))


def _project(tmp_path: Path, sandbox, out: Path, target: int, delay_s: float,
             classes: tuple[str, ...] = ("cat", "dog"), timeout_s: float = 1.0) -> Path:
    """A folder holding spec.yaml, as a user's project folder would."""
    spec = {
        "name": "submitted", "target": target,
        "classes": {label: label for label in classes},
        "sources": [{"engine": "sandbox", "url": sandbox.base_url, "per_page": 10}],
        "download": {"timeout_s": timeout_s, "deadline_s": max(timeout_s, 120.0),
                     "retries": 1, "backoff_s": 0.05, "allow_private_networks": True,
                     "per_host_delay_s": delay_s},
        "output": {"uri": str(out)},
    }
    project = tmp_path / "project"
    project.mkdir()
    (project / "spec.yaml").write_text(yaml.safe_dump(spec))
    return project


def _submit(ray_head, project: Path, extra: list[str] = ()) -> subprocess.Popen:
    command = readme_submit_command(ray_head["address"])
    if extra:
        command = command[:command.index("--")] + list(extra) + command[command.index("--"):]
    return subprocess.Popen(command, cwd=project, env=ray_head["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_ray_job_submit_as_the_readme_writes_it_builds_the_dataset_and_exports_metrics(
        ray_head, sandbox, tmp_path):
    """The README's command, run in the folder that holds spec.yaml: the job gets the folder
    (--working-dir .), builds the dataset, and its metrics show on the head's Prometheus
    endpoint under the names the README and the Grafana dashboard use."""
    from actors.metrics import exported_series

    out = tmp_path / "submitted"
    submit = _submit(ray_head, _project(tmp_path, sandbox, out, 6, 0.25))
    seen: set[str] = set()
    metrics_url = f"http://127.0.0.1:{ray_head['metrics']}/metrics"
    while submit.poll() is None:
        try:
            body = urllib.request.urlopen(metrics_url, timeout=2).read().decode()
            seen.update(line.split("{", 1)[0] for line in body.splitlines()
                        if line.startswith("ray_pixcrawler_"))
        except OSError:
            pass
        time.sleep(0.5)
    output = submit.stdout.read()
    assert submit.returncode == 0, output
    assert "succeeded" in output
    stats = check_accounting(str(out))
    assert stats["runner"] == "ray" and stats["accepted"] == 12
    assert json.loads((out / "_SUCCESS").read_text())
    assert seen == set(exported_series()), seen ^ set(exported_series())


CANCEL = """
import sys, time, ray
from actors import NAMESPACE
from actors.progress import cancel_job
ray.init(address=sys.argv[1], namespace=NAMESPACE, log_to_driver=False)
deadline = time.time() + 60
while not cancel_job(sys.argv[2], "test") and time.time() < deadline:
    time.sleep(0.5)  # its progress actor starts a moment after its journal
print(time.time() < deadline)
"""


RUNNING = """
import sys, time, ray
from actors import NAMESPACE
from actors.progress import get_progress
ray.init(address=sys.argv[1], namespace=NAMESPACE, log_to_driver=False)
deadline = time.time() + 120
while (get_progress(sys.argv[2]) or {}).get("state") != "running" and time.time() < deadline:
    time.sleep(0.5)  # running: its first progress came, from inside the job's signal handling
print(time.time() < deadline)
"""


def _job_info(ray_head, submission_id: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(ray_head["address"]).get_job_info(submission_id)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["progress actor", "ray job stop"])
def test_a_cancelled_job_shows_as_stopped_and_writes_a_partial_dataset(
        ray_head, hanging_sandbox, tmp_path, how):
    """Ray records a job STOPPED only when its supervisor stopped it: a job cancelled through
    its progress actor (as the HTTP API does) ends by asking for that; `ray job stop` does it
    directly. Either way what was accepted is written, marked _PARTIAL. (Bird's first page
    holds a URL that hangs until the cancel: under load, the cancel's interpreters could
    take longer than the job's other work.)"""
    out = tmp_path / "cancelled"
    sid = f"pxc-cancel-{how.replace(' ', '-')}"
    project = _project(tmp_path, hanging_sandbox, out, 200, 0.3, ("cat", "dog", "bird"),
                       timeout_s=HANGS_S / 2)
    submit = _submit(ray_head, project, ["--submission-id", sid, "--no-wait"])
    assert submit.wait(timeout=120) == 0, submit.stdout.read()
    deadline = time.time() + 240
    journals: list[Path] = []
    while time.time() < deadline and not journals:  # the job has started: its journal is there
        journals = [p for p in (out / "_journal").glob("*") if any(p.iterdir())] \
            if (out / "_journal").is_dir() else []
        time.sleep(0.5)
    assert journals, _job_info(ray_head, sid)
    running = subprocess.run([sys.executable, "-c", RUNNING, ray_head["gcs"], journals[0].name],
                             env=ray_head["env"], capture_output=True, text=True, timeout=180)
    assert running.stdout.strip().endswith("True"), running.stdout + running.stderr
    if how == "ray job stop":
        stop = subprocess.run([str(BIN / "ray"), "job", "stop", "--address",
                               ray_head["address"], sid], env=ray_head["env"],
                              capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stdout + stop.stderr
    else:
        cancel = subprocess.run([sys.executable, "-c", CANCEL, ray_head["gcs"],
                                 journals[0].name], env=ray_head["env"], capture_output=True,
                                text=True, timeout=120)
        assert cancel.stdout.strip().endswith("True"), cancel.stdout + cancel.stderr
    while time.time() < deadline:
        info = _job_info(ray_head, sid)
        if info.status.is_terminal():
            break
        time.sleep(0.5)
    assert info.status.value == "STOPPED", (info.status, info.message)
    assert (out / "_PARTIAL").exists() and not (out / "_SUCCESS").exists()
    assert json.loads((out / "stats.json").read_text())["partial_reason"] == "cancelled"


@pytest.mark.slow
def test_build_joins_a_cluster_from_outside_through_ray_client(ray_head, sandbox, tmp_path):
    """`pixcrawler build --address ray://HEAD:10001`, as the README writes it: the driver runs
    here, the job's actors on the cluster. A local output there is refused at planning (the
    workers would write to the cluster's disks, and the dataset be published from the
    driver's) unless the spec says the filesystem is shared, and then the driver's probe file
    must be seen by the nodes (here: one machine, so it is)."""
    out = tmp_path / "client"
    spec = {"name": "client", "target": 5, "classes": {"cat": "cat", "dog": "dog"},
            "sources": [{"engine": "sandbox", "url": sandbox.base_url, "per_page": 10}],
            "download": {"timeout_s": 1.0, "retries": 0, "allow_private_networks": True},
            "output": {"uri": str(out)}}
    spec_path = tmp_path / "spec.yaml"
    command = [str(BIN / "pixcrawler"), "build", str(spec_path), "--address",
               ray_head["client"], "--job-id", "client-1"]
    spec_path.write_text(yaml.safe_dump(spec))
    refused = subprocess.run(command, env=ray_head["env"], capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 1, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert "Ray Client (ray://)" in refused.stderr and "shared_filesystem" in refused.stderr
    assert not out.exists() or not any(out.iterdir())
    spec["output"]["shared_filesystem"] = True
    spec_path.write_text(yaml.safe_dump(spec))
    done = subprocess.run(command, env=ray_head["env"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"joining the cluster at {ray_head['client']}" in done.stderr
    stats = check_accounting(str(out))
    assert stats["runner"] == "ray" and stats["accepted"] == 10


RETRIED_CLIENT = """
import json, logging, sys
import ray
from ray.util.client.worker import Worker
from cluster.connect import connect, shutdown

real_init, failures = Worker._server_init, []

def failing_once(self, *args, **kwargs):
    if not failures:
        failures.append(1)
        raise ConnectionAbortedError(
            "Initialization failure from server:\\nRuntimeError: Starting Ray client server "
            "failed. See ray_client_server_1.err for detailed logs.")
    return real_init(self, *args, **kwargs)

Worker._server_init = failing_once
logging.basicConfig(level=logging.WARNING)
info = connect(sys.argv[1])
square = ray.remote(num_cpus=0)(lambda x: x * x)
print(json.dumps({"mode": info["mode"], "result": ray.get(square.remote(7))}))
shutdown()
"""


@pytest.mark.slow
def test_a_ray_client_connection_whose_server_failed_to_start_is_made_again(ray_head):
    """The first ray:// connection gets Ray's "Starting Ray client server failed" (the
    proxier's fork fault, ray-project/ray#63202, made to happen here); the second, in the same
    process, reaches the real cluster and runs a task there."""
    done = subprocess.run([sys.executable, "-c", RETRIED_CLIENT, ray_head["client"]],
                          env=ray_head["env"], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"mode": "cluster",
                                                                "result": 49}
    assert "attempt 1 of 3" in done.stderr and "ray-project/ray#63202" in done.stderr
