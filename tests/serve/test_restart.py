"""The store outlives the app: after serve.delete + redeploy the jobs are still there, and a job
left "running" by a crash is settled against Ray when the app starts."""

from __future__ import annotations

import time

import requests

from serve.store import JobStore
from tests.serve.conftest import job_spec


def test_jobs_survive_an_app_restart_and_stale_jobs_are_reconciled(serve_app, sandbox):
    from ray import serve as ray_serve

    from serve.app import APP_NAME

    key = serve_app.new_key("restarter")
    job_id = serve_app.submit(key, job_spec(sandbox, name="beforerestart"))
    assert serve_app.call("DELETE", f"/v1/jobs/{job_id}", key).status_code == 202
    assert serve_app.wait(key, job_id)["state"] == "cancelled"

    ray_serve.delete(APP_NAME)
    assert requests.get(serve_app.url("/healthz"), timeout=10).status_code != 200

    # A crash left a job "running" that Ray never heard of (e.g. the cluster was restarted).
    store = JobStore(serve_app.settings["store"])
    owner = store.verify_key(key).id
    store.create_job("ghost-00000000", owner, "ghost", {"name": "ghost"}, "/nonexistent/ghost")
    store.update_job("ghost-00000000", state="running")
    store.close()

    serve_app.deploy()
    deadline = time.time() + 20
    while True:
        jobs = {j["id"]: j for j in serve_app.call("GET", "/v1/jobs", key).json()["jobs"]}
        if jobs["ghost-00000000"]["state"] != "running" or time.time() > deadline:
            break
        time.sleep(0.5)
    assert set(jobs) == {job_id, "ghost-00000000"}
    assert jobs[job_id]["state"] == "cancelled"
    ghost = jobs["ghost-00000000"]
    assert ghost["state"] == "failed" and "no record" in ghost["error"]
