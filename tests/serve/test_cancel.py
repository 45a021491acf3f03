"""Cancelling a running job, and the cap on concurrent jobs per key (1 in the test app)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from builder.writers import read_marker
from serve.jobs import JobLauncher
from tests.serve.conftest import job_spec


def slow_spec(sandbox):
    """A job that takes a while: one fetch at a time per host, 0.3 s apart."""
    return job_spec(sandbox, name="slowjob", target=25,
                    download={"per_host_concurrency": 1, "per_host_delay_s": 0.3})


def test_second_job_over_the_cap_gets_429_then_cancel_writes_a_partial_result(serve_app,
                                                                              sandbox):
    key = serve_app.new_key("canceller")
    job_id = serve_app.submit(key, slow_spec(sandbox))

    over = serve_app.call("POST", "/v1/jobs", key, json=job_spec(sandbox))
    assert over.status_code == 429
    assert over.json()["error"]["code"] == "too_many_jobs"
    assert int(over.headers["retry-after"]) >= 1

    running = serve_app.wait(key, job_id, states=("running",) + ("succeeded", "failed"))
    assert running["state"] == "running", running
    r = serve_app.call("DELETE", f"/v1/jobs/{job_id}", key)
    assert r.status_code == 202 and r.json()["cancel_requested"] is True

    job = serve_app.wait(key, job_id)
    assert job["state"] == "cancelled", job
    assert job["partial"] is True
    assert job["stats"]["partial"] is True
    assert job["stats"]["accepted"] < 75
    marker = read_marker(job["output_uri"])
    assert marker is not None and marker["marker"] == "_PARTIAL"
    listed = serve_app.call("GET", "/v1/jobs", key, params={"state": "cancelled"}).json()
    assert [j["id"] for j in listed["jobs"]] == [job_id]
    # The dashboard's Jobs view says STOPPED, not FAILED ("exit code 130").
    launcher = JobLauncher(Path(tempfile.gettempdir()))
    deadline = time.time() + 60
    while (status := launcher.status(job_id)).status in ("PENDING", "RUNNING") and \
            time.time() < deadline:
        time.sleep(0.5)
    assert status.status == "STOPPED", status
