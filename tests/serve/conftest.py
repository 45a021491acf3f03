"""The job API running on Ray Serve on the session's local Ray, reached over real HTTP.

One app for the whole session (``serve_app``): a SQLite store in a temporary directory, auth on,
a small rate limit and one concurrent job per key (so the tests can hit both), the sandbox
example as the page's example spec. Jobs run as Ray jobs against the session's sandbox web, so
its policy lets users name the sandbox and fetch from 127.0.0.1, and read URL lists from the
temporary directory; jobs start at once, each sized to the whole (2-CPU) cluster. The policy's
defaults are tested on an app of their own (test_policy_app.py).
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
import requests

from builder.ports import free_port

TERMINAL = ("succeeded", "failed", "cancelled")


_databases = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """An empty job store: a SQLite file, then a database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres").create_database(f"store{next(_databases)}")


@pytest.fixture(scope="session")
def ray_jobs(request):
    """The session's Ray, with the dashboard that serves Ray's job API.

    ``ray_session`` starts Ray without the dashboard; if Ray is not up yet, it is started here
    first with the same settings plus the dashboard, and ``ray_session`` then reuses it.
    """
    import ray

    if not ray.is_initialized():
        tmp = tempfile.mkdtemp(prefix="pxray", dir="/tmp")
        os.environ["RAY_TMPDIR"] = tmp
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        from serve.cli import connect_with_jobs

        connect_with_jobs(None, num_cpus=2)
    request.getfixturevalue("ray_session")
    from serve.jobs import ClusterUnavailable, JobLauncher

    try:
        JobLauncher(Path(tempfile.gettempdir())).client
    except ClusterUnavailable as exc:
        pytest.fail(f"Ray jobs cannot be submitted in this session: {exc}. The session's "
                    "Ray must run its dashboard: in tests/conftest.py ray_session, start it "
                    "with serve.cli.connect_with_jobs(None, num_cpus=2)")
    return ray


def job_spec(sandbox, target: int = 3, **overrides: Any) -> dict[str, Any]:
    """A small sandbox job sized to run beside the app on 2 CPUs."""
    data: dict[str, Any] = {
        "name": "servetest",
        "target": target,
        "classes": {c: [f"{c} photo"] for c in ("cat", "dog", "bird")},
        "sources": [{"engine": "sandbox", "url": sandbox.base_url, "per_page": 12}],
        "download": {"timeout_s": 1.0, "retries": 1, "backoff_s": 0.05,
                     "max_bytes": 1_000_000, "allow_private_networks": True},
        "output": {"shard_size": 8},
        "resources": {"batch_size": 16},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


@dataclass
class ServeApp:
    base_url: str
    settings: dict[str, Any]
    keys: list[str] = field(default_factory=list)

    def new_key(self, name: Optional[str] = None) -> str:
        from serve.store import JobStore

        store = JobStore(self.settings["store"])
        try:
            plaintext, _ = store.create_key(name or f"test-{len(self.keys)}-{time.time_ns()}")
        finally:
            store.close()
        self.keys.append(plaintext)
        return plaintext

    def url(self, path: str) -> str:
        return self.base_url + path

    def call(self, method: str, path: str, key: Optional[str] = None,
             **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return requests.request(method, self.url(path), headers=headers, timeout=30, **kwargs)

    def deploy(self) -> None:
        from ray import serve as ray_serve

        from serve.app import APP_NAME, build_app

        ray_serve.run(build_app(self.settings), name=APP_NAME, route_prefix="/")

    def submit(self, key: str, spec: dict[str, Any]) -> str:
        r = self.call("POST", "/v1/jobs", key, json=spec)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def events(self, key: str, job_id: str, timeout: float = 150
               ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event, data) pairs from the job's event stream until it ends, opened as a
        browser's EventSource opens it: with a stream token in the URL, not the key."""
        r = self.call("POST", f"/v1/jobs/{job_id}/events/token", key)
        assert r.status_code == 200, r.text
        with requests.get(self.url(r.json()["events_url"]), stream=True, timeout=timeout) as r:
            assert r.status_code == 200, r.text
            assert r.headers["content-type"].startswith("text/event-stream")
            event = None
            for line in r.iter_lines(decode_unicode=True):
                if line.startswith("event: "):
                    event = line[len("event: "):]
                elif line.startswith("data: ") and event:
                    yield event, json.loads(line[len("data: "):])
                    if event == "end":
                        return

    def wait(self, key: str, job_id: str, states=TERMINAL, timeout: float = 150
             ) -> dict[str, Any]:
        """Poll the job until its state is one of ``states``; returns its JSON."""
        deadline = time.time() + timeout
        while True:
            r = self.call("GET", f"/v1/jobs/{job_id}", key)
            assert r.status_code == 200, r.text
            view = r.json()
            if view["state"] in states:
                return view
            assert time.time() < deadline, f"job stuck in {view['state']}: {view}"
            time.sleep(0.5)


@pytest.fixture(scope="session")
def serve_app(ray_jobs, sandbox, tmp_path_factory):
    from ray import serve as ray_serve

    tmp = tmp_path_factory.mktemp("serveapp")
    settings = {
        "store": f"sqlite:///{tmp / 'jobs.db'}",
        "rate_limit_per_s": 5.0,
        "rate_limit_burst": 15,
        "max_concurrent_jobs": 1,
        "key_cache_s": 0.5,
        "events_interval_s": 0.25,
        "reconcile_interval_s": 2.0,
        "example_spec": job_spec(sandbox, name="pagejob"),
        "policy": {"source_urls": [sandbox.base_url], "allow_private_networks": True,
                   "url_list_dirs": [tempfile.gettempdir()], "max_running_jobs": 100,
                   "job_cpus": 2.0},
    }
    port = free_port()
    ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = ServeApp(base_url=f"http://127.0.0.1:{port}", settings=settings)
    app.deploy()
    yield app
    ray_serve.shutdown()
