"""Session-wide fixtures: environment, the sandbox web, a moto S3 server, one local Ray.

Everything binds 127.0.0.1 and is stopped at the end of the session. Ray is started only by
tests that ask for ``ray_session`` (the builder tests never import ray).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from builder.ports import free_port
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Engines' daily request counts (builder.ratelimit.DayFile) go to a folder of this session's
# own, never the user's, and every process the tests start (Ray's included) inherits it.
STATE_HOME = tempfile.mkdtemp(prefix="pxstate")
os.environ["XDG_STATE_HOME"] = STATE_HOME
# Ray's workers import the tests' own modules (a remote function defined in one is sent by
# name), and the folder the tests run from is not on their import path (cluster.connect keeps
# it off): the repository root is, for every process the tests start.
REPO_ROOT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(
    dict.fromkeys([REPO_ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))


@pytest.fixture(scope="session", autouse=True)
def _state_home():
    yield STATE_HOME
    shutil.rmtree(STATE_HOME, ignore_errors=True)



@pytest.fixture(scope="session")
def sandbox():
    """The sandbox web: 3 classes x 30 images, faults on, slow answers after 3 s."""
    from builder.sandbox import SandboxWeb

    web = SandboxWeb(classes=("cat", "dog", "bird"), images_per_class=30, slow_s=3.0,
                     big_bytes=2_000_000)
    web.start()
    yield web
    web.stop()


HANGS_S = 600.0
"""How long ``hanging_sandbox``'s slow URLs take to answer: longer than any test."""


@pytest.fixture
def hanging_sandbox():
    """The sandbox web of ``sandbox`` whose slow URL (bird's first search page holds one)
    answers only after HANGS_S: a job that needs that page's images cannot end before it is
    cancelled, whatever the machine's load (give the job a fetch timeout and deadline near
    HANGS_S: ``download.deadline_s`` caps the timeout, 120 s by default)."""
    from builder.sandbox import SandboxWeb

    with SandboxWeb(classes=("cat", "dog", "bird"), images_per_class=30, slow_s=HANGS_S,
                    big_bytes=2_000_000) as web:
        yield web


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server on 127.0.0.1 for the session (tests/postgres.py); skips where
    PostgreSQL's server or its Python driver is not installed."""
    pytest.importorskip("psycopg", reason="psycopg not installed (the 'test' extra has it)")
    from tests.postgres import PostgresServer, PostgresUnavailable

    try:
        server = PostgresServer()
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    try:
        server.start()
    except PostgresUnavailable:
        server.stop()
        raise  # installed but not starting: a real failure, not a skip
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_s3():
    """A moto S3 server on 127.0.0.1; yields its endpoint URL."""
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        pytest.skip("moto_server not installed (install the 'test' extra)")
    port = free_port()
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto_server did not start")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs) for the whole session; ray.init costs seconds, so it is shared."""
    import ray

    tmp = tempfile.mkdtemp(prefix="pxray", dir="/tmp")
    os.environ["RAY_TMPDIR"] = tmp
    from serve.cli import connect_with_jobs

    # With the dashboard: the HTTP API's tests submit Ray jobs through it.
    connect_with_jobs(None, num_cpus=2)
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
